"""The VQA task's stages, registered in ``tasks.VQA_STAGES`` after the shared ``embed`` stage.

| stage | target | artifact |
| --- | --- | --- |
| ``questions`` | split | ``questions/SPLIT.npy`` (+ ``.ids.json``): question vectors |
| ``train-answerer`` | answerer | ``models/NAME/`` (trained kinds only) |
| ``answer`` | answerer, split | ``answers/NAME/SPLIT.jsonl``: ``{"id", "qid", "image", "answer", "scores"}`` |
| ``fuse-answers`` | fuser, split | ``answers/NAME/SPLIT.jsonl`` (the same rows) |
| ``evaluate-answers`` | answer set, split | ``scores/NAME.SPLIT.json``: closed accuracy, open recall/F1/EM/BLEU-1 |
| ``submit-answers`` | the submitted answer set, split | ``submissions/NAME.SPLIT.jsonl`` and ``.csv``: every question ID |
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.files import read_jsonl, write_atomic, write_json
from medcap.keys import key_settings
from medcap.pipeline import Stage
from medcap.runs import Manifest, ResumableJsonl, safe_name, start_folder

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

ANSWER_VERSION = 3  # the answer logic shared by every kind (restriction to yes/no or named options): in keys


def answerers(pipe: Pipeline) -> dict[str, Any]:
    return {a.name: a for a in pipe.cfg.vqa.answerers}


def fusers(pipe: Pipeline) -> dict[str, Any]:
    return {f.name: f for f in pipe.cfg.vqa.fusers}


def answer_sets(pipe: Pipeline) -> list[str]:
    """Every answer set of the run: answerers, then fusers."""
    return [*answerers(pipe), *fusers(pipe)]


def submitted(pipe: Pipeline) -> str:
    return pipe.cfg.vqa.answer_set or answer_sets(pipe)[-1]


def answer_need(pipe: Pipeline, name: str, split: str) -> tuple:
    return ("answer" if name in answerers(pipe) else "fuse-answers", name, split)


def answers_of(pipe: Pipeline, name: str, split: str) -> dict[str, dict[str, Any]]:
    """An answer set's rows for a split by question ID (made first when its stage may run)."""
    return {r["id"]: r for r in read_jsonl(pipe.make(*answer_need(pipe, name, split)))}


def has_answers(pipe: Pipeline, split: str) -> bool:
    from medcap.vqa.data import split_questions

    return any(q.answer is not None for q in split_questions(pipe, split).questions)


def _kind(cfg: Any) -> Any:
    from medcap.vqa.answerers import KINDS

    return KINDS.get(cfg.kind)


def _data_needs(pipe: Pipeline, split: str) -> list[tuple]:
    return [("embed", split), ("questions", split)]


class Questions(Stage):
    name = "questions"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(s,) for s in pipe.splits]

    def path(self, pipe: Pipeline, split: str) -> Path:
        return pipe.run.root / "questions" / f"{safe_name(split)}.npy"

    def needs(self, pipe: Pipeline, split: str) -> list[tuple]:
        return [("questions", p) for p in pipe.parents(split)]  # a fold or a union: rows of its parents' vectors

    def settings(self, pipe: Pipeline, split: str) -> Any:
        from medcap.vqa.data import questions_key

        return pipe.cfg.vqa.question_encoder, questions_key(pipe, split)

    def make(self, pipe: Pipeline, out: Path, key: str, split: str) -> None:
        from medcap.vqa.data import split_questions
        from medcap.vqa.features import encode_questions, save_vectors

        qs = split_questions(pipe, split).questions
        if pipe.parents(split):
            from medcap.vqa.features import load_vectors

            rows = {}
            for p in pipe.parents(split):
                ids, vecs = load_vectors(pipe.path("questions", p))
                rows.update(zip(ids, vecs, strict=True))
            vecs = np.stack([rows[q.qid] for q in qs]) if qs else np.zeros((0, 1), np.float32)
        else:
            vecs = encode_questions([q.question for q in qs], pipe.cfg.vqa.question_encoder)
        save_vectors(out, [q.qid for q in qs], vecs)
        Manifest(self.name, key, complete=True, count=len(qs)).write(out)


