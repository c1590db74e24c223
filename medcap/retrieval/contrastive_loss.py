"""The contrastive objective and the retrieval measure of ``medcap train encoder``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

RECALL_KS = (1, 5, 10)


def infonce_loss(image: torch.Tensor, text: torch.Tensor, caption_ids: torch.Tensor, scale: torch.Tensor):
    """CLIP's symmetric InfoNCE on L2-normalised rows; pairs sharing a caption are not negatives.

    ``caption_ids[i]`` names the caption of pair ``i``; logits between different pairs with the
    same caption are set to -inf, so they drop out of both softmax denominators.
    """
    import torch
    import torch.nn.functional as F

    logits = scale * image @ text.T
    same = caption_ids[:, None] == caption_ids[None, :]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def recall_at_k(image: np.ndarray, text: np.ndarray, caption_ids: np.ndarray, ks=RECALL_KS) -> dict[str, float]:
    """Image->text and text->image recall@k; ``text`` holds one row per unique caption id.

    Image->text: the image's caption is among its k most similar captions. Text->image: one of
    the images with that caption is among the caption's k most similar images.
    """
    sims = image @ text.T  # [images, captions]
    out: dict[str, float] = {}
    i2t = np.argsort(-sims, axis=1)
    t2i = np.argsort(-sims.T, axis=1)
    for k in ks:
        out[f"i2t_r@{k}"] = float(np.mean([caption_ids[i] in i2t[i, :k] for i in range(len(image))]))
        out[f"t2i_r@{k}"] = float(np.mean([np.any(caption_ids[t2i[c, :k]] == c) for c in range(len(text))]))
    return out
