"""Answerer kinds: each turns a split's questions into answers with a distribution over answers.

A kind says whether it trains, which settings shape its output and its model, and answers a split
(:meth:`AnswererKind.answer`: one row per question, ``{"id", "qid", "image", "answer", "scores"}``: ``qid`` as
the data set writes it, ``id`` as text; ``scores`` are the normalised answers it weighed, summing to 1). ``KINDS`` maps the config's ``kind``
to its implementation (``prior``, ``vote``, ``classifier`` here; the multimodal LLMs in ``vqa/mllm.py``).

An index question is never answered from itself: a query question that is in the index (the index
split queried, e.g. to judge a fuser) ignores every index question of its own image, and trained
answerers cross-fit such splits by image.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.keys import key_settings
from medcap.registry import Registry
from medcap.vqa.features import Split, answer_row, answer_type, load_split, restrict
from medcap.vqa.normalize import normalize

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline
    from medcap.vqa.config import AnswererConfig


class AnswererKind:
    """What every answerer kind provides to the stages."""

    def trains(self, cfg: AnswererConfig) -> bool:
        return False

    def settings(self, pipe: Pipeline, cfg: AnswererConfig) -> Any:
        return key_settings(cfg)

    def train_settings(self, pipe: Pipeline, cfg: AnswererConfig) -> Any:
        return key_settings(cfg)

    def train(self, pipe: Pipeline, cfg: AnswererConfig, out: Path) -> None:
        raise NotImplementedError

    def answer(self, pipe: Pipeline, cfg: AnswererConfig, split: str, model_dir: Path | None) -> list[dict[str, Any]]:
        raise NotImplementedError


def rows_from(sp: Split, cfg: AnswererConfig, dists: list[dict[str, float]], use_type: bool) -> list[dict[str, Any]]:
    """Answer rows: each question's distribution restricted to what its answer type allows, best answer first."""
    out = []
    for q, dist in zip(sp.questions, dists, strict=True):
        kept = restrict(dist, q.question, answer_type(q, use_type)) if dist else {"": 1.0}
        out.append(answer_row(q, kept, cfg.name))
    return out


def index_of(pipe: Pipeline) -> Split:
    return load_split(pipe, pipe.cfg.data.index_split)


def own_images(index: Split, query: Split) -> list[set[int]]:
    """For each query question that is itself an index question, the index rows of its image (never used for it)."""
    qids = {q.qid for q in index.questions}
    rows_of: dict[str, set[int]] = defaultdict(set)
    for i, q in enumerate(index.questions):
        rows_of[q.image_id].add(i)
    return [rows_of[q.image_id] if q.qid in qids else set() for q in query.questions]


class Prior(AnswererKind):
    """The index split's most frequent answer to the same normalised question, else to its answer type."""

    def answer(self, pipe, cfg, split, model_dir):
        index, query = index_of(pipe), load_split(pipe, split)
        use = pipe.cfg.vqa.use_answer_type
        by_text: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(index.questions):
            by_text[normalize(q.question)].append(i)
        by_type = {t: Counter() for t in ("CLOSED", "OPEN")}
        for q in index.questions:
            by_type[q.answer_type][normalize(q.answer)] += 1
        excluded = own_images(index, query)
        dists = []
        for q, skip in zip(query.questions, excluded, strict=True):
            same = [i for i in by_text.get(normalize(q.question), []) if i not in skip]
            if same:
                c = Counter(normalize(index.questions[i].answer) for i in same)
                dists.append({a: n + 0.01 * by_type[answer_type(q, use)][a] for a, n in c.items()})
            else:
                dists.append(dict(by_type[answer_type(q, use)]))
        return rows_from(query, cfg, dists, use)


def nearest_pairs(index: Split, query: Split, k: int, image_weight: float, question_weight: float) -> list:
    """Each query question's ``k`` nearest index questions as ``[(row, similarity)]``, best first: cosine of the
    image vectors times ``image_weight`` plus of the question vectors times ``question_weight`` (one FAISS
    inner-product search over the weighted, concatenated vectors), never a question of its own image when the
    query question is itself an index question."""
    from medcap.retrieval.index import import_faiss

    faiss = import_faiss()
    wi, wq = np.sqrt(max(image_weight, 0.0)), np.sqrt(max(question_weight, 0.0))

    def joint(sp: Split) -> np.ndarray:
        return np.ascontiguousarray(np.hstack([wi * sp.images, wq * sp.texts]), dtype=np.float32)

    if not query.questions or not index.questions:
        return [[] for _ in query.questions]
    base = joint(index)
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    excluded = own_images(index, query)
    extra = max((len(s) for s in excluded), default=0)
    sims, idx = flat.search(joint(query), min(k + extra, len(index.questions)))
    scale = (image_weight + question_weight) or 1.0
    out = []
    for r, own in enumerate(excluded):
        picked = [(int(i), float(s) / scale) for i, s in zip(idx[r], sims[r], strict=True) if i >= 0 and i not in own]
        out.append(picked[:k])
    return out


class Vote(AnswererKind):
    """A softmax-weighted vote of the answers of the nearest index (image, question) pairs (FAISS, joint space)."""

    def answer(self, pipe, cfg, split, model_dir):
        index, query = index_of(pipe), load_split(pipe, split)
        use = pipe.cfg.vqa.use_answer_type
        answers = [normalize(q.answer) for q in index.questions]
        texts = [normalize(q.question) for q in index.questions]
        dists = []
        pairs = nearest_pairs(index, query, cfg.k, cfg.image_weight, cfg.question_weight)
        for q, picked in zip(query.questions, pairs, strict=True):
            qtext = normalize(q.question)
            votes: dict[str, float] = defaultdict(float)
            for i, s in picked:
                z = s + cfg.same_question * (texts[i] == qtext)
                votes[answers[i]] += float(np.exp((z - 1.0 - cfg.same_question) / max(cfg.tau, 1e-6)))
            dists.append(dict(votes))
        return rows_from(query, cfg, dists, use)


class Classifier(AnswererKind):
    """An MLP over image and question embeddings that picks one of the index split's answers (``classifier.py``)."""

    def trains(self, cfg):
        return True

    def train_settings(self, pipe, cfg):
        return key_settings(cfg), pipe.cfg.seed, pipe.cfg.vqa.use_answer_type

    def train(self, pipe, cfg, out):
        from medcap.vqa.classifier import fit, save

        index = index_of(pipe)
        save(fit(index, cfg, pipe.cfg.seed, pipe.cfg.vqa.use_answer_type), out)

    def answer(self, pipe, cfg, split, model_dir):
        from medcap.vqa.classifier import crossfit_predict, load, predict

        index, query = index_of(pipe), load_split(pipe, split)
        use = pipe.cfg.vqa.use_answer_type
        inside = {q.qid for q in index.questions}
        if any(q.qid in inside for q in query.questions):  # training questions: answered by models that never saw them
            dists = crossfit_predict(index, query, cfg, pipe.cfg.seed, use)
        else:
            dists = predict(load(model_dir), query, use)
        return rows_from(query, cfg, dists, use)


KINDS = Registry(
    "answerer kind",
    {
        "prior": Prior(),
        "vote": Vote(),
        "classifier": Classifier(),
        **dict.fromkeys(("llava", "qwen2_5_vl", "medgemma", "smolvlm"), "medcap.vqa.mllm:MLLM_KIND"),
    },
)
