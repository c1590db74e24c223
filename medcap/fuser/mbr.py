"""Training-free fusion: minimum-Bayes-risk selection and image-caption reranking.

These are the baselines the learned LM-Fuser must beat. Both pick one of the candidates, so the
fused caption is always a caption some generator wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import FuserConfig
from medcap.fuser import Fuse, FuserKind
from medcap.models.similarity import expected_utility, get_similarity
from medcap.records import Candidate

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

Item = tuple[str, dict[str, str]]  # image ID, {caption set: caption}


@dataclass
class MBRConfig(FuserConfig):
    """MBR over the candidates: the one with the highest mean utility against the others."""

    kind: str = "mbr"
    utility: str = "rouge1"  # rouge1 | bertscore | embedding


def mbr_fuse(cfg: MBRConfig, items: Sequence[Item]) -> list[Candidate]:
    """Per image, the candidate with the highest expected utility (mean similarity) against the others."""
    similarity = get_similarity(cfg.utility)
    out = []
    for image_id, candidates in items:
        names, captions = _unpack(image_id, candidates)
        utility = expected_utility(captions, similarity)
        best = int(np.argmax(utility))  # ties: the first generator in the config's order
        out.append(
            Candidate(
                image_id, captions[best], cfg.name, {"source": names[best], "utility": round(float(utility[best]), 6)}
            )
        )
    return out


def rerank_fuse(
    cfg: FuserConfig, items: Sequence[Item], image_vectors: dict[str, np.ndarray], encoder: Any
) -> list[Candidate]:
    """Per image, the candidate whose text embedding is closest to the image embedding (CLIP similarity).

    ``encoder`` is the retrieval encoder (``encode_texts``); ``image_vectors`` its L2-normalised image
    embeddings. Meaningful only for an encoder whose text tower was trained with its image tower.
    """
    out = []
    for image_id, candidates in items:
        names, captions = _unpack(image_id, candidates)
        texts = encoder.encode_texts(captions)
        scores = texts @ np.asarray(image_vectors[image_id], dtype=np.float32)
        best = int(np.argmax(scores))
        out.append(
            Candidate(
                image_id, captions[best], cfg.name, {"source": names[best], "similarity": round(float(scores[best]), 6)}
            )
        )
    return out


def _unpack(image_id: str, candidates: dict[str, str]) -> tuple[list[str], list[str]]:
    if not candidates:
        raise ValueError(f"image {image_id}: no candidates to fuse")
    names = list(candidates)
    return names, [candidates[n] for n in names]


class MBRKind(FuserKind):
    def build(self, pipe: Pipeline, cfg: FuserConfig, split: str) -> Fuse:
        return lambda items: mbr_fuse(cfg, [(i, c) for i, c, _ in items])


class RerankKind(FuserKind):
    """Reranking by the retrieval encoder's image-caption similarity (needs the split's embeddings)."""

    def needs(self, pipe: Pipeline, cfg: FuserConfig, split: str) -> list[tuple]:
        return [("embed", split)]

    def build(self, pipe: Pipeline, cfg: FuserConfig, split: str) -> Fuse:
        from medcap.retrieval.embed import load_embeddings
        from medcap.retrieval.stages import encoder_of

        ids, vectors = load_embeddings(pipe.path("embed", split))
        images = dict(zip(ids, vectors, strict=True))
        encoder = encoder_of(pipe)
        return lambda items: rerank_fuse(cfg, [(i, c) for i, c, _ in items], images, encoder)


MBR = MBRKind()
RERANK = RerankKind()
