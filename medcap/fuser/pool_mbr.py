"""Pool MBR: minimum-Bayes-risk selection with a BERTScore utility over a wide hypothesis pool.

For each image the fuser picks, from a pool of hypotheses, the one with the highest expected BERTScore
against *evidence*: the captions of its retrieved neighbours, weighted by similarity. With
``pool: index`` the hypotheses are every caption of the index split, each of their sentences (and the
first two sentences of longer captions), and the candidates of the caption sets it reads; with
``pool: neighbours`` only the neighbours' captions (each hypothesis's own evidence slot left out:
classic MBR over the neighbours, the baseline). The score of hypothesis ``h`` for image ``q``::

    sum_l w_l BS(h, e_l) - genericity * G(h) - length_penalty * |ln n(h) - median_l ln n(e_l)|
                         + image_text * cos(p_q, t_h)

``w_l = exp((s_l - s_1) / tau)`` normalised (uniform without ``tau``), over the top ``evidence_k``
neighbours' captions ``e_l`` with similarities ``s_l``; BS = BERTScore F1 on the organisers'
preprocessed text; G(h) = mean BS of ``h`` to the captions of all index images (BERTScore rewards
generic text: this keeps the caption specific); n = ROUGE token count (length calibration);
``p_q`` the image's predicted caption embedding (``retrieval.index.space: caption``) and ``t_h`` the
hypothesis's MiniLM embedding. Cost: ``pool: index`` scores every hypothesis against every distinct index
caption once per run (MedPix: ~2,300 x 1,000 pairs, about a minute on 2 cores); for a ROCO-sized index
(60,000 captions) that grows quadratically, and ``pool: neighbours`` is the one that scales. The fuser
learns nothing from any query's reference; a hypothesis that only the query's own case wrote is never
offered to it. Design and CV measurements: docs/results.md.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import ConfigError, FuserConfig
from medcap.eval.imageclef import preprocess
from medcap.fuser import Fuse, FuserKind, Item
from medcap.keys import key_settings
from medcap.records import Candidate

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_SENTENCE_WORDS = 3
LARGE_POOL = 50_000_000  # hypothesis x index-caption pairs beyond which the index pool is slow (ROCO-sized)


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

    def check(self, where: str) -> None:
        if self.pool not in ("index", "neighbours"):
            raise ConfigError(f"{where}.pool: {self.pool!r} is not one of ['index', 'neighbours']")


def ntokens(text: str) -> int:
    """ROUGE's token count of preprocessed text (at least 1)."""
    from rouge_score import tokenize

    return max(len(tokenize.tokenize(text, None)), 1)


def sentence_hypotheses(caption: str) -> list[str]:
    """Each sentence of ``caption`` and, for three or more, the first two together (raw text)."""
    parts = [s.strip() for s in _SENTENCE_END.split(caption.strip()) if s.strip()]
    if len(parts) < 2:
        return []
    return parts + ([" ".join(parts[:2])] if len(parts) >= 3 else [])


@dataclass
class Pool:
    """Hypotheses (raw text, preprocessed text, the cases that wrote them) and their scores against the index."""

    raw: list[str]
    text: list[str]
    groups: list[frozenset]
    distinct: list[str]  # distinct preprocessed index captions (the evidence vocabulary)
    bs: np.ndarray  # BS(hypothesis, distinct index caption), len(text) x len(distinct)
    genericity: np.ndarray  # G(hypothesis)
    log_len: np.ndarray  # ln n(hypothesis)
    text_vectors: np.ndarray | None  # unit MiniLM embeddings of the hypotheses (image_text term)
    only_group: dict[Any, list[int]]  # case -> hypotheses no other case wrote
    per_image: np.ndarray  # the distinct-caption column of each index image (G averages over images)


def index_hypotheses(captions: list[tuple[str, Any]], sentences: bool) -> tuple[list[str], list[str], list[set]]:
    """Every distinct index caption, then (optionally) every new sentence hypothesis, deduplicated on
    preprocessed text; with the set of cases (groups) whose captions gave each."""
    raw, text, groups, row = [], [], [], {}

    def add(r: str, group: Any) -> None:
        p = preprocess(r)
        if p not in row:
            row[p] = len(text)
            raw.append(r)
            text.append(p)
            groups.append(set())
        groups[row[p]].add(group)

    for caption, group in captions:
        add(caption, group)
    if sentences:
        for caption, group in captions:
            for s in sentence_hypotheses(caption):
                if len(preprocess(s).split()) >= MIN_SENTENCE_WORDS:
                    add(s, group)
    return raw, text, groups


