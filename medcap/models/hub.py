"""Models by hub id or local folder, offline first: where a model is, and the error when it is nowhere."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any


class ModelNotFoundError(RuntimeError):
    """A model that cannot be loaded from the hub cache or a local path; the message says how to provide it."""


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set now."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model(name: str, setting: str) -> str:
    """A local folder, or a hub id whose config is cached (or reachable when online).

    ``setting`` names the config key where the user can give a local folder instead.
    """
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {p} has no config.json; point {setting} at a saved model folder")
        return str(p)
    looks_local = p.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
    if looks_local:
        raise ModelNotFoundError(
            f"model folder {name!r} does not exist; set {setting} to a folder saved with save_pretrained, "
            "or to a Hugging Face hub id"
        )
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            raise ModelNotFoundError(
                f"model {name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set. Download it on a "
                f"connected machine with `huggingface-cli download {name}` and copy the cache here (point HF_HOME "
                f"at it), or save it to a folder and set {setting} to that path."
            )
    return name


# --------------------------------------------------------------------------- content fingerprints

SMALL_FILE = 64 << 20  # files up to this size are hashed whole; larger ones by size, mtime and both ends
_EDGE = 1 << 20
_PREFIXES = ("local-dir:",)


def model_identity(name: str | None) -> Any:
    """What a cache key should hash for a model reference.

    A hub id or a packaged model name stands for itself (hub ids are pinned by revision where it
    matters). A local folder or file stands for its content, so retraining a model in place makes
    every artifact made with it stale: see :func:`content_fingerprint`.
    """
    if not name:
        return name
    raw = name
    for prefix in _PREFIXES:
        if raw.startswith(prefix):
            raw = raw[len(prefix) :]
    path = Path(raw).expanduser()
    if not path.exists():
        return name
    return {"name": name, "content": content_fingerprint(path)}


def content_fingerprint(path: Path) -> str:
    """A hash of a file's or folder's content: every file's relative path and size, the full hash of
    each small file, and size + mtime + the first and last MiB of each large one (weights files are
    rewritten whole when a model is retrained). File hashes are memoised by (path, size, mtime), the
    fast path on an unchanged folder."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        if any(part.startswith(".") for part in f.relative_to(path).parts) if path.is_dir() else False:
            continue  # temporary and hidden files (atomic-write leftovers, .cache) are not the model
        st = f.stat()
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        h.update(f"{rel}\0{st.st_size}\0{_file_hash(str(f), st.st_size, st.st_mtime_ns)}\n".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= SMALL_FILE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"{mtime_ns}".encode())
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()
