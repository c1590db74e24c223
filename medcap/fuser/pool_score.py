"""Per-image scoring over a hypothesis pool, in time linear in the index: what pool-MBR and the ranker share.

For one image the work is a shortlist and one small exact computation, never a pass over the pool
(MBR with reference aggregation, Vamvas & Sennrich 2024):

1. **evidence**: the top ``evidence_k`` neighbours' captions (pool rows), weighted by similarity;
2. **shortlist**: the pool rows nearest (inner product of MiniLM sentence embeddings, FAISS) to the
   evidence's weighted centroid, minus rows only the image's own case wrote, plus its candidates;
3. **exact BERTScore** of the shortlist x the evidence from the pool's cached token embeddings
   (``eval.bertscore.greedy_f1``; bf16 where the CPU has AMX or on CUDA);
4. the terms that need no evidence: genericity G(h), the mean BERTScore of ``h`` to a fixed seeded
   sample of the index's captions (memoised per row), ROUGE length, and the image-text cosine.

``DenseBS`` is the quadratic baseline (every row x every index caption, once per run): with it, and
with a shortlist that is the whole pool, the scores are the exact pool-MBR's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medcap.eval.bertscore import match_tokens, prepare_tokens
from medcap.fuser.pool import HypothesisPool, embed_texts, ntokens, pad_tokens

log = logging.getLogger(__name__)

HYP_CHUNK, REF_CHUNK = 8, 128  # hypotheses x references matched at once, sorted by length (8: the block fits a cache)
FP32_HYP_CHUNK = 64  # in fp32 (MKL compiles nothing): free shapes, larger blocks (bench/pool_kernel.py)


def kernel_dtype(precision: str) -> Any:
    """The torch dtype of the BERTScore kernel: bf16 on CUDA and on CPUs with AMX (``auto``), else fp32."""
    import torch

    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision: {precision!r} is not one of auto | fp32 | bf16")
    return torch.bfloat16 if torch.cuda.is_available() or _has_amx() else torch.float32


ROW_STEP, TOKEN_STEP = 8, 8  # a block's texts and tokens rounded up to these: few distinct matrix shapes
SLACK = 1.25  # a block's longest text is at most this many times its shortest (+ SLACK_TOKENS): little padding
SLACK_TOKENS = 4


def _chunks(lengths: np.ndarray, size: int, slack: float | None = SLACK) -> list[np.ndarray]:
    """Positions sorted by length, cut into blocks of at most ``size`` whose lengths are close (``slack``; None:
    blocks of ``size`` whatever their lengths).

    Every block pads to its longest text and the kernel's work is (sum of padded lengths)^2: one block of an
    image's 64 hypotheses padded to its 200-token outlier did ~10x the work of the real tokens. In bf16 the
    hypotheses' blocks take no slack: a block of 8 sorted texts pads few tokens, while cutting an image's ~18
    hypotheses into many short blocks, each padded to ``ROW_STEP`` texts, cost 1.3x (10k bench, shortlist 16).
    """
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    blocks, start = [], 0
    for k in range(1, len(order) + 1):
        last = k == len(order)
        far = not last and slack is not None and lengths[order[k]] > slack * lengths[order[start]] + SLACK_TOKENS
        if last or k - start >= size or far:
            blocks.append(order[start:k])
            start = k
    return blocks


def _shape(n: int, width: int, dtype: Any, pad: bool | None) -> tuple[int, int]:
    """A block's (texts, tokens): in bf16 rounded up to ``ROW_STEP`` x ``TOKEN_STEP`` (few shapes to compile)."""
    import torch

    if not (dtype == torch.bfloat16 if pad is None else pad):  # fp32 products compile nothing: padding only adds work
        return n, width
    return -(-n // ROW_STEP) * ROW_STEP, -(-width // TOKEN_STEP) * TOKEN_STEP


def _prepared(
    emb: np.ndarray, tok_w: np.ndarray, lengths: np.ndarray, side: str, dtype: Any, pad: bool | None = None
) -> Any:
    """``prepare_tokens`` of a block; in bf16 zero-padded to ``ROW_STEP`` texts and ``TOKEN_STEP`` tokens.

    oneDNN compiles a bf16 matrix product for each new shape (~40 ms on a 2-core Xeon, as long as the product
    itself): blocks of free shapes spent most of their time compiling. Padding texts have no tokens and
    score NaN; callers keep only the real rows and columns.
    """
    n, width = len(lengths), int(lengths.max())
    rows, cols = _shape(n, width, dtype, pad)
    if (rows, cols) == (n, width):
        return prepare_tokens(np.ascontiguousarray(emb[:, :width]), tok_w[:, :width], lengths, side, dtype)
    e = np.zeros((rows, cols, emb.shape[2]), dtype=np.float32)
    w = np.zeros((rows, cols), dtype=np.float32)
    e[:n, :width], w[:n, :width] = emb[:, :width], tok_w[:, :width]
    return prepare_tokens(e, w, np.concatenate([lengths, np.zeros(rows - n, dtype=lengths.dtype)]), side, dtype)


def _prepared_rows(pool: HypothesisPool, rows: np.ndarray, side: str, dtype: Any) -> Any:
    """:func:`_prepared` of pool ``rows``, gathered from the memory-mapped float16 tokens straight into the
    block (no float32 copy of the padded block: what ``pool.padded`` + ``_prepared`` cost per image)."""
    import torch

    from medcap.eval.bertscore import _PAD

    lengths = pool.lengths(rows)
    n, total, d = len(rows), int(lengths.sum()), pool.tokens.shape[1]
    n_pad, cols = _shape(n, int(lengths.max()), dtype, None)
    at = np.repeat(np.arange(n), lengths)  # each real token's text and position in it
    pos = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    idx = pos + np.repeat(pool.offsets[rows], lengths)
    hyp = side == "hyp"
    e = torch.zeros(n_pad, cols, d + 2, dtype=dtype)  # (1, PAD) | (PAD, 1) on padding, (1, 0) | (0, 1) on tokens
    e[..., d], e[..., d + 1] = (1.0, _PAD) if hyp else (_PAD, 1.0)
    e[at, pos, d + (1 if hyp else 0)] = 0.0
    e[at, pos, :d] = torch.from_numpy(np.asarray(pool.tokens[idx])).to(dtype)
    w = torch.zeros(n_pad, cols)
    w[at, pos] = torch.from_numpy(np.asarray(pool.weights[idx], dtype=np.float32))
    return e, w / w.sum(dim=1, keepdim=True)


def _has_amx() -> bool:
    try:
        return "amx_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@dataclass
class Evidence:
    """An image's evidence: neighbour hits, their pool rows, normalised weights, the median log length."""

    hits: list[Any]
    rows: np.ndarray
    weights: np.ndarray
    median_log_len: float


@dataclass
class Extra:
    """Candidates of an image that are not in the pool (a generator's own words), embedded on the fly."""

    names: list[str]  # the caption sets that wrote them
    raw: list[str]
    texts: list[str]  # preprocessed
    emb: np.ndarray  # (n, L, d) token embeddings
    tok_w: np.ndarray  # (n, L)
    vectors: np.ndarray  # (n, d_text) unit sentence embeddings
    log_len: np.ndarray


class PoolScorer:
    """The pool, its FAISS shortlist index, the kernel and the memoised genericity of one run and split."""

    def __init__(
        self,
        pool: HypothesisPool,
        bert: Any,
        text_model: Any,
        *,
        sentences: bool = True,
        genericity_sample: int | None = 128,
        seed: int = 0,
        dtype: Any = None,
    ):
        import torch

        self.pool, self.bert, self.text_model = pool, bert, text_model
        self.dtype = dtype or torch.float32
        self.allowed = np.arange(len(pool) if sentences else pool.captions)
        self.only = pool.only_group()
        images = sorted(pool.image_row)
        if genericity_sample is not None and genericity_sample < len(images):
            images = sorted(np.random.default_rng([seed, 7]).choice(images, genericity_sample, replace=False))
        self.sample_rows = np.array([pool.image_row[i] for i in images], dtype=np.int64)  # duplicates weigh
        self._g: dict[int, float] = {}
        self._index: Any = None
        self._sample_refs: Any = None

    # ------------------------------------------------------------------ evidence and shortlist
    def evidence(self, image_id: str, nl: Any, k: int, tau: float | None) -> Evidence:
        hits = [n for n in (nl.neighbours if nl else ()) if n.id in self.pool.image_row][:k]
        if not hits:
            raise ValueError(f"image {image_id}: no neighbour with an index caption to take evidence from")
        rows = np.array([self.pool.image_row[n.id] for n in hits], dtype=np.int64)
        s = np.array([n.score for n in hits], dtype=np.float64)
        w = np.ones(len(hits)) if tau is None else np.exp((s - s[0]) / tau)
        return Evidence(hits, rows, w / w.sum(), float(np.median(self.pool.log_len[rows])))

    def _faiss(self) -> Any:
        if self._index is None:
            import faiss

            vectors = np.ascontiguousarray(self.pool.vectors[self.allowed], dtype=np.float32)
            self._index = faiss.IndexFlatIP(vectors.shape[1])
            self._index.add(vectors)
        return self._index

    def shortlists(self, evidences: Sequence[Evidence], groups: Sequence[Any], m: int) -> list[np.ndarray]:
        """The ``m`` pool rows nearest to each image's weighted evidence centroid, never one that only its case wrote."""
        cents = np.stack([ev.weights @ np.asarray(self.pool.vectors[ev.rows], dtype=np.float64) for ev in evidences])
        cents = (cents / np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        margin = 64
        _, found = self._faiss().search(cents, min(m + margin, len(self.allowed)))
        out = []
        for hits, group in zip(found, groups, strict=True):
            rows = self.allowed[hits[hits >= 0]]
            rows = rows[[self.only[r] is None or self.only[r] != group for r in rows]]
            out.append(rows[:m])
        return out

    def row(self, text: str) -> int | None:
        """The pool row of preprocessed ``text`` among the rows this scorer offers (captions, and sentences)."""
        r = self.pool.row_of.get(text)
        return r if r is not None and r < len(self.allowed) else None

    def candidate_rows(self, candidates: dict[str, str], group: Any) -> list[int]:
        """Pool rows of the caption sets' candidates, but never one that only the image's own case wrote."""
        from medcap.eval.imageclef import preprocess

        rows = [self.row(preprocess(c)) for c in candidates.values() if c.strip()]
        return [r for r in dict.fromkeys(rows) if r is not None and (self.only[r] is None or self.only[r] != group)]

    def allowed_rows(self, group: Any) -> np.ndarray:
        """Every row the image may be given (the exact pool): all but those only its own case wrote."""
        return self.allowed[[self.only[r] is None or self.only[r] != group for r in self.allowed]]

    # ------------------------------------------------------------------ candidates outside the pool
    def extra(self, candidates: dict[str, str]) -> Extra:
        """The caption sets' candidates (name -> raw caption) whose preprocessed text is not a pool row."""
        from medcap.eval.imageclef import preprocess

        new = {name: (c, preprocess(c)) for name, c in candidates.items() if c.strip()}
        new = {name: rt for name, rt in new.items() if rt[1].strip() and self.row(rt[1]) is None}
        texts = [t for _, t in new.values()]
        if not texts:
            return Extra(
                [], [], [], np.zeros((0, 1, 1), np.float32), np.zeros((0, 1), np.float32), np.zeros((0, 1)), np.zeros(0)
            )
        pairs, vectors = embed_texts(self.bert, self.text_model, texts)
        emb, w = pad_tokens(pairs)
        log_len = np.log([ntokens(t) for t in texts])
        return Extra(list(new), [r for r, _ in new.values()], texts, emb, w, np.asarray(vectors, np.float64), log_len)

    # ------------------------------------------------------------------ BERTScore
    def kernel(self, emb: np.ndarray, tok_w: np.ndarray, ref_rows: np.ndarray) -> np.ndarray:
        """BERTScore F1 (n_hyp, n_ref) of hypotheses given as padded token embeddings against pool rows ``ref_rows``."""
        lengths = (np.abs(emb).sum(axis=-1) > 0).sum(axis=1)
        return self._match(lambda idx: self._given(emb, tok_w, lengths, idx), lengths, self._refs(ref_rows))

    def _given(self, emb: np.ndarray, tok_w: np.ndarray, lengths: np.ndarray, idx: np.ndarray) -> Any:
        return _prepared(emb[idx], tok_w[idx], lengths[idx], "hyp", self.dtype)

    def row_bs(self, rows: np.ndarray, ref_rows: np.ndarray) -> np.ndarray:
        """BERTScore of pool ``rows`` against pool rows ``ref_rows`` (the shortlist x the evidence)."""
        rows = np.asarray(rows, dtype=np.int64)
        refs = self._refs(ref_rows)
        return self._match(
            lambda idx: _prepared_rows(self.pool, rows[idx], "hyp", self.dtype), self.pool.lengths(rows), refs
        )

    def _refs(self, ref_rows: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, Any]]]:
        """Pool rows as prepared reference blocks of similar length (each distinct row gathered and padded once;
        neighbours of one case share a caption); with the column of each given row among the distinct ones."""
        distinct, inverse = np.unique(np.asarray(ref_rows, dtype=np.int64), return_inverse=True)
        lengths = self.pool.lengths(distinct)
        blocks = []
        for idx in _chunks(lengths, REF_CHUNK):
            blocks.append((idx, _prepared_rows(self.pool, distinct[idx], "ref", self.dtype)))
        return inverse.reshape(-1), blocks

    def _match(self, hyp: Any, hyp_len: np.ndarray, refs: tuple[np.ndarray, list]) -> np.ndarray:
        """Hypotheses (``hyp(positions)``: a prepared block) x prepared references in blocks of similar length
        (little padding), as ``BertScorer.block``."""
        import torch

        columns, blocks = refs
        n_distinct = sum(len(idx) for idx, _ in blocks)
        out = np.zeros((len(hyp_len), n_distinct))
        if not len(hyp_len) or not n_distinct:
            return out[:, columns]
        with torch.inference_mode():
            bf16 = self.dtype == torch.bfloat16
            for hidx in _chunks(hyp_len, HYP_CHUNK if bf16 else FP32_HYP_CHUNK, None if bf16 else SLACK):
                prepared = hyp(hidx)
                for ridx, r in blocks:
                    out[np.ix_(hidx, ridx)] = match_tokens(prepared, r)[: len(hidx), : len(ridx)].double().numpy()
        return out[:, columns]

    def _sample_weights(self) -> tuple[np.ndarray, np.ndarray]:
        distinct, inverse = np.unique(self.sample_rows, return_inverse=True)
        counts = np.bincount(inverse, minlength=len(distinct)).astype(np.float64)
        return distinct, counts / counts.sum()

    def _genericity(self, hyp: Any, lengths: np.ndarray) -> np.ndarray:
        distinct, weight = self._sample_weights()
        if self._sample_refs is None:  # the sample is the same for every hypothesis: prepared once
            self._sample_refs = self._refs(distinct)
        return self._match(hyp, lengths, self._sample_refs) @ weight

    def text_genericity(self, emb: np.ndarray, tok_w: np.ndarray) -> np.ndarray:
        """G of hypotheses given as token embeddings: mean BERTScore to the index sample."""
        lengths = (np.abs(emb).sum(axis=-1) > 0).sum(axis=1)
        return self._genericity(lambda idx: self._given(emb, tok_w, lengths, idx), lengths)

    def row_genericity(self, rows: np.ndarray) -> np.ndarray:
        """G of pool rows, memoised for the run: each row is scored against the sample once."""
        todo = np.array(sorted({int(r) for r in rows if int(r) not in self._g}), dtype=np.int64)
        if len(todo):
            hyp = lambda idx: _prepared_rows(self.pool, todo[idx], "hyp", self.dtype)  # noqa: E731
            self._g.update(zip(todo.tolist(), self._genericity(hyp, self.pool.lengths(todo)).tolist(), strict=True))
        return np.array([self._g[int(r)] for r in rows], dtype=np.float64)


