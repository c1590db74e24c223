"""The Python API of the VQA task: a run's trained answerers and fusers answer new (image, question) pairs.

    import medcap
    answerer = medcap.Answerer.from_run("runs/vqa-rad-cpu")
    answerer([("scan.jpg", "Is there a mass?"), (pil_image, "What organ is shown?")])  # -> ["yes", "liver"]
    answerer.answer(pairs)[0].answers                        # every answer set's answer
    medcap.answer_question("scan.jpg", "Is there a mass?", run="runs/vqa-rad-cpu")

The pairs are a split of their own in ``RUN/api/`` (its images embedded, its questions encoded), answered
in batches by every answer set with the run's index questions and trained models (hard links from the
run folder, never retrained). Each question's type (closed/open) is guessed from its form unless given.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcap.config import load_config
from medcap.records import Example

USES = ("embed", "questions", "answer", "fuse-answers")  # what runs on new pairs; trained models come from the run


@dataclass(frozen=True)
class Answers:
    """One question's answer (the run's submitted answer set) and every answer set's."""

    id: str
    answer: str
    answers: dict[str, str]


class Answerer:
    """A VQA run's answerers and fusers, ready to answer (image, question) pairs."""

    def __init__(self, cfg: Any, answer_set: str | None = None):
        from medcap.pipeline import Pipeline
        from medcap.vqa.stages import answer_sets, submitted

        if getattr(cfg, "task", "caption") != "vqa":
            raise ValueError(f"{cfg.name}: not a VQA run (task: {cfg.task}); use medcap.Captioner")
        source = Pipeline(cfg)
        self.final = answer_set or submitted(source)
        if self.final not in answer_sets(source):
            raise ValueError(f"no answer set {self.final!r}; have {answer_sets(source)}")
        scratch = copy.deepcopy(cfg)
        scratch.runs_dir, scratch.name = str(source.run.root), "api"
        self.pipeline = Pipeline(scratch, peers=[source.run.root])
        self.calls = 0

    @classmethod
    def from_run(cls, run_dir: str | Path, answer_set: str | None = None, overrides: Sequence[str] = ()) -> Answerer:
        """The answerers a run folder holds (its ``config.yaml``, question vectors and trained models)."""
        run = Path(run_dir)
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"{run}: not a run folder (no config.yaml); make one with `medcap run CONFIG`")
        cfg = load_config(run / "config.yaml", list(overrides))
        cfg.runs_dir, cfg.name = str(run.parent), run.name
        return cls(cfg, answer_set)

    def answer(self, pairs: Sequence[tuple[Any, str]], answer_types: Sequence[str] | None = None) -> list[Answers]:
        """Answers for (image, question) pairs (images as paths or PIL images), in order; ``answer_types``
        (CLOSED/OPEN per question) where known, else guessed from each question's form."""
        from medcap.api import _as_source
        from medcap.config import config_hash
        from medcap.vqa.data import Question, QuestionSplit
        from medcap.vqa.stages import answer_sets, answers_of

        if not pairs:
            return []
        types = list(answer_types) if answer_types is not None else [""] * len(pairs)
        images: dict[Any, Example] = {}
        questions = []
        for i, ((image, question), atype) in enumerate(zip(pairs, types, strict=True)):
            if not str(question).strip():
                raise ValueError(f"pair {i}: empty question")
            source = _as_source(image)
            key = str(source) if isinstance(source, Path) else config_hash(source.hex())
            if key not in images:
                images[key] = Example(f"image-{len(images):06d}", source, None, (), f"image-{len(images):06d}")
            ex = images[key]
            qid = f"q-{i:06d}"
            questions.append(
                Question(qid, ex.id, ex.image, str(question).strip(), None, atype.strip().upper(), raw_qid=qid)
            )
        self.calls += 1
        split = f"api-{self.calls}"
        pipe = self.pipeline
        pipe.add_split(split, list(images.values()))
        pipe.resource(("vqa-questions", split, ()), lambda: QuestionSplit(split, questions))
        pipe.history.clear()
        with pipe.session("medcap api: answer"):
            pipe.allowed = set(USES)
            sets = {name: answers_of(pipe, name, split) for name in answer_sets(pipe)}
        return [
            Answers(q.qid, sets[self.final][q.qid]["answer"], {n: rows[q.qid]["answer"] for n, rows in sets.items()})
            for q in questions
        ]

    def __call__(self, pairs: Sequence[tuple[Any, str]]) -> list[str]:
        """The final answer to each (image, question) pair, in order."""
        return [a.answer for a in self.answer(pairs)]


def answer_question(image: Any, question: str, run: str | Path, answer_set: str | None = None) -> str:
    """Answer one question about one image with the answerers of run folder ``run``."""
    return Answerer.from_run(run, answer_set)([(image, question)])[0]
