"""Pool MBR: minimum-Bayes-risk selection with a BERTScore utility over a wide hypothesis pool, in linear time.

For each image the fuser picks, from a pool of hypotheses, the one with the highest expected BERTScore
against *evidence*: the captions of its retrieved neighbours, weighted by similarity. With
``pool: index`` the hypotheses are the index's captions and sentences (the ``pool`` stage,
``fuser/pool.py``) and the candidates of the caption sets it reads; with ``pool: neighbours`` only the
neighbours' captions (each hypothesis's own evidence slot left out: classic MBR over the neighbours,
the baseline). The score of hypothesis ``h`` for image ``q``::

    sum_l w_l BS(h, e_l) - genericity * G(h) - length_penalty * |ln n(h) - median_l ln n(e_l)|
                         + image_text * cos(p_q, t_h)

``w_l = exp((s_l - s_1) / tau)`` normalised (uniform without ``tau``), over the top ``evidence_k``
neighbours' captions ``e_l`` with similarities ``s_l``; BS = BERTScore F1 on the organisers'
preprocessed text; G(h) = mean BS of ``h`` to a fixed sample of ``genericity_sample`` index captions
(BERTScore rewards generic text: this keeps the caption specific); n = ROUGE token count (length
calibration); ``p_q`` the image's predicted caption embedding (``retrieval.index.space: caption``) and
``t_h`` the hypothesis's MiniLM embedding.

Cost: per image, the ``shortlist`` hypotheses nearest the evidence's weighted centroid (FAISS) are
scored exactly against the evidence (``fuser/pool_score.py``): linear in the index and in the queries.
``shortlist: null`` scores every hypothesis against every index caption once per run (the exact,
quadratic baseline; MedPix: ~2,300 x 1,000 pairs). The fuser learns nothing from any query's reference;
a hypothesis that only the query's own case wrote is never offered to it. Measurements:
docs/results.md, docs/benchmarks.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import ConfigError, FuserConfig
from medcap.fuser import Fuse, FuserKind, Item
from medcap.keys import key_settings
from medcap.records import Candidate

if TYPE_CHECKING:
    from medcap.fuser.pool_score import Evidence, PoolScorer
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class PoolMBRConfig(FuserConfig):
    """Pool MBR's settings: the hypothesis pool, the evidence and its weights, the terms of the score."""

    kind: str = "pool-mbr"
    pool: str = "index"  # index (every index caption and sentence + candidates) | neighbours (their captions)
    sentences: bool = True  # each sentence of an index caption is a hypothesis too
    evidence_k: int = 200  # neighbours whose captions are the evidence (at most retrieval.k)
    tau: float | None = 0.05  # evidence weights exp((s - s_1) / tau); None: uniform
    genericity: float = 0.1  # weight of the penalty on a hypothesis's mean BERTScore to the index captions
    length_penalty: float = 0.01  # weight of |ln length - median ln length of the evidence|
    image_text: float = 0.1  # weight of cos(image's predicted caption embedding, hypothesis embedding)
    utility_model: str = "minilm"  # the BERTScore model of the utility (as eval.bertscore_model)
    shortlist: int | None = 16  # hypotheses per image scored exactly; null: every one (exact, quadratic)
    genericity_sample: int | None = 128  # index captions G averages over (seeded); null: all of them
    precision: str = "auto"  # BERTScore kernel: auto (bf16 on CUDA and AMX CPUs, else fp32) | fp32 | bf16

    def check(self, where: str) -> None:
        if self.pool not in ("index", "neighbours"):
            raise ConfigError(f"{where}.pool: {self.pool!r} is not one of ['index', 'neighbours']")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"{where}.precision: {self.precision!r} is not one of ['auto', 'bf16', 'fp32']")
        if self.shortlist is not None and self.shortlist < 1:
            raise ConfigError(
                f"{where}.shortlist: must be at least 1 (or null for the exact pool), got {self.shortlist}"
            )


@dataclass
class Scored:
    """Every term of the score of an image's hypotheses: pool rows first, then candidates outside the pool."""

    rows: np.ndarray  # pool rows (-1: a candidate)
    texts: list[str]  # raw text
    pre: list[str]  # preprocessed text
    sources: list[str]  # "index", or the caption set that wrote it
    bs: np.ndarray  # (n, evidence) BERTScore
    expected: np.ndarray  # sum_l w_l BS(h, e_l)
    genericity: np.ndarray
    log_len: np.ndarray
    image_text: np.ndarray
    score: np.ndarray  # pool-MBR's score
    extra_tokens: tuple[np.ndarray, np.ndarray]  # token embeddings and weights of the candidates outside the pool