class TrainAnswerer(Stage):
    name = "train-answerer"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(n,) for n, a in answerers(pipe).items() if _kind(a).trains(a)]

    def path(self, pipe: Pipeline, name: str) -> Path:
        return pipe.run.model(name)

    def needs(self, pipe: Pipeline, name: str) -> list[tuple]:
        return _data_needs(pipe, pipe.cfg.data.index_split)

    def settings(self, pipe: Pipeline, name: str) -> Any:
        a = answerers(pipe)[name]
        return _kind(a).train_settings(pipe, a)

    def make(self, pipe: Pipeline, out: Path, key: str, name: str) -> None:
        a = answerers(pipe)[name]
        start_folder(out, self.name, key)
        _kind(a).train(pipe, a, out)
        Manifest(self.name, key, complete=True).write(out)


class Answer(Stage):
    name = "answer"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(n, s) for s in pipe.cfg.data.query_splits for n in answerers(pipe)]

    def path(self, pipe: Pipeline, name: str, split: str) -> Path:
        return pipe.run.root / "answers" / safe_name(name) / f"{safe_name(split)}.jsonl"

    def needs(self, pipe: Pipeline, name: str, split: str) -> list[tuple]:
        a = answerers(pipe)[name]
        needs = _data_needs(pipe, split) + _data_needs(pipe, pipe.cfg.data.index_split)
        return needs + ([("train-answerer", name)] if _kind(a).trains(a) else [])

    def settings(self, pipe: Pipeline, name: str, split: str) -> Any:
        a = answerers(pipe)[name]
        return _kind(a).settings(pipe, a), pipe.cfg.vqa.use_answer_type, pipe.cfg.seed, ANSWER_VERSION

    def make(self, pipe: Pipeline, out: Path, key: str, name: str, split: str) -> None:
        a = answerers(pipe)[name]
        model_dir = pipe.path("train-answerer", name) if _kind(a).trains(a) else None
        rows = _kind(a).answer(pipe, a, split, model_dir)
        sink = ResumableJsonl(out, self.name, key)
        sink.write([r for r in rows if r["id"] not in sink.done])
        sink.finish()


class FuseAnswers(Stage):
    name = "fuse-answers"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(n, s) for s in pipe.cfg.data.query_splits for n in fusers(pipe)]

    def path(self, pipe: Pipeline, name: str, split: str) -> Path:
        return pipe.run.root / "answers" / safe_name(name) / f"{safe_name(split)}.jsonl"

    def inputs(self, pipe: Pipeline, name: str) -> list[str]:
        return list(fusers(pipe)[name].candidates) or list(answerers(pipe))

    def needs(self, pipe: Pipeline, name: str, split: str) -> list[tuple]:
        needs = [("answer", a, split) for a in self.inputs(pipe, name)] + [("questions", split)]
        if fusers(pipe)[name].kind == "learned":  # its weights: fitted on the index split's own questions
            index = pipe.cfg.data.index_split
            needs += [("answer", a, index) for a in self.inputs(pipe, name)] + [("questions", index)]
        return needs

    def settings(self, pipe: Pipeline, name: str, split: str) -> Any:
        return key_settings(fusers(pipe)[name]), pipe.cfg.vqa.use_answer_type, ANSWER_VERSION

    def make(self, pipe: Pipeline, out: Path, key: str, name: str, split: str) -> None:
        from medcap.vqa.data import split_questions
        from medcap.vqa.fuse import fit_weights, fuse

        cfg, use = fusers(pipe)[name], pipe.cfg.vqa.use_answer_type
        per = {a: answers_of(pipe, a, split) for a in self.inputs(pipe, name)}
        questions = split_questions(pipe, split).questions
        info = None
        if cfg.kind != "learned":
            rows = fuse(cfg, questions, per, use)
        else:
            index = pipe.cfg.data.index_split
            on_index = {a: answers_of(pipe, a, index) for a in self.inputs(pipe, name)}
            train = split_questions(pipe, index).questions
            weights, accuracy = fit_weights(cfg.grid, train, on_index, use)
            info = {"weights": weights, "index_accuracy": accuracy}
            log.info("%s: weights %s (index accuracy %s)", name, weights, accuracy)
            inside = {q.qid for q in train}
            if any(q.qid in inside for q in questions):  # training questions: weights fitted without their image
                rows = _crossfit_fuse(cfg, questions, per, train, on_index, use, pipe.cfg.seed)
                info["crossfit"] = "5 folds by image"
            else:
                rows = fuse(cfg, questions, per, use, weights)
        sink = ResumableJsonl(out, self.name, key)
        sink.write([r for r in rows if r["id"] not in sink.done])
        sink.finish(info)


