"""Answer fusers: a weighted vote over the answerers' answer distributions, with given or learned weights.

``vote``: each answerer's ``scores`` (normalised answers summing to 1) are added with its weight
(``weights``; ``closed_weights`` for closed questions), the sum is kept to what the question's answer type
allows, and the best answer wins. ``mbr``: the same sum, then the answer with the highest expected token F1
against all the weighted answers (minimum Bayes risk: a consensus of the answerers' wordings). ``learned``: the same vote, its weights for closed and for open questions
chosen from ``grid`` by accuracy on the index split's own questions, each answered without its own image
(cross-fitted), so no weight is fitted on an answer that saw its question.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import numpy as np

from medcap.vqa.data import Question
from medcap.vqa.features import answer_row, answer_type, restrict
from medcap.vqa.metrics import scores_one
from medcap.vqa.normalize import normalize


def fuse(
    cfg: Any,
    questions: list[Question],
    per: dict[str, dict[str, dict[str, Any]]],
    use_type: bool,
    weights: dict[str, dict[str, float]] | None = None,
) -> list[dict]:
    """One fused row per question from ``per`` (answerer -> question ID -> its answer row); ``weights`` by answer
    type (CLOSED/OPEN) override the config's."""
    out = []
    for q in questions:
        atype = answer_type(q, use_type)
        if weights is not None:
            w_of = weights[atype]
        else:
            w_of = cfg.closed_weights if atype == "CLOSED" and cfg.closed_weights else cfg.weights
        total: dict[str, float] = defaultdict(float)
        for name, rows in per.items():
            row = rows.get(q.qid)
            w = float(w_of.get(name, 1.0))
            if row is None or w == 0:
                continue
            for a, s in (row.get("scores") or {row["answer"]: 1.0}).items():
                total[a] += w * float(s)
        kept = restrict(dict(total), q.question, atype) if total else {"": 1.0}
        if cfg.kind == "mbr" and len(kept) > 1:
            kept = {c: sum(w * scores_one(c, h)["f1"] for h, w in kept.items()) + 1e-9 for c in kept}
        out.append(answer_row(q, kept, cfg.name))
    return out


def fit_weights(
    grid: list[float], questions: list[Question], per: dict[str, dict[str, dict[str, Any]]], use_type: bool
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """For closed and for open questions, the answerers' weights from ``grid`` that answer the most of
    ``questions`` right (ties: the combination listed first, equal weights before others); and that accuracy."""
    names = list(per)
    combos = [c for c in itertools.product(grid, repeat=len(names)) if any(c)]
    equal = tuple(1.0 for _ in names)
    if equal in combos:
        combos.remove(equal)
        combos.insert(0, equal)
    chosen, accuracy = {}, {}
    for atype in ("CLOSED", "OPEN"):
        qs = [q for q in questions if answer_type(q, use_type) == atype and q.answer is not None]
        if not qs:
            chosen[atype], accuracy[atype] = dict(zip(names, equal, strict=True)), float("nan")
            continue
        mats, golds = [], []
        for q in qs:
            cands = sorted({a for n in names for a in (per[n].get(q.qid, {}).get("scores") or {})})
            allowed = list(restrict(dict.fromkeys(cands, 1.0), q.question, atype)) if cands else []
            m = np.array([[float((per[n].get(q.qid, {}).get("scores") or {}).get(a, 0.0)) for n in names]
                          for a in allowed]).reshape(len(allowed), len(names))  # fmt: skip
            mats.append((allowed, m))
            golds.append(normalize(q.answer))
        best, best_acc = combos[0], -1.0
        for c in combos:
            w = np.asarray(c)
            right = sum(bool(a) and a[int(np.argmax(m @ w))] == g for (a, m), g in zip(mats, golds, strict=True))
            if right / len(qs) > best_acc:
                best, best_acc = c, right / len(qs)
        chosen[atype], accuracy[atype] = dict(zip(names, best, strict=True)), best_acc
    return chosen, accuracy
