"""Image-caption metrics: CLIPScore and RefCLIPScore (Hessel et al., 2021) with a configurable encoder.

- CLIPScore ``= w * max(cos(image, caption), 0)`` with ``w = 2.5``; this is also the 2025/2026
  organisers' image-caption "similarity" (they embed with MedImageInsight; medcap takes any
  encoder of :func:`medcap.retrieval.encoders.load_encoder`, BiomedCLIP by default).
- RefCLIPScore ``= harmonic mean(CLIPScore, max(max_r cos(caption, r), 0))``: the reference term
  is the best caption-reference cosine, *not* scaled by ``w`` (Hessel et al.'s definition and code).

Captions are embedded as given: the organisers do not preprocess them for the similarity, and
no "A photo depicts" prefix is added. An empty caption scores 0 (the 2026 evaluator's rule).
The offline encoder ``medcap-effnet-minilm`` has an untrained (random) text projection, so its
scores mean nothing until that projection is trained contrastively; use it only to run the code.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from medcap.config import EncoderConfig
from medcap.records import Example

log = logging.getLogger(__name__)

CLIP_WEIGHT = 2.5


def clip_scores(
    examples: list[Example],
    hyps: dict[str, str],
    encoder_cfg: EncoderConfig,
    *,
    refs: dict[str, list[str]] | None = None,
    w: float = CLIP_WEIGHT,
    encoder: Any = None,
) -> dict[str, tuple[float, dict[str, float]]]:
    """``{"clipscore": (corpus, per_image), "refclipscore": (corpus, per_image)}`` for ``examples``.

    Every example needs an image and a hypothesis in ``hyps``. References come from ``refs``
    (``{id: [captions]}``) or else the examples' captions; without any, RefCLIPScore is left out.
    ``encoder`` (an already loaded :class:`~medcap.retrieval.encoders.Encoder`) skips loading.
    Corpus values are means over the images.
    """
    from medcap.data import load_image

    missing = [e.id for e in examples if hyps.get(e.id) is None]
    if missing:
        raise ValueError(f"no hypothesis caption for {len(missing)} image(s), e.g. {missing[:10]}")
    if refs is None:
        refs = {e.id: [e.caption] for e in examples if e.caption is not None}
    if encoder is None:
        from medcap.retrieval.encoders import load_encoder

        encoder = load_encoder(encoder_cfg)
    batch = max(1, encoder_cfg.batch_size)
    ids = [e.id for e in examples]
    image_vecs = [
        encoder.encode_images([load_image(e) for e in examples[s : s + batch]]) for s in range(0, len(examples), batch)
    ]
    images = np.concatenate(image_vecs) if image_vecs else np.zeros((0, 1), np.float32)
    captions = _embed(encoder, [hyps[i] for i in ids], batch)
    cos = np.sum(images * captions, axis=1) if len(ids) else np.zeros(0)
    empty = np.array([not hyps[i].strip() for i in ids], dtype=bool)
    clip = np.where(empty, 0.0, w * np.maximum(cos, 0.0))
    out = {"clipscore": _result(ids, clip)}
    with_refs = [k for k, i in enumerate(ids) if refs.get(i)]
    if len(with_refs) == len(ids) and ids:
        flat = [(k, r) for k in with_refs for r in refs[ids[k]]]
        ref_vecs = _embed(encoder, [r for _, r in flat], batch)
        best = np.full(len(ids), -np.inf)
        for (k, _), v in zip(flat, ref_vecs, strict=True):
            best[k] = max(best[k], float(captions[k] @ v))
        ref_term = np.where(empty, 0.0, np.maximum(best, 0.0))
        total = clip + ref_term
        harmonic = np.divide(2 * clip * ref_term, total, out=np.zeros_like(total), where=total > 0)
        out["refclipscore"] = _result(ids, harmonic)
    else:
        log.warning(
            "RefCLIPScore left out: %d of %d images have no reference caption", len(ids) - len(with_refs), len(ids)
        )
    return out


def _embed(encoder: Any, texts: list[str], batch: int) -> np.ndarray:
    chunks = [encoder.encode_texts(texts[s : s + batch]) for s in range(0, len(texts), batch)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)


def _result(ids: list[str], values: np.ndarray) -> tuple[float, dict[str, float]]:
    per_image = {i: float(v) for i, v in zip(ids, values, strict=True)}
    corpus = float(np.mean(values)) if len(values) else float("nan")
    return corpus, per_image
