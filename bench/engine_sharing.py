"""The ``pool`` suite of bench/generate.py: two SFT generators of one base model, an engine each or one shared.

A tiny random Qwen2.5-VL (head_dim 64, what vLLM's CPU kernels take) with two LoRA adapters; each
generator captions ``n`` images. "An engine per generator" starts a vLLM engine for each, as a run
did before ``EnginePool``; "one shared engine" starts one and serves both adapters through it
(one ``LoRARequest`` each). Wall time includes the engine starts, which is what sharing saves.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from medcap.config import EngineConfig, GenerationConfig, GeneratorConfig
from medcap.engines.base import Request
from medcap.engines.pool import EnginePool, spec_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_vlms


def _requests(family: str, n: int, adapter: str, max_new_tokens: int) -> list[Request]:
    import numpy as np
    from PIL import Image

    from medcap.models.families import get_family

    rng = np.random.default_rng(0)
    prompt = get_family(family).default_prompt
    messages = ({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},)
    params = GenerationConfig(max_new_tokens=max_new_tokens)
    return [
        Request(f"{Path(adapter).name}-{i}", messages,
                (Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype="uint8")),), adapter, params)
        for i in range(n)
    ]  # fmt: skip


def run_pool(n: int, max_new_tokens: int, family: str = "qwen2_5_vl") -> str:
    from tiny_vlms import make_tiny_lora, make_tiny_vllm_vlm

    try:
        import vllm  # noqa: F401
    except ImportError:
        return "(vllm is not installed: the pool suite needs it; run in the environment bash .ci/vllm builds)"
    with tempfile.TemporaryDirectory(prefix="medcap-bench-pool-") as tmp:
        model = make_tiny_vllm_vlm(family, Path(tmp) / "model")
        adapters = [str(make_tiny_lora(family, model, Path(tmp) / f"sft{s}", seed=s, scale=0.3)) for s in (1, 2)]
        engine = EngineConfig(kind="vllm", dtype="auto", max_model_len=512,
                              extra={"sampling_params": {"ignore_eos": True}})  # fmt: skip
        cfgs = [GeneratorConfig(name=f"sft{i}", kind=family, model=str(model), mode="sft", adapter=a, engine=engine)
                for i, a in enumerate(adapters)]  # fmt: skip
        work = [_requests(family, n, a, max_new_tokens) for a in adapters]
        rows = []
        for label, shared in (("an engine per generator", False), ("one shared engine (EnginePool)", True)):
            t0 = time.perf_counter()
            pool = EnginePool([spec_of(c) for c in cfgs] if shared else [])
            outs = []
            for cfg, reqs in zip(cfgs, work, strict=True):
                eng = pool.engine(spec_of(cfg)) if shared else EnginePool().engine(spec_of(cfg))
                outs.append([c.text for c in eng.generate(reqs)])
                eng.close()
            pool.close()
            rows.append((label, 1 if shared else len(cfgs), time.perf_counter() - t0, outs))
    base = rows[0][2]
    lines = [f"## Two SFT adapters of one tiny {family} (vLLM, {n} images x {max_new_tokens} tokens each)\n",
             "| engines | vLLM starts | seconds (starts included) | images/s | speed-up |", "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for label, starts, seconds, _ in rows:
        lines.append(f"| {label} | {starts} | {seconds:.1f} | {2 * n / seconds:.2f} | {base / seconds:.2f}x |")
    same = rows[0][3] == rows[1][3]
    lines.append(f"\nSame captions either way: {same}")
    return "\n".join(lines)
