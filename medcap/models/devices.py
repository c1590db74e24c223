"""Where and in which precision models run: ``auto`` means CUDA with bf16 when present, else CPU with fp32."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """``auto``: CUDA when available, else CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(dtype: str, device: str):
    """``auto``: bf16 on CUDA, fp32 on CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto | fp32 | fp16 | bf16")
    return table[dtype]
