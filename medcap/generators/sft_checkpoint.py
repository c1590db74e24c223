"""Atomic, resumable checkpoints of LoRA SFT: adapter, optimizer, scheduler, RNG states and step.

A checkpoint is written into a hidden temporary folder and renamed to ``checkpoints/step-N``, so
a folder with that name is always complete; only the newest ``keep`` are kept. Adapter folders
(``best``, ``adapter``) are replaced the same way.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medcap.runs import write_json

STATE = "state.json"


def replace_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` and rename it to ``final`` (replacing an older one)."""
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    old = final.parent / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_adapter(model: Any, folder: Path) -> None:
    """The PEFT adapter only (never embedding layers)."""
    model.save_pretrained(str(folder), save_embedding_layers=False)


def rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, model: Any, opt: Any, sched: Any, state: Any, key: str, keep: int = 2) -> Path:
    """Write ``root/step-N`` atomically and delete all but the newest ``keep`` checkpoints."""
    import torch

    def fill(tmp: Path) -> None:
        save_adapter(model, tmp / "adapter")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(sched.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        write_json(tmp / STATE, asdict(state) | {"key": key})

    path = replace_dir(root / f"step-{state.step}", fill)
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def load_checkpoint(path: Path, model: Any, opt: Any, sched: Any, key: str) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG states; returns the saved state fields."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / STATE).read_text())
    if state.pop("key") != key:
        raise ValueError(
            f"checkpoint {path} was made with another config or training set; "
            "train with resume=False (or into another folder) to start over"
        )
    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"checkpoint {path}: adapter weights do not fit the model: {result.unexpected_keys[:5]}")
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))  # our own file: RNG tuples
    return state