def build_pool(
    cfg: PoolMBRConfig, captions: list[tuple[str, Any]], scorer: Any, text_model: Any | None, neighbours_only: bool
) -> Pool:
    """Score every hypothesis against every distinct index caption (query-independent: once per index)."""
    raw, text, groups = index_hypotheses(captions, cfg.sentences and not neighbours_only)
    distinct = sorted({preprocess(c) for c, _ in captions})
    col = {t: j for j, t in enumerate(distinct)}
    log.info("%s: scoring %d hypotheses x %d index captions (BERTScore)", cfg.name, len(text), len(distinct))
    if len(text) * len(distinct) > LARGE_POOL:
        log.warning(
            "%s: %d x %d BERTScore pairs is a large pool (MedPix: 2,300 x 1,000, ~1 min on 2 cores); "
            "pool: neighbours scores only each image's neighbours' captions",
            cfg.name, len(text), len(distinct),
        )  # fmt: skip
    bs = scorer.block(text, distinct)
    per_image = np.array([col[preprocess(c)] for c, _ in captions])
    genericity = bs[:, per_image].mean(axis=1) if cfg.genericity else np.zeros(len(text))
    vectors = None
    if cfg.image_text:
        vectors = np.asarray(text_model.encode(text, normalize_embeddings=True, convert_to_numpy=True), np.float64)
    only: dict[Any, list[int]] = defaultdict(list)
    for h, g in enumerate(groups):
        if len(g) == 1:
            only[next(iter(g))].append(h)
    return Pool(
        raw, text, [frozenset(g) for g in groups], distinct, bs, genericity,
        np.log([ntokens(t) for t in text]), vectors, dict(only), per_image,
    )  # fmt: skip


class PoolMBR:
    """The fuse function: scores the pool (and each image's candidates) against its neighbours' captions."""

    def __init__(
        self,
        cfg: PoolMBRConfig,
        pool: Pool,
        scorer: Any,
        text_model: Any,
        projected: dict[str, np.ndarray],
        groups: dict[str, Any],
    ):
        self.cfg, self.pool, self.scorer, self.text_model = cfg, pool, scorer, text_model
        self.projected, self.groups = projected, groups  # image -> predicted caption embedding, image -> case
        self.col = {t: j for j, t in enumerate(pool.distinct)}
        self.row = {t: h for h, t in enumerate(pool.text)}

    def __call__(self, items: list[Item]) -> list[Candidate]:
        return [self.fuse_one(image_id, candidates, nl) for image_id, candidates, nl in items]

    def evidence(self, image_id: str, nl: Any) -> tuple[list[Any], np.ndarray, np.ndarray]:
        """The top ``evidence_k`` neighbours, the columns (distinct index captions) of their captions, their weights."""
        hits = [n for n in (nl.neighbours if nl else ()) if n.caption and preprocess(n.caption) in self.col]
        hits = hits[: self.cfg.evidence_k]
        if not hits:
            raise ValueError(f"image {image_id}: no neighbour with an index caption to take evidence from")
        cols = np.array([self.col[preprocess(n.caption)] for n in hits])
        s = np.array([n.score for n in hits], dtype=np.float64)
        w = np.ones(len(hits)) if self.cfg.tau is None else np.exp((s - s[0]) / self.cfg.tau)
        return hits, cols, w / w.sum()

    def extra_rows(self, texts: list[str]) -> np.ndarray:
        """BS rows of hypotheses outside the pool (a generator's own words) against the index captions."""
        return self.scorer.block(texts, self.pool.distinct)

    def fuse_one(self, image_id: str, candidates: dict[str, str], nl: Any) -> Candidate:
        cfg, pool = self.cfg, self.pool
        hits, cols, w = self.evidence(image_id, nl)
        med = float(np.median(pool.log_len[self.rows_of(cols)]))
        if cfg.pool == "neighbours":
            return self.neighbour_mbr(image_id, hits, cols, w, med)
        score = (
            pool.bs[:, cols] @ w - cfg.genericity * pool.genericity - cfg.length_penalty * np.abs(pool.log_len - med)
        )
        if cfg.image_text:
            score = score + cfg.image_text * (pool.text_vectors @ self.projected[image_id])
        score[pool.only_group.get(self.groups.get(image_id), [])] = -np.inf  # never the own case's words
        best, source = int(np.argmax(score)), "index"
        extra = {n: c for n, c in candidates.items() if c.strip() and preprocess(c) not in self.row}
        if extra:
            rows = self.extra_rows([preprocess(c) for c in extra.values()])
            lens = np.log([ntokens(preprocess(c)) for c in extra.values()])
            s2 = rows[:, cols] @ w - cfg.length_penalty * np.abs(lens - med)
            if cfg.genericity:
                s2 -= cfg.genericity * rows[:, pool.per_image].mean(axis=1)
            if cfg.image_text:
                vec = self.text_model.encode([preprocess(c) for c in extra.values()], normalize_embeddings=True)
                s2 = s2 + cfg.image_text * (np.asarray(vec, np.float64) @ self.projected[image_id])
            j = int(np.argmax(s2))
            if s2[j] > score[best]:
                name = list(extra)[j]
                return Candidate(image_id, extra[name], cfg.name, {"source": name, "score": round(float(s2[j]), 6)})
        for name, c in candidates.items():  # credit the caption set that wrote the winner, when one did
            if preprocess(c) == pool.text[best]:
                source = name
                break
        return Candidate(image_id, pool.raw[best], cfg.name, {"source": source, "score": round(float(score[best]), 6)})

    def rows_of(self, cols: np.ndarray) -> np.ndarray:
        """The pool rows of distinct index captions (every index caption is a hypothesis too)."""
        return np.array([self.row[self.pool.distinct[c]] for c in cols])

    def neighbour_mbr(self, image_id: str, hits: list[Any], cols: np.ndarray, w: np.ndarray, med: float) -> Candidate:
        """Classic MBR over the neighbours' captions: each hypothesis's own evidence slot left out."""
        cfg, pool = self.cfg, self.pool
        rows = self.rows_of(cols)
        u = pool.bs[rows][:, cols] * w[None, :]
        np.fill_diagonal(u, 0.0)
        denom = np.maximum(w.sum() - w, 1e-12)
        score = u.sum(axis=1) / denom - cfg.genericity * pool.genericity[rows]
        score = score - cfg.length_penalty * np.abs(pool.log_len[rows] - med)
        best = int(np.argmax(score))  # ties: the nearer neighbour
        hit = hits[best]
        return Candidate(image_id, hit.caption, cfg.name, {"source": hit.id, "score": round(float(score[best]), 6)})


