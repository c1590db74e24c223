"""Shared fixtures: offline settings, a small phantom data set, a tiny random open_clip model."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id otherwise takes ~24 s to fail
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A 48-image phantom data set (train/valid/test), written once per session; treat it as read-only."""
    from medcap.data.phantom import write_phantom

    return write_phantom(tmp_path_factory.mktemp("data") / "phantom", n=48, seed=0, image_size=64)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """`local-dir:` name of a tiny random open_clip model saved to disk (the real loading code runs)."""
    from tiny_models import make_tiny_open_clip

    return make_tiny_open_clip(tmp_path_factory.mktemp("models") / "tiny_clip")
