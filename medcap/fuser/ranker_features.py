"""What the learned ranker sees of a hypothesis, and what it learns to predict.

Features of hypothesis ``h`` for image ``q`` (all computed from ``q``'s evidence, never its reference):
pool-MBR's terms (expected BERTScore under the similarity weights, genericity, length, image-text
cosine, the score and its rank), the same expectation under uniform weights over the top 5 / 20 / all
neighbours and the best BERTScore among the top 5, the expected ROUGE-1 against the evidence (the
metric BERTScore-MBR does not optimise), how much evidence weight sits on ``h`` itself, how many cases
wrote it, whether it is a sentence or a caption set's candidate, and the image's top similarities.
The target is the hypothesis's utility against the image's reference: BERTScore F1 and ROUGE-1 F,
the suite's preprocessing (training only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

FEATURES = (
    "score", "rank", "gap", "expected_bs", "genericity", "log_len", "length_gap", "image_text",
    "bs_top5", "bs_top20", "bs_all", "bs_max5", "r1_expected", "r1_top5", "r1_max5", "self_weight",
    "cases", "sentence", "extra", "s1", "s5",
)  # fmt: skip


class RougeBags:
    """ROUGE-1 of many hypotheses against many texts at once: bags of words as sparse count matrices.

    ``rouge_score`` tokenises preprocessed text on ``[a-z0-9]+`` without stemming; F = 2 * overlap /
    (len_h + len_r) with overlap = sum_w min(count_h(w), count_r(w)) = sum_t [count_h >= t] . [count_r >= t].
    """

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self._bags: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def bag(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if text not in self._bags:
            from collections import Counter

            from rouge_score import tokenize

            counts = Counter(tokenize.tokenize(text, None))
            ids = np.array([self.vocab.setdefault(w, len(self.vocab)) for w in counts], dtype=np.int64)
            self._bags[text] = (ids, np.array(list(counts.values()), dtype=np.int64))
        return self._bags[text]

    def f1(self, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        """(len(hyps), len(refs)) ROUGE-1 F (0 where either side has no token)."""
        from scipy import sparse

        for t in (*hyps, *refs):  # the vocabulary first: both matrices get its final width
            self.bag(t)

        def matrix(texts: Sequence[str]) -> tuple[Any, np.ndarray]:
            bags = [self.bag(t) for t in texts]
            rows = np.concatenate([np.full(len(i), k) for k, (i, _) in enumerate(bags)] or [np.zeros(0, np.int64)])
            cols = np.concatenate([i for i, _ in bags] or [np.zeros(0, np.int64)])
            vals = np.concatenate([c for _, c in bags] or [np.zeros(0, np.int64)])
            m = sparse.csr_matrix((vals, (rows, cols)), shape=(len(texts), max(len(self.vocab), 1)))
            return m, np.asarray(m.sum(axis=1)).ravel()

        h, lh = matrix(hyps)
        r, lr = matrix(refs)
        top = int(max(h.max() if h.nnz else 0, r.max() if r.nnz else 0))
        overlap = np.zeros((len(hyps), len(refs)))
        for t in range(1, top + 1):
            overlap += ((h >= t).astype(np.float64) @ (r >= t).astype(np.float64).T).toarray()
        denom = lh[:, None] + lr[None, :]
        return np.divide(2 * overlap, denom, out=np.zeros_like(overlap), where=denom > 0)


def features(scored: Any, ev: Any, pool: Any, rouge: RougeBags, candidate_names: Sequence[str]) -> np.ndarray:
    """(n, len(FEATURES) + len(candidate_names)) features of ``scored``'s hypotheses (pool_mbr.Scored)."""
    n = len(scored.rows)
    order = np.argsort(-scored.score, kind="stable")
    rank = np.empty(n)
    rank[order] = np.arange(n)
    w = ev.weights
    bs = scored.bs

    def uniform(k: int) -> np.ndarray:
        return bs[:, :k].mean(axis=1)

    ev_texts = [pool.text[r] for r in ev.rows]
    hyp_texts = [pool.text[r] if r >= 0 else t for r, t in zip(scored.rows, scored.pre, strict=True)]
    r1 = rouge.f1(hyp_texts, ev_texts)
    same = np.array([[h == e for e in ev_texts] for h in hyp_texts], dtype=np.float64)
    cases = np.array([len(pool.groups[r]) if r >= 0 else 0 for r in scored.rows], dtype=np.float64)
    sims = np.array([h.score for h in ev.hits], dtype=np.float64)
    cols = [
        scored.score,
        np.log1p(rank),
        scored.score - scored.score.max(),
        scored.expected,
        scored.genericity,
        scored.log_len,
        scored.log_len - ev.median_log_len,
        scored.image_text,
        uniform(5),
        uniform(20),
        uniform(bs.shape[1]),
        bs[:, :5].max(axis=1),
        r1 @ w,
        r1[:, :5].mean(axis=1),
        r1[:, :5].max(axis=1),
        same @ w,
        np.log1p(cases),
        np.array([r >= pool.captions for r in scored.rows], dtype=np.float64),
        np.array([r < 0 for r in scored.rows], dtype=np.float64),
        np.full(n, sims[0]),
        np.full(n, sims[: min(5, len(sims))].mean()),
    ]
    cols += [np.array([s == name for s in scored.sources], dtype=np.float64) for name in candidate_names]
    return np.stack(cols, axis=1)


def utilities(scored: Any, reference_row: int, scorer: Any, rouge: RougeBags) -> tuple[np.ndarray, np.ndarray]:
    """(BERTScore, ROUGE-1) of every hypothesis against the image's own reference (a pool row)."""
    pool = scorer.pool
    rows = scored.rows
    bs = np.zeros(len(rows))
    inside = rows >= 0
    if inside.any():
        bs[inside] = scorer.row_bs(rows[inside], np.array([reference_row]))[:, 0]
    if (~inside).any():
        emb, w = scored.extra_tokens
        bs[~inside] = scorer.kernel(emb, w, np.array([reference_row]))[:, 0]
    hyp_texts = [pool.text[r] if r >= 0 else t for r, t in zip(rows, scored.pre, strict=True)]
    r1 = rouge.f1(hyp_texts, [pool.text[reference_row]])[:, 0]
    return bs, r1
