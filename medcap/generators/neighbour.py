"""Neighbour captioners: the first, training-free generators.

``nearest`` copies the caption of the most similar training image. ``consensus`` picks, among the
k neighbours' captions, the one most similar on average to the other neighbours' captions — the
retrieval analogue of minimum-Bayes-risk decoding, and a strong ImageCLEF baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medcap.config import GeneratorConfig
from medcap.generators.kind import Generator, GeneratorKind
from medcap.models.similarity import get_similarity, pick_consensus
from medcap.records import Candidate, NeighbourList

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline


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


class NeighbourKind(GeneratorKind):
    """A neighbour captioner as a generator kind: no model, nothing to train, cheap batches."""

    def __init__(self, fn):
        self.fn = fn

    def build(self, pipe: Pipeline, cfg: GeneratorConfig, split: str, model_dir: Path) -> Generator:
        return lambda items: self.fn(cfg, [nb for _, nb in items])

    def chunk(self, cfg: GeneratorConfig) -> int:
        return 256


NEAREST = NeighbourKind(nearest)
CONSENSUS = NeighbourKind(consensus)
