"""The vllm engine against the hf engine on real vLLM: greedy captions token for token, one engine per model.

For tiny random LLaVA, Qwen2.5-VL and Gemma 3 (MedGemma's architecture; head_dim 64, as vLLM's
CPU kernels need) three generators share one vLLM engine through ``EnginePool``: zero-shot,
few-shot with the neighbours' captions (and images, where the family takes several per prompt:
``limit_mm_per_prompt``), and SFT with an adapter ``medcap train generator`` wrote. Every caption
must equal the hf engine's (fp32 both sides), and the adapter must change some of them.
"""

from __future__ import annotations

import pytest
from vllm_support import hf_cfg, phantom_items, sft_config, train_sft_adapter, vllm_cfg, vllm_env  # noqa: F401

from medcap.config import GeneratorConfig
from medcap.engines.pool import EnginePool, spec_of
from medcap.generators.mllm import MLLMGenerator
from medcap.models.families import get_family

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_env")]

FAMILIES = ["llava", "qwen2_5_vl", "medgemma"]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory, phantom_dir):
    from tiny_vlms import make_tiny_vllm_vlm

    family = request.param
    root = tmp_path_factory.mktemp(f"parity_{family}")
    model = make_tiny_vllm_vlm(family, root / "model")
    adapter = train_sft_adapter(family, model, phantom_dir, root / "sft")
    items, index = phantom_items(phantom_dir, n=4, k=2)
    return family, model, adapter, items, index


def generator_configs(family: str, model, adapter) -> list[GeneratorConfig]:
    fam = get_family(family)
    base = sft_config(family, model)
    shots = fam.max_images > 1  # LLaVA-1.5 takes one image per prompt: its few-shot shows captions only
    return [
        GeneratorConfig(name="zero", kind=family, model=str(model), mode="zero-shot", generation=base.generation),
        GeneratorConfig(
            name="few",
            kind=family,
            model=str(model),
            mode="few-shot",
            k=2,
            shot_images=shots,
            generation=base.generation,
        ),  # fmt: skip
        GeneratorConfig(
            name="sft", kind=family, model=str(model), mode="sft", adapter=str(adapter), generation=base.generation
        ),  # fmt: skip
    ]


def captions(cfgs: list[GeneratorConfig], engine_cfg, items, index) -> tuple[dict[str, list[str]], int]:
    """Each generator's raw outputs through one pool (engines started: the second value)."""
    from dataclasses import replace

    cfgs = [replace(c, engine=engine_cfg) for c in cfgs]
    pool = EnginePool([spec_of(c) for c in cfgs])
    out = {}
    try:
        for c in cfgs:
            engine = pool.engine(spec_of(c))
            rows = MLLMGenerator(c, engine, index_examples=index)(items)
            out[c.name] = [r.extra["raw"] for r in rows]
            engine.close()
    finally:
        pool.close()
    return out, pool.starts


def test_vllm_captions_equal_hf_captions(setup):
    family, model, adapter, items, index = setup
    cfgs = generator_configs(family, model, adapter)
    hf, _ = captions(cfgs, hf_cfg(), items, index)
    vllm, starts = captions(cfgs, vllm_cfg(), items, index)
    assert starts == 1  # zero-shot, few-shot and both adapters' users shared one engine
    for name in hf:
        assert vllm[name] == hf[name], f"{family} {name}: vllm {vllm[name]} != hf {hf[name]}"
    assert hf["sft"] != hf["zero"]  # the adapter is applied (by both engines)
    assert all(hf["zero"]) and all(hf["few"])