def _crossfit_fuse(cfg: Any, questions: list, per: dict, train: list, on_index: dict, use: bool, seed: int) -> list:
    """The learned fuser on questions of its own index split: each image fold fused with weights fitted on the
    other folds' questions, so no weight is chosen on the question it answers."""
    from medcap.data.folds import group_folds
    from medcap.records import Example
    from medcap.vqa.fuse import fit_weights, fuse

    images = list(dict.fromkeys(q.image_id for q in questions))
    folds = group_folds([(Example(i, None), None) for i in images], min(5, len(images)), seed)
    rows: dict[str, dict] = {}
    for held in map(set, folds):
        weights, _ = fit_weights(cfg.grid, [q for q in train if q.image_id not in held], on_index, use)
        part = [q for q in questions if q.image_id in held]
        rows.update((r["id"], r) for r in fuse(cfg, part, per, use, weights))
    return [rows[q.qid] for q in questions]


class EvaluateAnswers(Stage):
    name = "evaluate-answers"
    command = "medcap evaluate RUN"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(n, s) for s in pipe.cfg.data.query_splits if has_answers(pipe, s) for n in answer_sets(pipe)]

    def path(self, pipe: Pipeline, name: str, split: str) -> Path:
        return pipe.run.scores(name, split)

    def needs(self, pipe: Pipeline, name: str, split: str) -> list[tuple]:
        return [answer_need(pipe, name, split), ("questions", split)]

    def settings(self, pipe: Pipeline, name: str, split: str) -> Any:
        return pipe.cfg.vqa.bootstrap, pipe.cfg.seed, "v1"

    def make(self, pipe: Pipeline, out: Path, key: str, name: str, split: str) -> None:
        from medcap.vqa.data import split_questions
        from medcap.vqa.metrics import summarise

        answers = answers_of(pipe, name, split)
        rows = [
            {"qid": q.qid, "image_id": q.image_id, "answer_type": q.answer_type, "content_type": q.content_type,
             "question": q.question, "answer": answers.get(q.qid, {}).get("answer", ""), "reference": q.answer}
            for q in split_questions(pipe, split).questions
            if q.answer is not None  # a question shipped without an answer is answered, not scored
        ]  # fmt: skip
        result = summarise(rows, pipe.cfg.vqa.bootstrap, pipe.cfg.seed)
        result.update({"task": "vqa", "answer_set": name, "split": split})
        write_json(out, result)
        Manifest(self.name, key, complete=True, count=len(rows)).write(out)
        m = result["means"]
        log.info("%s on %s: %s", name, split, ", ".join(f"{k} {v:.4f}" for k, v in m.items()))


class SubmitAnswers(Stage):
    name = "submit-answers"
    command = "medcap run CONFIG --only submit-answers"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(submitted(pipe), s) for s in pipe.cfg.data.query_splits]

    def path(self, pipe: Pipeline, name: str, split: str) -> Path:
        return pipe.run.root / "submissions" / f"{safe_name(name)}.{safe_name(split)}.jsonl"

    def needs(self, pipe: Pipeline, name: str, split: str) -> list[tuple]:
        return [answer_need(pipe, name, split), ("questions", split)]

    def make(self, pipe: Pipeline, out: Path, key: str, name: str, split: str) -> None:
        import csv
        import io
        import json

        from medcap.vqa.data import split_questions

        answers = answers_of(pipe, name, split)
        qs = split_questions(pipe, split).questions
        missing = [q.qid for q in qs if q.qid not in answers]
        if missing:
            raise ValueError(f"{name} has no answer for {len(missing)} question(s) of {split}, e.g. {missing[0]!r}")
        lines = [json.dumps({"qid": q.raw_qid, "answer": answers[q.qid]["answer"]}) for q in qs]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["qid", "image", "question", "answer"])
        for q in qs:
            w.writerow([q.qid, q.image_id, q.question, answers[q.qid]["answer"]])
        write_atomic(out.with_suffix(".csv"), buf.getvalue())
        write_atomic(out, "\n".join(lines) + "\n")
        Manifest(self.name, key, complete=True, count=len(qs), info={"csv": str(out.with_suffix(".csv"))}).write(out)
        log.info("%s: %d answers of %s -> %s (+ .csv)", name, len(qs), split, out)
