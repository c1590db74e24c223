"""Retrieval steps that work on a whole run: contrastive training of the encoder's projections."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medcap.runs import safe_name

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline


def train_encoder(pipe: Pipeline, out: Path | None = None) -> tuple[str, Path]:
    """Train the run's encoder projections on the index split's pairs; returns (``local-dir:`` name, folder).

    Validates on the first captioned query split (else on a 10% hold-out of captions). The image
    side is left as it is by default, so the cached embeddings and the index stay valid.
    """
    from medcap.retrieval.contrastive import train_encoder as fit
    from medcap.retrieval.embed import load_embeddings

    enc, t, data = pipe.cfg.retrieval.encoder, pipe.cfg.retrieval.encoder_training, pipe.cfg.data

    def pairs(split: str):
        by_id = {e.id: e for e in pipe.split(split).examples}
        ids, vectors = load_embeddings(pipe.embed(split))
        keep = [k for k, i in enumerate(ids) if (by_id[i].caption or "").strip()]
        return [by_id[ids[k]] for k in keep], [by_id[ids[k]].caption for k in keep], vectors[keep]

    images, captions, vectors = pairs(data.index_split)
    valid = next((p for s in data.query_splits if s != data.index_split and (p := pairs(s))[1]), None)
    folder = out or pipe.run.root / "models" / f"encoder-{safe_name(enc.name)}"
    name = fit(
        enc,
        images,
        captions,
        folder,
        image_embeddings=vectors,
        valid=valid,
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr,
        seed=t.seed,
        train_text_tower=t.train_text_tower,
        train_image_projection=t.train_image_projection,
    )
    return name, folder