class PoolMBRKind(FuserKind):
    uses_neighbours = True

    def settings(self, pipe: Pipeline, cfg: PoolMBRConfig) -> Any:
        # the pool is the index split's captions
        return key_settings(cfg), pipe.data_key(pipe.cfg.data.index_split)

    def needs(self, pipe: Pipeline, cfg: PoolMBRConfig, split: str) -> list[tuple]:
        return [("retrieve", split)] + ([("embed", split), ("index",)] if cfg.image_text else [])

    def build(self, pipe: Pipeline, cfg: PoolMBRConfig, split: str) -> Fuse:
        from medcap.eval.metrics import load_bertscorer
        from medcap.retrieval.stages import load_projection, sentence_model_of

        if cfg.image_text and pipe.cfg.retrieval.index.space != "caption":
            raise ConfigError(
                f"fusers.{cfg.name}.image_text needs retrieval.index.space: caption (the image's predicted caption "
                "embedding); set it to 0 for image-space retrieval"
            )
        examples = pipe.split(pipe.cfg.data.index_split).examples
        captions = [(ex.caption, ex.group or ex.id) for ex in examples if (ex.caption or "").strip()]
        scorer = pipe.resource(
            ("bertscorer", cfg.utility_model), lambda: load_bertscorer(cfg.utility_model, batch_size=64, device="cpu")
        )
        text_model = sentence_model_of(pipe) if cfg.image_text else None
        pool = build_pool(cfg, captions, scorer, text_model, neighbours_only=cfg.pool == "neighbours")
        projected: dict[str, np.ndarray] = {}
        if cfg.image_text:
            from medcap.retrieval.embed import load_embeddings

            ids, vectors = load_embeddings(pipe.path("embed", split))
            projected = dict(zip(ids, load_projection(pipe)(vectors).astype(np.float64), strict=True))
        groups = {ex.id: ex.group or ex.id for ex in pipe.split(split).examples}
        return PoolMBR(cfg, pool, scorer, text_model, projected, groups)


POOL_MBR = PoolMBRKind()
