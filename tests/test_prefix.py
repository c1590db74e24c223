"""The prefix captioner: masks, focal loss, frozen-LM training, save/load, resumable training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_lms import make_tiny_causal_lm

from medcap.config import GeneratorConfig, PrefixConfig, TrainConfig
from medcap.generators.prefix import IGNORE, PrefixCaptioner, PrefixModelConfig, focal_cross_entropy
from medcap.generators.prefix_train import PrefixGenerator, train_prefix

D = 16
CAPTIONS = ["axial ct of the chest", "mri of the brain showing a mass", "ct abdomen with contrast", "left lobe lesion"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("lm")))


def make_model(lm_dir: str, mapper: str = "mlp", gamma: float = 0.0, seed: int = 0) -> PrefixCaptioner:
    torch.manual_seed(seed)
    cfg = PrefixModelConfig(prefix=PrefixConfig(lm=lm_dir, mapper=mapper, prefix_length=3), embed_dim=D)
    cfg.focal_gamma = gamma
    return PrefixCaptioner.build(cfg, device="cpu")


def embeds(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_shapes(lm_dir, mapper):
    model = make_model(lm_dir, mapper)
    ids, mask = model.encode_captions(CAPTIONS[:2])
    out = model(embeds(2), ids, mask)
    n_head = 3 + len(model.prompt_ids)
    assert model.mapper(embeds(2)).shape == (2, 3, 32)
    assert out["logits"].shape == (2, n_head + ids.shape[1], model.lm.config.vocab_size)
    assert out["labels"].shape == out["logits"].shape[:2]
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_label_masks(lm_dir):
    model = make_model(lm_dir)
    ids, mask = model.encode_captions(["ct", "mri of the brain showing a mass"])
    assert (ids[mask.bool()].view(-1) == model.tokenizer.eos_token_id).sum() == 2  # one eos per caption
    inputs, full_mask, labels = model.build_inputs(embeds(2), ids, mask)
    n_head = 3 + len(model.prompt_ids)
    assert inputs.shape[:2] == labels.shape == full_mask.shape
    assert (labels[:, :n_head] == IGNORE).all()  # prefix and prompt
    assert full_mask[:, :n_head].all()
    tail = labels[:, n_head:]
    assert torch.equal(tail[mask.bool()], ids[mask.bool()])  # caption tokens and eos are learned
    assert (tail[~mask.bool()] == IGNORE).all()  # padding is not
    assert (~mask.bool()).any()  # the short caption was padded
    assert torch.equal(full_mask[:, n_head:], mask)


def test_focal_loss_hand_checked():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 1, IGNORE]])
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = math.e / (math.e + 2)
    ce = (-math.log(p0) - math.log(p1)) / 2
    assert focal_cross_entropy(logits, labels, 0.0).item() == pytest.approx(ce, rel=1e-6)
    assert focal_cross_entropy(logits, labels, 0.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=IGNORE).item(), rel=1e-6
    )
    focal = ((1 - p0) ** 2 * -math.log(p0) + (1 - p1) ** 2 * -math.log(p1)) / 2
    assert focal_cross_entropy(logits, labels, 2.0).item() == pytest.approx(focal, rel=1e-6)
    assert focal < ce


def test_focal_gamma_in_model(lm_dir):
    plain, focal = make_model(lm_dir, gamma=0.0), make_model(lm_dir, gamma=2.0)
    ids, mask = plain.encode_captions(CAPTIONS)
    assert focal(embeds(4), ids, mask)["loss"] < plain(embeds(4), ids, mask)["loss"]


def test_training_steps_lower_loss_and_touch_only_the_mapper(lm_dir):
    model = make_model(lm_dir)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    mapper_before = {k: v.clone() for k, v in model.mapper.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.mapper.parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids, mask = model.encode_captions(CAPTIONS)
    x = embeds(4)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(x, ids, mask)["loss"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[2] < losses[0]
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in lm_before.items())
    assert any(not torch.equal(v, model.mapper.state_dict()[k]) for k, v in mapper_before.items())


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_save_load_same_outputs(lm_dir, tmp_path, mapper):
    model = make_model(lm_dir, mapper, seed=3)
    model.eval()
    ids, mask = model.encode_captions(CAPTIONS)
    x = embeds(4)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "mapper.safetensors"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["embed_dim"] == D
    again = PrefixCaptioner.load(tmp_path / "m", device="cpu")
    with torch.no_grad():
        assert torch.allclose(model(x, ids, mask)["logits"], again(x, ids, mask)["logits"])
    assert model.generate(x, max_new_tokens=5) == again.generate(x, max_new_tokens=5)
    assert len(again.generate(x, max_new_tokens=4, num_beams=2)) == 4


def test_train_lm_saves_the_lm(lm_dir, tmp_path):
    torch.manual_seed(0)
    cfg = PrefixModelConfig(prefix=PrefixConfig(lm=lm_dir, prefix_length=2, train_lm=True), embed_dim=D)
    model = PrefixCaptioner.build(cfg, device="cpu")
    assert all(p.requires_grad for p in model.lm.parameters())
    with torch.no_grad():
        model.lm.get_input_embeddings().weight.add_(1.0)
    model.save(tmp_path / "m")
    again = PrefixCaptioner.load(tmp_path / "m", device="cpu")
    assert torch.equal(again.lm.get_input_embeddings().weight, model.lm.get_input_embeddings().weight)


def gen_cfg(lm_dir: str, **train) -> GeneratorConfig:
    tc = TrainConfig(lr=5e-3, batch_size=2, grad_accum=2, warmup_ratio=0.25, eval_every=2, save_every=2, eval_samples=2)
    for k, v in train.items():
        setattr(tc, k, v)
    cfg = GeneratorConfig(name="prefix", kind="prefix", prefix=PrefixConfig(lm=lm_dir, prefix_length=2), train=tc)
    cfg.engine.device = "cpu"
    cfg.generation.max_new_tokens = 6
    return cfg


def data(n: int = 6):
    ids = [f"img{i}" for i in range(n)]
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return ids, embeds(n).numpy().astype(np.float16), caps


def test_resume_reproduces_uninterrupted_run(lm_dir, tmp_path):
    ids, x, caps = data()
    cfg = gen_cfg(lm_dir, max_steps=4)
    whole = train_prefix(cfg, ids, x, caps, [], None, [], tmp_path / "whole")
    part = train_prefix(cfg, ids, x, caps, [], None, [], tmp_path / "part", stop_after=1)
    state = tmp_path / "part" / "checkpoints" / "step-0000001" / "state.pt"
    assert not part.exists() and state.exists()
    assert torch.load(state, weights_only=False)["state"]["step"] == 1
    part = train_prefix(cfg, ids, x, caps, [], None, [], tmp_path / "part")
    a, b = load_file(whole / "mapper.safetensors"), load_file(part / "mapper.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run is not trained again; other settings refuse to resume from the checkpoint
    assert train_prefix(cfg, ids, x, caps, [], None, [], tmp_path / "whole") == whole
    train_prefix(cfg, ids, x, caps, [], None, [], tmp_path / "other", stop_after=1)
    with pytest.raises(ValueError, match="other settings"):
        train_prefix(gen_cfg(lm_dir, max_steps=5), ids, x, caps, [], None, [], tmp_path / "other")


def test_train_with_validation_and_generate(lm_dir, tmp_path):
    ids, x, caps = data()
    cfg = gen_cfg(lm_dir, max_steps=4)
    out = train_prefix(cfg, ids, x, caps, ids[:3], x[:3], caps[:3], tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]
    assert all(0.0 <= h["val_rouge1"] <= 1.0 and h["val_loss"] > 0 for h in history)
    assert (out / "config.json").is_file() and not (tmp_path / "run" / "best").exists()
    candidates = PrefixGenerator(cfg, out)(ids[:3], x[:3])
    assert [c.id for c in candidates] == ids[:3]
    assert all(c.generator == "prefix" and isinstance(c.caption, str) for c in candidates)
