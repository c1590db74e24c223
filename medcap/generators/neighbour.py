"""Neighbour captioners and the constant baseline: the training-free generators.

``nearest`` copies the caption of the most similar training image. ``consensus`` picks, among the
k neighbours' captions, the one most similar on average to the other neighbours' captions — the
retrieval analogue of minimum-Bayes-risk decoding, and a strong ImageCLEF baseline. ``constant``
writes one caption for every image, the training caption most similar on average to a sample of the
others: the floor that shows how much a metric rewards generic text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import GeneratorConfig
from medcap.generators.kind import Generator, GeneratorKind
from medcap.models.similarity import constant_caption, get_similarity, pick_consensus
from medcap.records import Candidate, NeighbourList

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline


@dataclass
class ConsensusConfig(GeneratorConfig):
    """The settings of ``consensus`` and ``constant`` (``nearest`` has none)."""

    kind: str = "consensus"  # consensus | constant
    similarity: str = "rouge1"  # rouge1 | embedding | bertscore
    k: int | None = None  # consensus: neighbours considered (None: all); constant: captions sampled (None: 300)


def nearest(cfg: GeneratorConfig, neighbours: list[NeighbourList]) -> list[Candidate]:
    """The caption of each image's nearest neighbour that has one."""
    out = []
    for row in neighbours:
        hit = next((n for n in row.neighbours if n.caption), None)
        if hit is None:
            raise ValueError(f"image {row.id}: no neighbour with a caption; is the index split captioned?")
        out.append(Candidate(row.id, hit.caption, cfg.name, {"source": hit.id, "score": hit.score}))
    return out


def consensus(cfg: ConsensusConfig, neighbours: list[NeighbourList]) -> list[Candidate]:
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


class ConstantKind(GeneratorKind):
    """One caption for every image: the index split's most typical caption (``k`` captions sampled, default 300)."""

    def settings(self, pipe: Pipeline, cfg: GeneratorConfig) -> Any:
        # the run seed draws the sample; the index split's captions are the pool
        return cfg.similarity, cfg.k, pipe.cfg.seed, pipe.data_key(pipe.cfg.data.index_split)

    def build(self, pipe: Pipeline, cfg: GeneratorConfig, split: str, model_dir: Path) -> Generator:
        captions = [ex.caption for ex in pipe.split(pipe.cfg.data.index_split).examples if ex.caption]
        text = constant_caption(captions, get_similarity(cfg.similarity), cfg.k or 300, pipe.cfg.seed)
        return lambda items: [Candidate(ex.id, text, cfg.name, {"source": "constant"}) for ex, _ in items]

    def chunk(self, cfg: GeneratorConfig) -> int:
        return 1024


NEAREST = NeighbourKind(nearest)
CONSENSUS = NeighbourKind(consensus)
CONSTANT = ConstantKind()
