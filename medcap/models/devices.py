"""Where and in which precision models run.

``auto`` device: CUDA when present, else CPU. Two ``auto`` dtypes: ``torch_dtype`` (training and
anything that updates weights) keeps fp32 on a CPU, because bf16 master weights lose small
updates; ``inference_dtype`` (the engines) picks bf16 on CUDA and on CPUs with native bf16
arithmetic (AVX512-BF16 or AMX), where it is 2-4x faster than fp32 with the same captions within
the metrics' intervals (docs/benchmarks.md), and fp32 on other CPUs, where bf16 is emulated.
"""

from __future__ import annotations

import functools
from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products


def resolve_device(device: str) -> str:
    """``auto``: CUDA when available, else CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(dtype: str, device: str):
    """``auto``: bf16 on CUDA, fp32 on CPU (for weights that train; engines use ``inference_dtype``)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto | fp32 | fp16 | bf16")
    return table[dtype]


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor in a ``/proc/cpuinfo`` text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); cached, read once per process."""
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: ask oneDNN, which knows the same instructions
        try:
            import torch

            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (ImportError, AttributeError, RuntimeError):
            return False
    return any(f in flags for f in BF16_CPU_FLAGS)


def inference_dtype(dtype: str, device: str) -> str:
    """The dtype name an engine loads weights in: ``auto`` is bf16 on CUDA or a bf16 CPU, else fp32."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bf16"
    return "bf16" if device == "cpu" and cpu_supports_bf16() else "fp32"