def score_hypotheses(
    cfg: PoolMBRConfig, scorer: PoolScorer, bs_source: Any, ev: Evidence, rows: np.ndarray,
    candidates: dict[str, str], projected: np.ndarray | None,
) -> Scored:  # fmt: skip
    """Pool-MBR's terms and score for pool ``rows`` and the candidates (any not in the pool are added)."""
    pool = scorer.pool
    extra = scorer.extra(candidates)
    bs = bs_source.row_bs(rows, ev.rows)
    g = bs_source.row_genericity(rows) if cfg.genericity else np.zeros(len(rows))
    vectors = np.asarray(pool.vectors[rows], dtype=np.float64)
    log_len = pool.log_len[rows]
    if extra.texts:
        bs = np.concatenate([bs, scorer.kernel(extra.emb, extra.tok_w, ev.rows)])
        g_extra = scorer.text_genericity(extra.emb, extra.tok_w) if cfg.genericity else np.zeros(len(extra.texts))
        g = np.concatenate([g, g_extra])
        vectors = np.concatenate([vectors, extra.vectors])
        log_len = np.concatenate([log_len, extra.log_len])
    expected = bs @ ev.weights
    image_text = vectors @ projected if projected is not None else np.zeros(len(log_len))
    score = expected - cfg.genericity * g - cfg.length_penalty * np.abs(log_len - ev.median_log_len)
    if cfg.image_text:
        score = score + cfg.image_text * image_text
    written = {t: n for n, t in reversed(_preprocessed(candidates).items())}  # credit the first set that wrote a row
    sources = [written.get(pool.text[r], "index") for r in rows] + extra.names
    texts = [pool.raw[r] for r in rows] + extra.raw
    pre = [pool.text[r] for r in rows] + extra.texts
    rows = np.concatenate([rows, -np.ones(len(extra.texts), dtype=np.int64)])
    return Scored(rows, texts, pre, sources, bs, expected, g, log_len, image_text, score, (extra.emb, extra.tok_w))


def _with(rows: np.ndarray, more: list[int]) -> np.ndarray:
    have = set(rows.tolist())
    return np.concatenate([rows, np.array([r for r in more if r not in have], dtype=np.int64)])


def _preprocessed(candidates: dict[str, str]) -> dict[str, str]:
    from medcap.eval.imageclef import preprocess

    return {n: preprocess(c) for n, c in candidates.items() if c.strip()}


class PoolMBR:
    """The fuse function: each image's shortlist (or every allowed hypothesis) scored against its evidence."""

    def __init__(
        self, cfg: PoolMBRConfig, scorer: PoolScorer, projected: dict[str, np.ndarray], groups: dict[str, str]
    ):
        from medcap.fuser.pool_score import DenseBS

        self.cfg, self.scorer = cfg, scorer
        self.projected, self.groups = projected, groups  # image -> predicted caption embedding, image -> case
        self.bs_source = DenseBS(scorer, cfg.name) if cfg.shortlist is None else scorer

    def __call__(self, items: list[Item]) -> list[Candidate]:
        cfg, scorer = self.cfg, self.scorer
        evidences = [scorer.evidence(i, nl, cfg.evidence_k, cfg.tau) for i, _, nl in items]
        if cfg.pool == "neighbours":
            return [self.neighbour_mbr(i, ev) for (i, _, _), ev in zip(items, evidences, strict=True)]
        groups = [self.groups.get(i, i) for i, _, _ in items]
        if cfg.shortlist is None:
            rows = [scorer.allowed_rows(g) for g in groups]
        else:  # the shortlist, then the candidates' own pool rows
            found = scorer.shortlists(evidences, groups, cfg.shortlist)
            rows = [_with(r, scorer.candidate_rows(c, g)) for r, (_, c, _), g in zip(found, items, groups, strict=True)]
        out = []
        for (image_id, candidates, _), ev, r in zip(items, evidences, rows, strict=True):
            s = score_hypotheses(cfg, scorer, self.bs_source, ev, r, candidates, self.projected.get(image_id))
            best = int(np.argmax(s.score))  # ties: the first (the shortlist's nearest, or the pool's order)
            extra = {"source": s.sources[best], "score": round(float(s.score[best]), 6)}
            out.append(Candidate(image_id, s.texts[best], cfg.name, extra))
        return out

    def neighbour_mbr(self, image_id: str, ev: Evidence) -> Candidate:
        """Classic MBR over the neighbours' captions: each hypothesis's own evidence slot left out.

        With a shortlist, only the ``shortlist`` slots whose captions are nearest the evidence's
        centroid are scored (against every slot); ties go to the nearer neighbour.
        """
        cfg, scorer = self.cfg, self.scorer
        slots = np.arange(len(ev.rows))
        if cfg.shortlist is not None and cfg.shortlist < len(slots):
            vectors = np.asarray(scorer.pool.vectors[ev.rows], dtype=np.float64)
            near = vectors @ (ev.weights @ vectors)
            slots = np.sort(np.argsort(-near, kind="stable")[: cfg.shortlist])
        rows = ev.rows[slots]
        u = self.bs_source.row_bs(rows, ev.rows) * ev.weights[None, :]
        u[np.arange(len(slots)), slots] = 0.0
        score = u.sum(axis=1) / np.maximum(ev.weights.sum() - ev.weights[slots], 1e-12)
        if cfg.genericity:
            score = score - cfg.genericity * self.bs_source.row_genericity(rows)
        score = score - cfg.length_penalty * np.abs(scorer.pool.log_len[rows] - ev.median_log_len)
        best = int(np.argmax(score))
        hit = ev.hits[int(slots[best])]
        return Candidate(image_id, hit.caption, cfg.name, {"source": hit.id, "score": round(float(score[best]), 6)})


