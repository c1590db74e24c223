"""The bf16 probe and the engines' dtype ``auto`` (no vLLM needed)."""

from __future__ import annotations

from pathlib import Path

from medcap.models import devices
from medcap.models.devices import cpu_flags, inference_dtype

AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n"


def test_cpu_flags_reads_the_first_processor():
    assert cpu_flags(AVX512_BF16) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags("Features\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}  # arm64 spelling
    assert cpu_flags("") == set()


def test_inference_dtype(monkeypatch):
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    assert inference_dtype("auto", "cpu") == "bf16" and inference_dtype("auto", "cuda:0") == "bf16"
    assert inference_dtype("fp32", "cpu") == "fp32" and inference_dtype("fp16", "cuda") == "fp16"
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert inference_dtype("auto", "cpu") == "fp32"
    assert (
        devices.torch_dtype("auto", "cpu").is_floating_point
        and str(devices.torch_dtype("auto", "cpu")) == "torch.float32"
    )


def test_the_probe_matches_this_machine():
    flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    assert devices.cpu_supports_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
