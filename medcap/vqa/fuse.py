"""The answer fuser: a weighted vote over the answerers' answer distributions.

Each answerer's ``scores`` (normalised answers summing to 1) are added with its weight (``weights``;
``closed_weights`` for closed questions), the sum is kept to what the question's answer type allows,
and the best answer wins.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from medcap.vqa.data import Question
from medcap.vqa.features import answer_type, restrict, top


def fuse(cfg: Any, questions: list[Question], per: dict[str, dict[str, dict[str, Any]]], use_type: bool) -> list[dict]:
    """One fused row per question from ``per`` (answerer -> question ID -> its answer row)."""
    out = []
    for q in questions:
        atype = answer_type(q, use_type)
        weights = cfg.closed_weights if atype == "CLOSED" and cfg.closed_weights else cfg.weights
        total: dict[str, float] = defaultdict(float)
        for name, rows in per.items():
            row = rows.get(q.qid)
            w = float(weights.get(name, 1.0))
            if row is None or w == 0:
                continue
            for a, s in (row.get("scores") or {row["answer"]: 1.0}).items():
                total[a] += w * float(s)
        scores = top(restrict(dict(total), q.question, atype)) if total else {"": 1.0}
        out.append(
            {"id": q.qid, "qid": q.raw_qid, "image": q.image_id, "answer": next(iter(scores)), "answerer": cfg.name,
             "scores": scores}
        )  # fmt: skip
    return out