class DenseBS:
    """The exact baseline: BERTScore of every pool row against every index caption, once (quadratic).

    It answers ``row_bs`` and ``row_genericity`` like :class:`PoolScorer`, from the matrix.
    """

    LARGE = 50_000_000  # pairs beyond which it warns: a ROCO-sized index needs the shortlist

    def __init__(self, scorer: PoolScorer, name: str):
        pool, self.scorer = scorer.pool, scorer
        n, m = len(scorer.allowed), pool.captions
        log.info("%s: scoring %d hypotheses x %d index captions (exact BERTScore)", name, n, m)
        if n * m > self.LARGE:
            log.warning("%s: %d x %d pairs is quadratic in the index: set a shortlist", name, n, m)
        self.matrix = np.zeros((len(pool), m), dtype=np.float64)
        for s in range(0, n, 1024):
            rows = scorer.allowed[s : s + 1024]
            self.matrix[rows] = scorer.row_bs(rows, np.arange(m))

    def row_bs(self, rows: np.ndarray, ref_rows: np.ndarray) -> np.ndarray:
        return self.matrix[np.ix_(rows, ref_rows)]

    def row_genericity(self, rows: np.ndarray) -> np.ndarray:
        distinct, weight = self.scorer._sample_weights()
        return self.matrix[np.ix_(rows, distinct)] @ weight
