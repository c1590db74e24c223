"""Neighbour captioners: the first, training-free generators.

``nearest`` copies the caption of the most similar training image. ``consensus`` picks, among the
k neighbours' captions, the one most similar on average to the other neighbours' captions — the
retrieval analogue of minimum-Bayes-risk decoding, and a strong ImageCLEF baseline.
"""

from __future__ import annotations

from medcap.config import GeneratorConfig
from medcap.records import Candidate, NeighbourList
from medcap.similarity import get_similarity, pick_consensus


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
    similarity = get_similarity(cfg.similarity)
    out = []
    for row in neighbours:
        hits = [n for n in row.neighbours if n.caption][: cfg.k or None]
        if not hits:
            raise ValueError(f"image {row.id}: no neighbour with a caption; is the index split captioned?")
        best = pick_consensus([n.caption for n in hits], similarity)
        out.append(Candidate(row.id, hits[best].caption, cfg.name, {"source": hits[best].id}))
    return out
