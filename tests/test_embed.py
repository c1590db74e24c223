"""Embeddings are cached by key and resume after a crash, embedding only the missing IDs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_models import make_tiny_open_clip

from medcap.config import EncoderConfig
from medcap.records import Example
from medcap.retrieval import embed as embed_module
from medcap.retrieval import encoders
from medcap.retrieval.embed import embed_examples, ids_path, load_embeddings, partial_dir
from medcap.runs import Manifest, is_fresh

pytest.importorskip("open_clip")


class Crash(RuntimeError):
    pass


class CountingEncoder:
    """Wraps a real encoder: counts the images it embeds and can crash after some batches."""

    def __init__(self, encoder, fail_after: int | None = None):
        self.encoder, self.fail_after = encoder, fail_after
        self.preprocess = encoder.preprocess
        self.batches = 0
        self.images = 0

    def encode_pixels(self, pixels):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise Crash("simulated crash")
        self.batches += 1
        self.images += len(pixels)
        return self.encoder.encode_pixels(pixels)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    cfg = EncoderConfig(name=make_tiny_open_clip(root / "tiny"), batch_size=3, device="cpu")
    rng = np.random.default_rng(0)
    examples = []
    for i in range(10):
        path = root / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(path)
        examples.append(Example(f"img{i}", path, f"caption {i}"))
    return cfg, examples, encoders.load_encoder(cfg)


def test_embeds_all_examples(setup, tmp_path):
    cfg, examples, encoder = setup
    out = tmp_path / "embeddings" / "tiny" / "train.npy"
    ids, vectors = embed_examples(cfg, examples, out, "key1", encoder=encoder)
    assert ids == [e.id for e in examples]
    assert vectors.dtype == np.float16 and vectors.shape == (10, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert json.loads(ids_path(out).read_text()) == ids
    manifest = Manifest.read(out)
    assert manifest.complete and manifest.key == "key1" and manifest.count == 10 and manifest.stage == "embed"
    assert not partial_dir(out).exists()
    loaded_ids, loaded = load_embeddings(out)
    assert loaded_ids == ids and np.array_equal(loaded, vectors)


def test_resume_after_crash_embeds_only_missing(setup, tmp_path):
    cfg, examples, encoder = setup
    reference = embed_examples(cfg, examples, tmp_path / "ref" / "train.npy", "key1", encoder=encoder)[1]

    out = tmp_path / "run" / "train.npy"
    crashing = CountingEncoder(encoder, fail_after=2)
    with pytest.raises(Crash):
        embed_examples(cfg, examples, out, "key1", encoder=crashing)
    assert not out.exists() and not is_fresh(out, "key1")
    chunks = sorted(partial_dir(out).glob("chunk-*.npy"))
    assert len(chunks) == 2 and crashing.images == 6

    counting = CountingEncoder(encoder)
    ids, vectors = embed_examples(cfg, examples, out, "key1", encoder=counting)
    assert counting.images == 4  # only the IDs the crash left
    assert ids == [e.id for e in examples]
    np.testing.assert_allclose(vectors.astype(np.float32), reference.astype(np.float32), atol=2e-3)
    assert is_fresh(out, "key1") and not partial_dir(out).exists()


def test_fresh_cache_does_not_load_the_encoder(setup, tmp_path, monkeypatch):
    cfg, examples, encoder = setup
    out = tmp_path / "train.npy"
    first = embed_examples(cfg, examples, out, "key1", encoder=encoder)

    def no_loading(_cfg):
        raise AssertionError("the encoder was loaded for a fresh artifact")

    monkeypatch.setattr(encoders, "load_encoder", no_loading)
    ids, vectors = embed_examples(cfg, examples, out, "key1")
    assert ids == first[0] and np.array_equal(vectors, first[1])


def test_other_key_recomputes(setup, tmp_path):
    cfg, examples, encoder = setup
    out = tmp_path / "train.npy"
    embed_examples(cfg, examples, out, "key1", encoder=encoder)
    counting = CountingEncoder(encoder)
    embed_examples(cfg, examples[:4], out, "key2", encoder=counting)
    assert counting.images == 4
    assert Manifest.read(out).key == "key2" and load_embeddings(out)[0] == [e.id for e in examples[:4]]


def test_partial_chunks_of_another_key_are_dropped(setup, tmp_path):
    cfg, examples, encoder = setup
    out = tmp_path / "train.npy"
    with pytest.raises(Crash):
        embed_examples(cfg, examples, out, "key1", encoder=CountingEncoder(encoder, fail_after=1))
    counting = CountingEncoder(encoder)
    embed_examples(cfg, examples, out, "key2", encoder=counting)
    assert counting.images == 10


def test_loads_encoder_from_config_and_uses_workers(setup, tmp_path):
    cfg, examples, encoder = setup
    workers_cfg = EncoderConfig(name=cfg.name, batch_size=4, device="cpu", num_workers=1)
    ids, vectors = embed_examples(workers_cfg, examples, tmp_path / "w.npy", "k")  # loads the encoder itself
    reference = embed_examples(cfg, examples, tmp_path / "r.npy", "k", encoder=encoder)[1]
    np.testing.assert_allclose(vectors.astype(np.float32), reference.astype(np.float32), atol=2e-3)


def test_image_bytes_and_duplicate_ids(setup, tmp_path):
    cfg, examples, encoder = setup
    as_bytes = [Example(e.id, e.image.read_bytes()) for e in examples[:3]]
    from_bytes = embed_examples(cfg, as_bytes, tmp_path / "b.npy", "k", encoder=encoder)[1]
    from_files = embed_examples(cfg, examples[:3], tmp_path / "f.npy", "k", encoder=encoder)[1]
    assert np.array_equal(from_bytes, from_files)
    with pytest.raises(ValueError, match="duplicate image IDs.*img0"):
        embed_examples(cfg, [examples[0], examples[0]], tmp_path / "d.npy", "k", encoder=encoder)


def test_load_image_gives_rgb(setup):
    _, examples, _ = setup
    assert embed_module.load_image(examples[0]).mode == "RGB"
