"""What every answerer reads: the questions of a split with their image and question vectors.

Image vectors come from the shared ``embed`` stage (the retrieval encoder), question vectors from the
``questions`` stage (the MiniLM sentence encoder). :class:`Split` holds both, row-aligned with the
questions; :func:`closed_choices` says what a closed question may answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.vqa.data import Question, split_questions
from medcap.vqa.normalize import normalize, options, yes_no_question

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

YES_NO = ("yes", "no")


def question_encoder(name: str):
    """The sentence encoder of questions (``minilm``: the offline all-MiniLM-L6-v2; else a local folder)."""
    from medcap.models.textenc import sentence_model

    return sentence_model(None if name == "minilm" else name)


def encode_questions(texts: list[str], name: str) -> np.ndarray:
    """L2-normalised float32 sentence vectors."""
    model = question_encoder(name)
    vecs = model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    return np.asarray(vecs, dtype=np.float32).reshape(len(texts), -1)


def save_vectors(out: Path, ids: list[str], vectors: np.ndarray) -> None:
    import io

    from medcap.files import write_atomic

    buf = io.BytesIO()
    np.save(buf, vectors.astype(np.float16), allow_pickle=False)
    write_atomic(out.with_suffix(".ids.json"), json.dumps(ids))
    write_atomic(out, buf.getvalue())


def load_vectors(out: Path) -> tuple[list[str], np.ndarray]:
    return json.loads(out.with_suffix(".ids.json").read_text()), np.load(out).astype(np.float32)


@dataclass
class Split:
    """A split's questions, their image vectors and question vectors (rows aligned)."""

    name: str
    questions: list[Question]
    images: np.ndarray
    texts: np.ndarray

    @property
    def image_ids(self) -> list[str]:
        return [q.image_id for q in self.questions]


def load_split(pipe: Pipeline, split: str) -> Split:
    """The split's questions and vectors, read from the ``embed`` and ``questions`` artifacts (made first)."""
    from medcap.retrieval.embed import load_embeddings

    def build() -> Split:
        qs = split_questions(pipe, split).questions
        ids, vecs = load_embeddings(pipe.make("embed", split))
        by_image = dict(zip(ids, np.asarray(vecs, dtype=np.float32), strict=True))
        qids, qvecs = load_vectors(pipe.make("questions", split))
        by_q = dict(zip(qids, qvecs, strict=True))
        images = np.stack([by_image[q.image_id] for q in qs]) if qs else np.zeros((0, 1), np.float32)
        texts = np.stack([by_q[q.qid] for q in qs]) if qs else np.zeros((0, 1), np.float32)
        return Split(split, qs, images, texts)

    return pipe.resource(("vqa-split", split, pipe.key("questions", split), pipe.key("embed", split)), build)


def answer_type(q: Question, use_data: bool) -> str:
    """CLOSED or OPEN: the data's, or (``use_data`` False, or none given) a guess from the question's form."""
    if use_data and q.answer_type in ("CLOSED", "OPEN"):
        return q.answer_type
    return "CLOSED" if yes_no_question(q.question) or options(q.question) else "OPEN"


def closed_choices(question: str) -> tuple[str, ...]:
    """What a closed question may answer: the options it names (``X or Y``), else yes/no."""
    named = options(question)
    return tuple(named) if named else YES_NO


def restrict(scores: dict[str, float], question: str, atype: str) -> dict[str, float]:
    """``scores`` (normalised answer -> weight) kept to the answers a question of type ``atype`` may have.

    Closed: yes/no, or the named options (an answer matches an option it contains or is contained in);
    open: anything but yes/no. Falls back to ``scores`` when nothing is left."""
    if atype == "CLOSED":
        choices = closed_choices(question)
        if choices == YES_NO:
            kept = {a: s for a, s in scores.items() if a in YES_NO}
        else:
            kept = {a: s for a, s in scores.items() if any(_overlaps(a, c) for c in choices)}
            if not kept:  # an option nobody answered: the first named one
                kept = {choices[0]: 1e-6}
    else:
        kept = {a: s for a, s in scores.items() if a not in YES_NO}
    return kept or scores


def _overlaps(answer: str, option: str) -> bool:
    """An answer matches an option when the words of one hold the words of the other."""
    a, o = set(answer.split()), set(option.split())
    return bool(a and o) and (a <= o or o <= a)


def top(scores: dict[str, float], n: int = 10) -> dict[str, float]:
    """The ``n`` best answers, their weights summing to 1."""
    best = sorted(scores.items(), key=lambda x: -x[1])[:n]
    total = sum(s for _, s in best) or 1.0
    return {a: round(s / total, 6) for a, s in best}


def answer_row(q: Question, kept: dict[str, float], name: str) -> dict[str, Any]:
    """One question's answer row: its best answer and the ``top`` of its distribution."""
    scores = top(kept)
    return {"id": q.qid, "qid": q.raw_qid, "image": q.image_id, "answer": next(iter(scores)), "answerer": name,
            "scores": scores}  # fmt: skip


def majority(answers: list[str]) -> str:
    from collections import Counter

    return Counter(normalize(a) for a in answers).most_common(1)[0][0]
