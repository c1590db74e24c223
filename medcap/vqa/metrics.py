"""VQA metrics as the field reports them, never one pooled number.

Closed questions: accuracy (normalised exact match). Open questions: token recall (the share of the
reference's tokens in the answer: LLaVA-Med's "open recall"), token F1, exact match and BLEU-1, all after
:func:`~medcap.vqa.normalize.normalize`. Each is broken down by ``content_type`` (SLAKE) / ``question_type``
(VQA-RAD); 95 % intervals resample whole images (the questions of one image move together).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from medcap.vqa.normalize import normalize, tokens

CLOSED = ("closed_accuracy",)
OPEN = ("open_recall", "open_f1", "open_exact", "open_bleu1")


def scores_one(answer: str | None, reference: str) -> dict[str, float]:
    """Exact match, token recall, precision, F1 and BLEU-1 of one answer against its reference."""
    hyp, ref = tokens(answer), tokens(reference)
    common = sum((Counter(hyp) & Counter(ref)).values())
    recall = common / len(ref) if ref else float(not hyp)
    precision = common / len(hyp) if hyp else float(not ref)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    bp = 1.0 if len(hyp) > len(ref) else (math.exp(1 - len(ref) / len(hyp)) if hyp else 0.0)
    return {
        "exact": float(normalize(answer) == normalize(reference)),
        "recall": recall,
        "f1": f1,
        "bleu1": bp * precision if hyp else 0.0,
    }


def per_question(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows``: {qid, image_id, answer_type, content_type, answer, reference} -> the same with scores."""
    out = []
    for r in rows:
        s = scores_one(r["answer"], r["reference"])
        out.append({**r, **s})
    return out


def _means(rows: list[dict[str, Any]]) -> dict[str, float]:
    closed = [r for r in rows if r["answer_type"] == "CLOSED"]
    open_ = [r for r in rows if r["answer_type"] == "OPEN"]
    m: dict[str, float] = {}
    if closed:
        m["closed_accuracy"] = float(np.mean([r["exact"] for r in closed]))
    if open_:
        for name, col in zip(OPEN, ("recall", "f1", "exact", "bleu1"), strict=True):
            m[name] = float(np.mean([r[col] for r in open_]))
    return m


def bootstrap(rows: list[dict[str, Any]], n_boot: int, seed: int) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of every mean, resampling images with replacement."""
    if n_boot <= 0 or not rows:
        return {}
    by_image: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    images = list(by_image)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        sample = [r for i in rng.integers(0, len(images), len(images)) for r in by_image[images[i]]]
        for k, v in _means(sample).items():
            draws.setdefault(k, []).append(v)
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()}


def summarise(rows: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Means with intervals overall, and means by content type, with counts."""
    scored = per_question(rows)
    means = _means(scored)
    intervals = bootstrap(scored, n_boot, seed)
    by_type: dict[str, Any] = {}
    for t in sorted({r["content_type"] or "-" for r in scored}):
        part = [r for r in scored if (r["content_type"] or "-") == t]
        by_type[t] = {
            **_means(part),
            "n_closed": sum(r["answer_type"] == "CLOSED" for r in part),
            "n_open": sum(r["answer_type"] == "OPEN" for r in part),
        }
    return {
        "means": means,
        "intervals": intervals,
        "n_closed": sum(r["answer_type"] == "CLOSED" for r in scored),
        "n_open": sum(r["answer_type"] == "OPEN" for r in scored),
        "n_images": len({r["image_id"] for r in scored}),
        "by_type": by_type,
        "per_question": scored,
    }


def paired_test(a: list[float], b: list[float], groups: list[str], n_boot: int = 2000, seed: int = 0) -> float:
    """One-sided p-value that mean(a) > mean(b) by a paired bootstrap over groups (images)."""
    diff: dict[str, list[float]] = {}
    for x, y, g in zip(a, b, groups, strict=True):
        diff.setdefault(g, []).append(x - y)
    keys = list(diff)
    sums = np.array([sum(diff[k]) for k in keys])
    counts = np.array([len(diff[k]) for k in keys])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), (n_boot, len(keys)))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    return float((np.sum(means <= 0) + 1) / (n_boot + 1))
