"""LM-Fuser: prompt, token-level masks, training (full and LoRA), resume, early stopping, prediction."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from medcap.config import FuserConfig, GenerationConfig, LoraConfig, TrainConfig
from medcap.fuser.lm import META, LMFuser, fuser_prompt
from medcap.fuser.lm_train import IGNORE, PATIENCE, FuserCollator, PromptDriftError, train_fuser
from medcap.models.captions import clean_caption
from medcap.models.chat import render_chat
from medcap.models.chat import text_only as text_messages
from medcap.records import Neighbour, NeighbourList

CANDS = {
    "llava": "CT of the chest shows a mass.",
    "qwen": "Chest X-ray demonstrates pleural effusion.",
    "medgemma": "Axial CT scan of the chest.",
    "nearest": "MRI of the brain with contrast.",
    "prefix": "Ultrasound of the abdomen shows gallstones.",
}
TRAIN = [
    ({"a": "CT of the chest shows a mass.", "b": "Chest X-ray."}, None, "Axial CT scan of the chest shows a mass."),
    ({"a": "MRI of the brain.", "b": "Ultrasound of the abdomen."}, None, "MRI of the brain with contrast."),
    ({"a": "Chest X-ray.", "c": "Pleural effusion."}, None, "Chest X-ray demonstrates bilateral pleural effusion."),
    ({"b": "Gallstones."}, None, "Ultrasound of the abdomen shows gallstones."),
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    from tiny_vlms import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny_llama"))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def fuser_cfg(model: str, **train) -> FuserConfig:
    tc = dict(max_steps=2, batch_size=2, grad_accum=1, lr=1e-3, eval_every=100, save_every=100, max_length=256)
    return FuserConfig(
        name="lmf",
        kind="lm",
        model=model,
        train=TrainConfig(**(tc | train)),
        generation=GenerationConfig(max_new_tokens=6),
    )


def prompt_text(messages) -> str:
    return messages[-1]["content"][0]["text"]


def order(messages) -> list[str]:
    return [line.split("]")[0][1:] for line in prompt_text(messages).splitlines() if line.startswith("[")]


# ----------------------------------------------------------------------------- prompt


def test_prompt_labels_every_candidate_and_shuffles_only_with_rng():
    cfg = FuserConfig(kind="lm")
    msgs = fuser_prompt(CANDS, None, cfg)
    text = prompt_text(msgs)
    for name, caption in CANDS.items():
        assert f"[{name}] {caption}" in text
    assert order(msgs) == sorted(CANDS)
    reversed_dict = dict(reversed(list(CANDS.items())))
    assert fuser_prompt(reversed_dict, None, cfg) == msgs  # stable: independent of the dict's order
    orders = {tuple(order(fuser_prompt(CANDS, None, cfg, rng=random.Random(s)))) for s in range(8)}
    assert len(orders) > 1 and all(sorted(o) == sorted(CANDS) for o in orders)
    same = [order(fuser_prompt(CANDS, None, cfg, rng=random.Random(3))) for _ in range(2)]
    assert same[0] == same[1]
    assert order(fuser_prompt({"x": "Only one."}, None, cfg)) == ["x"]  # any N


def test_prompt_neighbours_and_candidate_filter():
    nl = NeighbourList(
        "q",
        tuple(Neighbour(f"n{i}", 1 - i / 10, f"Neighbour caption {i}.") for i in range(4))
        + (Neighbour("q", 0.1, "Own."),),
    )
    text = prompt_text(fuser_prompt(CANDS, nl, FuserConfig(kind="lm", use_neighbours=True, k=2)))
    assert "Neighbour caption 0." in text and "Neighbour caption 1." in text and "Neighbour caption 2." not in text
    assert "Own." not in text
    assert "Neighbour caption" not in prompt_text(fuser_prompt(CANDS, nl, FuserConfig(kind="lm")))
    filtered = fuser_prompt(CANDS, None, FuserConfig(kind="lm", candidates=["qwen", "llava"]))
    assert order(filtered) == ["llava", "qwen"]


# ----------------------------------------------------------------------------- masks


def test_masks_token_by_token(tokenizer, tiny_llama):
    cfg = fuser_cfg(tiny_llama)
    collator = FuserCollator(tokenizer, cfg, max_length=256)
    batch = collator(TRAIN[:3])
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for row, (cands, nl, ref) in enumerate(TRAIN[:3]):
        prompt = render_chat(tokenizer, text_messages(fuser_prompt(cands, nl, cfg)), add_generation_prompt=True)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # the template writes BOS itself
        n = int(attn[row].sum())
        assert ids[row, : len(p)].tolist() == p  # the generation prompt is a token prefix
        learned = [j for j in range(ids.shape[1]) if labels[row, j] != IGNORE]
        assert learned == list(range(len(p), n))  # caption + end of turn, nothing else
        assert all(labels[row, j] == ids[row, j] for j in learned)
        assert ids[row, n - 1] == eot
        assert all(labels[row, j] == IGNORE for j in range(n, ids.shape[1]))  # padding
        assert tokenizer.decode(ids[row, learned]) == ref + "<|eot_id|>"


def test_prompt_drift_is_detected(tokenizer, tiny_llama):
    tok = tokenizer.__class__.from_pretrained(tiny_llama)
    # The assistant turn renders differently from the generation prompt: training would not match inference.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    with pytest.raises(PromptDriftError, match="not a prefix"):
        FuserCollator(tok, fuser_cfg(tiny_llama), max_length=256)(TRAIN[:1])


# ----------------------------------------------------------------------------- training


def test_train_save_reload_predict(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    cfg = fuser_cfg(tiny_llama)
    final = train_fuser(cfg, TRAIN, TRAIN[:2], tmp_path / "fuser")
    assert final == tmp_path / "fuser" / "final"
    meta = json.loads((final / META).read_text())
    assert meta["steps"] == 2 and meta["adapter"] is False and meta["base_model"] == tiny_llama
    assert meta["best_val_loss"] > 0 and meta["config"]["train"]["max_steps"] == 2
    base, tuned = load_file(Path(tiny_llama) / "model.safetensors"), load_file(final / "model.safetensors")
    assert any(not (base[k] == tuned[k]).all() for k in base)  # it learned something
    assert train_fuser(cfg, TRAIN, TRAIN[:2], tmp_path / "fuser") == final  # finished: returns at once

    fuser = LMFuser(cfg, tmp_path / "fuser")  # the training folder stands for its final model
    assert fuser.model_dir == final
    request = fuser.request("v1", TRAIN[0][0], None)
    expected = render_chat(
        fuser.engine.tokenizer, text_messages(fuser_prompt(TRAIN[0][0], None, cfg)), add_generation_prompt=True
    )
    assert fuser.engine.render(request) == expected  # inference renders exactly the training prompt
    out = fuser([("v1", TRAIN[0][0], None), ("v2", TRAIN[1][0], None)])
    fuser.close()
    assert [c.id for c in out] == ["v1", "v2"] and all(c.generator == "lmf" for c in out)
    # A random model writes noise: the caption is its cleaned output (possibly empty).
    assert all(c.caption == clean_caption(c.extra["raw"]) and c.extra["fuser"] == str(final) for c in out)


def test_resume_reproduces_uninterrupted_run(tiny_llama, tmp_path, caplog):
    import logging

    from safetensors.torch import load_file

    cfg = fuser_cfg(tiny_llama, max_steps=4, save_every=2)
    cfg.lora = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])  # dropout: RNG restored
    whole = train_fuser(cfg, TRAIN, [], tmp_path / "whole")
    part = train_fuser(cfg, TRAIN, [], tmp_path / "part", stop_after=2)
    assert not part.exists() and [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()] == ["step-0000002"]
    with caplog.at_level(logging.INFO, logger="medcap.models.training"):
        resumed = train_fuser(cfg, TRAIN, [], tmp_path / "part")
    assert "at step 2 of 4" in caplog.text
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key].allclose(b[key], atol=1e-6), key
    # The adapter holds LoRA weights only: vLLM can serve it.
    assert not [k for k in a if "lm_head" in k or "embed_tokens" in k]
    assert json.loads((whole / "adapter_config.json").read_text())["base_model_name_or_path"]
    train_fuser(cfg, TRAIN[:3], [], tmp_path / "other", stop_after=1)
    with pytest.raises(ValueError, match="other settings or data"):
        train_fuser(cfg, TRAIN[1:], [], tmp_path / "other")  # other data: no silent resume


def test_early_stopping_keeps_best(tiny_llama, tmp_path):
    cfg = fuser_cfg(tiny_llama, max_steps=20, lr=0.0, eval_every=1)  # lr 0: the loss never improves
    final = train_fuser(cfg, TRAIN, TRAIN[:2], tmp_path / "fuser")
    meta = json.loads((final / META).read_text())
    assert meta["stopped_early"] is True and meta["steps"] == 1 + PATIENCE and meta["best_step"] == 1
    history = [json.loads(line) for line in (tmp_path / "fuser" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]


def test_lora_fuser_predicts_and_rejects_lm_head(tiny_llama, tmp_path):
    cfg = fuser_cfg(tiny_llama)
    cfg.lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    final = train_fuser(cfg, TRAIN, [], tmp_path / "fuser")
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    fuser = LMFuser(cfg, final)
    assert fuser.request("v1", TRAIN[0][0], None).adapter == str(final)
    out = fuser([("v1", TRAIN[0][0], None)])
    fuser.close()
    assert out[0].id == "v1" and out[0].extra["model"] == tiny_llama
    cfg.lora = LoraConfig(target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head"):
        train_fuser(cfg, TRAIN, [], tmp_path / "bad")


def test_missing_fuser_folder_fails_clearly(tmp_path):
    from medcap.models.hub import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="medcap_fuser.json"):
        LMFuser(FuserConfig(kind="lm"), tmp_path)


@pytest.mark.slow
def test_smollm2_fuser_trains_and_predicts(tmp_path):
    cfg = fuser_cfg("smollm2", max_steps=2)
    cfg.lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    final = train_fuser(cfg, TRAIN, TRAIN[:2], tmp_path / "fuser")
    fuser = LMFuser(cfg, final)
    out = fuser([("v1", TRAIN[0][0], None)])
    fuser.close()
    assert out[0].caption
