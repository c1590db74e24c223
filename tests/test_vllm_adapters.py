"""Adapters vLLM can serve: the check before training, ``lora.merge``, and the vision-tower weight names.

Default tests (no vLLM): ``classify`` on the module names PEFT really adapts in tiny models; a
regex that reaches the vision tower is refused before the first training step, naming what vLLM
would ignore; with ``lora.merge: true`` the same training writes ``merged/``, which the hf engine
serves without LoRA exactly as the base model with the adapter. Marked ``vllm``: vLLM serves the
merged folder exactly so too, and really ignores the tower part of the unmerged adapter, as the
table said; the table matches vLLM's own model classes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_vlms import make_tiny_vlm
from vllm_support import hf_cfg, phantom_items, sft_config, train_sft_adapter, vllm_env  # noqa: F401

from medcap.config import GenerationConfig
from medcap.engines.base import Request
from medcap.engines.hf import HFEngine
from medcap.engines.vllm_checkpoint import legacy_name, legacy_vision_keys
from medcap.engines.vllm_lora import VLLM_LORA, classify
from medcap.models.families import FAMILIES, get_family

VISION_AND_LM = r".*(language_model|vision_tower).*\.(q_proj|v_proj)"  # LLaVA: LM and CLIP tower attention


def adapted_modules(family: str, model_dir, target: str) -> set[str]:
    from peft import LoraConfig, get_peft_model

    model, _ = get_family(family).load(str(model_dir))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=target))
    return {n.rsplit(".lora_", 1)[0] for n, _ in peft.named_parameters() if ".lora_" in n}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return make_tiny_vlm("llava", tmp_path_factory.mktemp("adapters") / "llava")


def test_every_family_is_in_the_table():
    assert {f.model_class for f in FAMILIES.values()} <= set(VLLM_LORA)


def test_classify_real_module_names(llava_dir):
    fam = get_family("llava")
    lm_only = classify(fam.model_class, adapted_modules("llava", llava_dir, fam.lora_targets[0]))
    assert lm_only.exact and len(lm_only.served) == 2 * 4  # 2 layers x q, k, v, o
    assert all(n.startswith("model.language_model.layers.") for n in lm_only.served)

    both = adapted_modules("llava", llava_dir, VISION_AND_LM)
    verdict = classify(fam.model_class, both)
    assert len(verdict.served) == 4 and len(verdict.ignored) == 4 and not verdict.refused
    assert all(n.startswith("model.vision_tower.") for n in verdict.ignored)
    assert "IGNORES 4 (vision tower / projector)" in verdict.describe()
    assert classify(fam.model_class, both, tower_connector_lora=True).exact  # vLLM's experimental flag
    refused = classify(fam.model_class, ["base_model.model.lm_head", "base_model.model.model.language_model.norm"])
    assert refused.refused == ("lm_head", "model.language_model.norm") and not refused.exact


def test_tower_targets_are_refused_before_training(llava_dir, phantom_dir, tmp_path):
    with pytest.raises(
        ValueError, match=r"IGNORES 4 \(vision tower / projector\): model\.vision_tower.*lora\.merge: true"
    ):
        train_sft_adapter("llava", llava_dir, phantom_dir, tmp_path / "out", target_modules=VISION_AND_LM)
    assert not (tmp_path / "out" / "checkpoints").exists()  # no step was taken


def requests(items, adapter=None) -> list[Request]:
    from medcap.generators.mllm import MLLMGenerator

    gen = MLLMGenerator(sft_config("llava", "unused"), engine=None, adapter=adapter)
    reqs = [gen.request(ex, nl) for ex, nl in items]
    return [Request(r.id, r.messages, r.images, r.adapter, GenerationConfig(max_new_tokens=8)) for r in reqs]


@pytest.fixture(scope="module")
def merged_run(llava_dir, phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged_run")
    adapter = train_sft_adapter("llava", llava_dir, phantom_dir, out, target_modules=VISION_AND_LM, merge=True)
    return adapter, out / "merged"


def test_merge_writes_weights_every_engine_serves(merged_run, llava_dir, phantom_dir):
    adapter, merged = merged_run
    meta = json.loads((merged / "medcap_merged.json").read_text())
    assert meta["adapter"] == str(adapter.resolve()) and meta["base_model"] == str(llava_dir)
    assert not (merged / "adapter_config.json").exists()
    items, _ = phantom_items(phantom_dir, n=4)
    fam = get_family("llava")
    with_adapter = HFEngine(fam, str(llava_dir), hf_cfg()).generate(requests(items, str(adapter)))
    base = HFEngine(fam, str(llava_dir), hf_cfg()).generate(requests(items))
    merged_out = HFEngine(fam, str(merged), hf_cfg()).generate(requests(items))
    assert [c.text for c in merged_out] == [c.text for c in with_adapter]
    assert [c.text for c in base] != [c.text for c in with_adapter]  # the adapter (tower part included) matters


def test_legacy_vision_keys_keep_the_model(llava_dir, tmp_path):
    from safetensors import safe_open

    assert legacy_name("vision_tower.embeddings.x") == "vision_tower.vision_model.embeddings.x"
    assert legacy_name("vision_tower.vision_model.embeddings.x") == "vision_tower.vision_model.embeddings.x"
    assert legacy_name("language_model.model.layers.0.q_proj.weight") == "language_model.model.layers.0.q_proj.weight"
    copy = shutil.copytree(llava_dir, tmp_path / "llava")
    assert legacy_vision_keys(copy) > 0 and legacy_vision_keys(copy) == 0  # idempotent
    with safe_open(str(copy / "model.safetensors"), "pt") as f:
        assert all(k.startswith("vision_tower.vision_model.") for k in f.keys() if k.startswith("vision_tower."))  # noqa: SIM118
    fam = get_family("llava")
    a, _ = fam.load(str(llava_dir))
    b, _ = fam.load(str(copy))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- real vLLM


@pytest.mark.vllm
def test_table_matches_vllm_model_classes():
    from vllm_support import require_vllm

    require_vllm()
    import importlib

    for hf_class, spec in VLLM_LORA.items():
        module, name = spec.vllm_class.rsplit(".", 1)
        cls = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)
        keys = cls.get_mm_mapping(None)
        mapper = getattr(cls, "hf_to_vllm_mapper", None)

        def vllm_name(hf_prefix: str, mapper=mapper) -> str:
            return (mapper.map_name(hf_prefix + ".x") or "").removesuffix(".x") if mapper else hf_prefix

        assert cls.supports_tower_connector_lora == spec.tower_connector_lora, hf_class
        assert vllm_name(spec.language_model).startswith(keys.language_model[0].rstrip(".")), hf_class
        for prefix in spec.tower:
            assert any(vllm_name(prefix).startswith(t.rstrip(".")) for t in keys.tower_model), (hf_class, prefix)
        for prefix in spec.connector:
            assert any(vllm_name(prefix).startswith(c.rstrip(".")) for c in keys.connector), (hf_class, prefix)


def random_adapter(model_dir, out, target: str, scale: float = 0.3):
    """A PEFT LoRA on ``target`` with random ``lora_B`` (PEFT's default is zeros): it surely changes outputs."""
    from peft import LoraConfig, get_peft_model

    model, _ = get_family("llava").load(str(model_dir))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
    peft.save_pretrained(out)
    return out


@pytest.mark.vllm
@pytest.mark.usefixtures("vllm_env")
def test_vllm_serves_merged_weights_and_ignores_tower_lora(phantom_dir, tmp_path):
    """vLLM without LoRA on the merged model equals hf with the adapter; vLLM with the adapter drops its tower part."""
    from safetensors.torch import load_file, save_file
    from vllm_support import require_vllm, vllm_cfg

    require_vllm()
    from tiny_vlms import make_tiny_vllm_vlm

    from medcap.engines.merge import merge_adapter
    from medcap.engines.vllm import VLLMEngine

    fam = get_family("llava")
    model = make_tiny_vllm_vlm("llava", tmp_path / "llava")  # head_dim 64, as vLLM needs
    adapter = random_adapter(model, tmp_path / "lora", VISION_AND_LM)
    merged = merge_adapter(fam, str(model), adapter, tmp_path / "merged")  # what lora.merge writes
    lm_only = shutil.copytree(adapter, tmp_path / "lm_only")  # the adapter as vLLM applies it: tower part dropped
    weights = load_file(lm_only / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "vision_tower" not in k}, lm_only / "adapter_model.safetensors")

    items, _ = phantom_items(phantom_dir, n=4)
    hf = HFEngine(fam, str(model), hf_cfg())
    hf_full = [c.text for c in hf.generate(requests(items, str(adapter)))]
    hf_lm_only = [c.text for c in hf.generate(requests(items, str(lm_only)))]
    assert hf_lm_only != hf_full  # the tower part of the adapter matters
    hf.close()

    engine = VLLMEngine(fam, str(merged), vllm_cfg())
    try:
        assert [c.text for c in engine.generate(requests(items))] == hf_full
    finally:
        engine.close()
    engine = VLLMEngine(fam, str(model), vllm_cfg())
    try:
        assert [c.text for c in engine.generate(requests(items, str(adapter)))] == hf_lm_only
    finally:
        engine.close()
