"""Training checkpoints that are data, never code.

A checkpoint is ``checkpoints/step-NNNNNNN/state.pt``: tensors, numbers, strings, lists and dicts
only (trainable weights, optimiser and scheduler state, RNG states as tensors, the loop state), so
``torch.load(..., weights_only=True)`` reads it. Anyone who can write into a shared run folder could
otherwise plant a pickle that runs code at the next resume: :func:`read` loads with
``weights_only=True`` only and refuses a file that needs unpickling, saying why and what to delete.
:func:`plain` checks (and converts NumPy scalars in) what is saved, so a checkpoint that could not be
read back safely is never written.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from medcap.files import atomic_dir

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE = "state.pt"
FORMAT = 2  # 1: medcap before safe checkpoints (pickled NumPy RNG state); 2: tensors and plain values only
KEEP = 2  # newest complete checkpoints kept


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be read without unpickling (which can run code), or of an older format."""


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` as what ``weights_only=True`` reads: tensors, None, bool, int, float, str, lists, tuples, dicts.

    NumPy scalars become Python numbers and NumPy arrays tensors; anything else raises ``TypeError``
    naming where it sits (``checkpoint.optimizer.state.0...``).
    """
    import torch

    if isinstance(obj, torch.Tensor):
        return obj
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}.{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__name__} is not plain data; a checkpoint holds tensors and plain values")


def rng_state() -> dict[str, Any]:
    """Torch, CUDA, Python and NumPy RNG states as tensors and numbers."""
    import torch

    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(out_dir: Path, step: int, blob: dict[str, Any]) -> Path:
    """Write ``blob`` (checked by :func:`plain`) atomically as checkpoint ``step``; keep the newest ``KEEP``."""
    import torch

    blob = plain({"format": FORMAT, **blob})
    dst = Path(out_dir) / CHECKPOINTS / f"step-{step:07d}"
    try:
        with atomic_dir(dst) as tmp:
            torch.save(blob, tmp / STATE)
    except (OSError, RuntimeError) as e:  # a full disk surfaces from torch as "unexpected pos ..."
        free = shutil.disk_usage(Path(out_dir)).free // 2**20
        raise OSError(
            f"{dst}: the checkpoint could not be written ({free} MB free on that disk; the previous checkpoints "
            f"are kept and a rerun resumes from the newest): {e}"
        ) from e
    for old in checkpoints(out_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def read(path: Path) -> dict[str, Any]:
    """The contents of checkpoint folder ``path``, read with ``weights_only=True``; refuses anything else."""
    import pickle

    import torch

    file = Path(path) / STATE
    retrain = (
        f"Delete {Path(path).parent} to train afresh (or retrain into another folder); "
        "medcap writes checkpoints that hold only tensors and plain values."
    )
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", str(e))
        what = f"`{found.group(1)}`" if found else "objects other than tensors and plain values"
        raise UnsafeCheckpointError(
            f"{file}: refusing to resume: reading this checkpoint needs unpickling {what}, and unpickling can run "
            "any code, so anyone who can write into the run folder could make a resume run theirs. It was written "
            f"by an older medcap or by someone else. {retrain}"
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        got = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise UnsafeCheckpointError(f"{file}: a checkpoint of another format ({got}, expected {FORMAT}). {retrain}")
    return saved
