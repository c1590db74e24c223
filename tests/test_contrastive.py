"""Contrastive training of encoder projections: loss, recall, masking, save/load, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medcap.config import EncoderConfig

WORDS = [
    "chest",
    "abdomen",
    "brain",
    "lesion",
    "mass",
    "nodule",
    "fracture",
    "effusion",
    "opacity",
    "cyst",
    "axial",
    "sagittal",
    "left",
    "right",
]


def _captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=6)) + f" case {i}" for i in range(n)]


@pytest.fixture(scope="module")
def structured(tiny_clip):
    """64 captions and image embeddings tied to the frozen text features by a hidden linear map."""
    from medcap.retrieval.contrastive import text_features
    from medcap.retrieval.encoders import load_encoder

    captions = _captions(64)
    captions[1] = captions[0]  # two images of one case share a caption
    feats = text_features(load_encoder(EncoderConfig(name=tiny_clip, device="cpu")), captions)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(feats.shape[1], 16))
    emb = feats @ hidden + 0.05 * rng.normal(size=(len(captions), 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return captions, emb.astype(np.float16)


@pytest.fixture(scope="module")
def trained(tiny_clip, structured, tmp_path_factory):
    from medcap.retrieval.contrastive import train_encoder

    captions, emb = structured
    out = tmp_path_factory.mktemp("enc") / "trained"
    name = train_encoder(
        EncoderConfig(name=tiny_clip, device="cpu"),
        None,
        captions,
        out,
        image_embeddings=emb,
        valid=(None, captions, emb),
        steps=50,
        batch_size=32,
        lr=1e-2,
    )
    return name, out


def test_loss_drops_and_recall_improves(trained):
    name, out = trained
    assert name == f"local-dir:{out.resolve()}"
    report = json.loads((out / "medcap_encoder.json").read_text())
    assert report["loss_last"] < 0.7 * report["loss_first"]
    assert report["recall_after"]["i2t_r@1"] > report["recall_before"]["i2t_r@1"] + 0.2
    assert report["recall_after"]["t2i_r@5"] >= report["recall_before"]["t2i_r@5"]
    assert report["trained_image_projection"] is False
    assert report["unique_captions"] == 63


def test_saved_folder_reloads_with_image_side_unchanged(tiny_clip, trained, phantom_dir):
    from medcap.data import load_image
    from medcap.data.phantom import write_phantom  # noqa: F401  (the fixture's data set)
    from medcap.retrieval.encoders import load_encoder

    name, out = trained
    assert (out / "open_clip_config.json").is_file() and (out / "open_clip_pytorch_model.bin").is_file()
    assert not list(out.parent.glob(".trained.*"))  # the temporary folder is gone
    before = load_encoder(EncoderConfig(name=tiny_clip, device="cpu"))
    after = load_encoder(EncoderConfig(name=name, device="cpu"))
    images = [load_image(e) for e in _phantom_examples(phantom_dir)[:4]]
    np.testing.assert_allclose(before.encode_images(images), after.encode_images(images), atol=1e-6)
    texts = ["chest lesion", "brain mass left"]
    assert not np.allclose(before.encode_texts(texts), after.encode_texts(texts), atol=1e-3)


def test_reloaded_text_side_equals_trained_model(tiny_clip, structured, tmp_path):
    """The in-memory trained model and the saved folder give the same text embeddings."""
    import medcap.retrieval.contrastive_save as save
    from medcap.retrieval.contrastive import train_encoder
    from medcap.retrieval.encoders import load_encoder

    captions, emb = structured
    kept = {}
    real = save.save_encoder_folder

    def spy(encoder, cfg, out_dir, report):
        kept["encoder"] = encoder
        return real(encoder, cfg, out_dir, report)

    save.save_encoder_folder = spy
    try:
        name = train_encoder(
            EncoderConfig(name=tiny_clip, device="cpu"), None, captions, tmp_path / "m", image_embeddings=emb, steps=5
        )
    finally:
        save.save_encoder_folder = real
    texts = captions[:5]
    np.testing.assert_allclose(
        kept["encoder"].encode_texts(texts), load_encoder(EncoderConfig(name=name)).encode_texts(texts), atol=1e-6
    )


def test_duplicate_captions_are_masked_from_the_denominator():
    import torch

    from medcap.retrieval.contrastive import infonce_loss

    rng = np.random.default_rng(0)
    img = rng.normal(size=(4, 8))
    txt = rng.normal(size=(4, 8))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    txt[2] = txt[1]  # images 1 and 2 share a caption
    ids = np.array([0, 1, 1, 2])
    scale = 10.0
    logits = scale * img @ txt.T

    def ce(rows: np.ndarray) -> float:
        total = 0.0
        for i in range(4):
            allowed = [j for j in range(4) if j == i or ids[j] != ids[i]]
            total += -logits_of(rows, i, i) + np.log(sum(np.exp(logits_of(rows, i, j)) for j in allowed))
        return total / 4

    def logits_of(rows: np.ndarray, i: int, j: int) -> float:
        return rows[i, j]

    expected = (ce(logits) + ce(logits.T)) / 2
    got = infonce_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(ids), torch.tensor(scale))
    assert float(got) == pytest.approx(expected, rel=1e-9)
    unmasked = infonce_loss(torch.tensor(img), torch.tensor(txt), torch.tensor([0, 1, 2, 3]), torch.tensor(scale))
    assert float(unmasked) != pytest.approx(expected, rel=1e-6)


def test_recall_at_k_counts_shared_captions():
    from medcap.retrieval.contrastive import recall_at_k

    image = np.eye(3, dtype=np.float32)[[0, 1, 1]]  # images 1 and 2 both look like caption 1
    text = np.eye(3, dtype=np.float32)[:2]
    r = recall_at_k(image, text, np.array([0, 1, 1]), ks=(1,))
    assert r == {"i2t_r@1": 1.0, "t2i_r@1": 1.0}


def test_image_projection_is_trained_from_images(tiny_clip, phantom_dir, tmp_path):
    from medcap.retrieval.contrastive import train_encoder

    examples = _phantom_examples(phantom_dir)[:12]
    name = train_encoder(
        EncoderConfig(name=tiny_clip, device="cpu"),
        examples,
        [e.caption for e in examples],
        tmp_path / "m",
        steps=3,
        batch_size=8,
    )
    report = json.loads((Path(name[len("local-dir:") :]) / "medcap_encoder.json").read_text())
    assert report["trained_image_projection"] is True
    assert report["pairs"] + report["valid_pairs"] == 12


def test_text_tower_last_layer_is_trained_when_asked(tiny_clip, structured, tmp_path):
    import torch

    from medcap.retrieval.contrastive import train_encoder

    captions, emb = structured
    name = train_encoder(
        EncoderConfig(name=tiny_clip, device="cpu"),
        None,
        captions,
        tmp_path / "m",
        image_embeddings=emb,
        steps=2,
        train_text_tower=True,
    )
    before = torch.load(Path(tiny_clip[len("local-dir:") :]) / "open_clip_pytorch_model.bin")
    after = torch.load(Path(name[len("local-dir:") :]) / "open_clip_pytorch_model.bin")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "text_projection" in changed and "logit_scale" in changed
    assert any(k.startswith("transformer.resblocks.1.") for k in changed)
    assert not any(k.startswith(("transformer.resblocks.0.", "visual.")) for k in changed)


@pytest.mark.parametrize(
    ("captions", "emb", "match"),
    [
        (["a", "b", "c"], np.zeros((2, 16), np.float16), "shape"),
        (["a", "", "c"], np.zeros((3, 16), np.float16), "empty"),
        (["a", "b"], None, "images or image_embeddings"),
        ([], np.zeros((0, 16), np.float16), "no captions"),
    ],
)
def test_bad_inputs(tiny_clip, tmp_path, captions, emb, match):
    from medcap.retrieval.contrastive import train_encoder

    with pytest.raises(ValueError, match=match):
        train_encoder(EncoderConfig(name=tiny_clip), None, captions, tmp_path / "m", image_embeddings=emb, steps=1)
    assert not (tmp_path / "m").exists()


def _phantom_examples(root: Path):
    from medcap.config import DataConfig
    from medcap.data import load_split

    return load_split(DataConfig(root=str(root)), "train").examples


@pytest.mark.slow
def test_effnet_minilm_trains_on_cached_embeddings(tmp_path):
    """The offline encoder: 40 phantom images, their cached embeddings, a self-contained saved folder."""
    from medcap.data import load_image
    from medcap.data.phantom import write_phantom
    from medcap.retrieval.contrastive import train_encoder
    from medcap.retrieval.embed import embed_examples
    from medcap.retrieval.encoders import OFFLINE_ENCODER, load_encoder

    root = write_phantom(tmp_path / "ph", n=60, seed=0, image_size=64)
    examples = _phantom_examples(root)[:40]
    cfg = EncoderConfig(name=OFFLINE_ENCODER, device="cpu", batch_size=16)
    _, emb = embed_examples(cfg, examples, tmp_path / "emb" / "train.npy", "k")
    name = train_encoder(
        cfg, None, [e.caption for e in examples], tmp_path / "trained", image_embeddings=emb, steps=20, batch_size=16
    )
    folder = Path(name[len("local-dir:") :])
    assert (folder / "hf_text" / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    report = json.loads((folder / "medcap_encoder.json").read_text())
    assert report["trained_image_projection"] is False and report["steps"] == 20
    base, trained = load_encoder(cfg), load_encoder(EncoderConfig(name=name, device="cpu"))
    images = [load_image(e) for e in examples[:3]]
    np.testing.assert_allclose(base.encode_images(images), trained.encode_images(images), atol=1e-4)
    np.testing.assert_allclose(trained.encode_images(images), emb[:3].astype(np.float32), atol=2e-3)
    texts = [e.caption for e in examples[:3]]
    assert not np.allclose(base.encode_texts(texts), trained.encode_texts(texts), atol=1e-3)
    # padding cut from the HF tower's input changes nothing
    import torch

    from medcap.retrieval.contrastive import text_features

    with torch.no_grad():
        projected = trained.model.text.proj(torch.from_numpy(text_features(trained, [*texts, "short"])))
    projected = torch.nn.functional.normalize(projected, dim=-1).numpy()
    np.testing.assert_allclose(projected, trained.encode_texts([*texts, "short"]), atol=1e-5)


def test_train_encoder_command_writes_a_loadable_encoder(tmp_path, phantom_dir, tiny_clip):
    import yaml
    from click.testing import CliRunner

    from medcap.cli import main

    cfg = {
        "name": "enc",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir)},
        "retrieval": {"encoder": {"name": tiny_clip}, "encoder_training": {"steps": 5, "batch_size": 16}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["train", "encoder", "-c", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    name = next(line.split(": ", 1)[1] for line in res.output.splitlines() if line.startswith("trained encoder"))
    assert name.startswith("local-dir:") and (tmp_path / "runs" / "enc" / "models").is_dir()
    from medcap.config import EncoderConfig
    from medcap.retrieval.encoders import load_encoder

    assert load_encoder(EncoderConfig(name=name)).encode_texts(["ct of the chest"]).shape[0] == 1