def pool_scorer(pipe: Pipeline, cfg: Any) -> PoolScorer:
    """The run's scorer over the pool of ``cfg.utility_model`` (shared by the fusers of this process)."""
    from medcap.eval.metrics import load_bertscorer
    from medcap.fuser.pool import HypothesisPool
    from medcap.fuser.pool_score import PoolScorer, kernel_dtype
    from medcap.retrieval.stages import sentence_model_of

    folder = pipe.path("pool", cfg.utility_model)

    def build() -> PoolScorer:
        bert = pipe.resource(
            ("bertscorer", cfg.utility_model), lambda: load_bertscorer(cfg.utility_model, batch_size=64, device="cpu")
        )
        return PoolScorer(
            HypothesisPool.load(folder), bert, sentence_model_of(pipe), sentences=cfg.sentences,
            genericity_sample=cfg.genericity_sample, seed=pipe.cfg.seed, dtype=kernel_dtype(cfg.precision),
        )  # fmt: skip

    key = ("pool-scorer", str(folder), cfg.sentences, cfg.genericity_sample, cfg.precision)
    return pipe.resource(key, build)


def projected_queries(pipe: Pipeline, split: str) -> dict[str, np.ndarray]:
    """Each image's predicted caption embedding (caption space): the image-text term's ``p_q``."""
    from medcap.retrieval.stages import query_projections

    ids, vectors = query_projections(pipe, split)
    return dict(zip(ids, np.asarray(vectors, dtype=np.float64), strict=True))


class PoolMBRKind(FuserKind):
    uses_neighbours = True

    def settings(self, pipe: Pipeline, cfg: PoolMBRConfig) -> Any:
        from medcap.fuser.pool_score import kernel_dtype

        # the genericity sample is drawn with the run seed; auto precision resolves on this machine
        return key_settings(cfg), pipe.cfg.seed, str(kernel_dtype(cfg.precision))

    def needs(self, pipe: Pipeline, cfg: PoolMBRConfig, split: str) -> list[tuple]:
        return [("retrieve", split), ("pool", cfg.utility_model)] + (
            [("embed", split), ("index",)] if cfg.image_text else []
        )

    def build(self, pipe: Pipeline, cfg: PoolMBRConfig, split: str) -> Fuse:
        if cfg.image_text and pipe.cfg.retrieval.index.space != "caption":
            raise ConfigError(
                f"fusers.{cfg.name}.image_text needs retrieval.index.space: caption (the image's predicted caption "
                "embedding); set it to 0 for image-space retrieval"
            )
        projected = projected_queries(pipe, split) if cfg.image_text else {}
        groups = {ex.id: str(ex.group or ex.id) for ex in pipe.split(split).examples}
        return PoolMBR(cfg, pool_scorer(pipe, cfg), projected, groups)


POOL_MBR = PoolMBRKind()
