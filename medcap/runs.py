"""The run directory: artifact paths, manifests and keys, resumable JSONL artifacts, borrowing, the lock.

Every artifact ``X`` has a manifest ``X.manifest.json`` beside it that records the stage that made
it, the cache key (a hash of the stage's config and of its inputs' keys) and whether it is
complete. A stage whose artifact has a complete manifest with the expected key is skipped; a
partial JSONL artifact with the expected key is resumed (finished IDs are skipped); anything else
is started afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcap.files import JsonlWriter, finished_ids, read_json, write_json

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- manifests


def manifest_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".manifest.json")


@dataclass(frozen=True)
class Manifest:
    """What made an artifact: the stage, its cache key, its inputs, and whether it is finished."""

    stage: str
    key: str
    complete: bool = False
    inputs: tuple[str, ...] = ()
    count: int | None = None
    info: dict[str, Any] | None = None

    def write(self, artifact: str | Path) -> None:
        from medcap.version import __version__

        write_json(
            manifest_path(artifact),
            {
                "stage": self.stage,
                "key": self.key,
                "complete": self.complete,
                "inputs": list(self.inputs),
                "count": self.count,
                "info": self.info or {},
                "medcap_version": __version__,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )

    @classmethod
    def read(cls, artifact: str | Path) -> Manifest | None:
        path = manifest_path(artifact)
        if not path.exists():
            return None
        try:
            d = read_json(path)
            return cls(
                d["stage"],
                d["key"],
                bool(d["complete"]),
                tuple(d.get("inputs", ())),
                d.get("count"),
                d.get("info") or {},
            )
        except (json.JSONDecodeError, KeyError) as e:
            log.warning("%s: unreadable manifest (%s); the artifact will be rebuilt", path, e)
            return None


def is_fresh(artifact: str | Path, key: str) -> bool:
    """True when ``artifact`` exists and its manifest says it is complete and made with ``key``."""
    m = Manifest.read(artifact)
    return m is not None and m.complete and m.key == key and Path(artifact).exists()


def borrow(artifact: Path, key: str, peers: list[Path], root: Path) -> bool:
    """Link a fresh copy of ``artifact`` (with its manifest and side files) from a peer run, if one has it.

    ``artifact`` lies under run folder ``root``; a peer holds the same relative path. Files are
    hard-linked where the file system allows (artifacts are never modified in place), else copied.
    """
    if not peers or not Path(artifact).resolve().is_relative_to(Path(root).resolve()):
        return False
    rel = Path(artifact).resolve().relative_to(Path(root).resolve())
    for peer in peers:
        src = Path(peer) / rel
        if Path(peer).resolve() == Path(root).resolve() or not is_fresh(src, key):
            continue
        dst = Path(artifact)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            for side in src.parent.glob(src.stem + ".*"):
                if side.is_file() and side != manifest_path(src):
                    _link_or_copy(side, dst.parent / side.name)
        _link_or_copy(manifest_path(src), manifest_path(dst))  # last: the copy is fresh only when whole
        log.debug("%s: taken from %s", dst, src)
        return True
    return False


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def start_folder(out: Path, stage: str, key: str) -> None:
    """Begin (or resume) a folder artifact made with ``key``: one made with another key is removed first,
    so a changed setting never resumes an old training or returns an old model."""
    old = Manifest.read(out)
    if out.exists() and (old is None or old.key != key):
        log.info("%s: made with other settings; starting afresh", out)
        shutil.rmtree(out)
    Manifest(stage, key, complete=False).write(out)  # what is written under `out` now resumes with this key


def artifact_key(artifact: str | Path) -> str | None:
    m = Manifest.read(artifact)
    return m.key if m is not None and m.complete else None


class ResumableJsonl:
    """A JSONL artifact keyed by image ID that resumes after a crash.

    Opening it with the key that made a partial file keeps the finished rows; opening it with
    another key (the config changed) starts it afresh. ``done`` is the set of finished IDs.
    """

    def __init__(self, path: str | Path, stage: str, key: str, inputs: tuple[str, ...] = ()):
        self.path = Path(path)
        self.stage, self.key, self.inputs = stage, key, inputs
        old = Manifest.read(self.path)
        if (old is None or old.key != key) and self.path.exists():
            log.info("%s: made with other settings; starting it afresh", self.path)
            self.path.unlink()
        self.done: set[str] = finished_ids(self.path)
        if self.done:
            log.info("%s: resuming, %d IDs already done", self.path, len(self.done))
        Manifest(stage, key, complete=False, inputs=inputs).write(self.path)
        self._writer = JsonlWriter(self.path)

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._writer.write(rows)
        self.done.update(row["id"] for row in rows)

    def finish(self, info: dict[str, Any] | None = None) -> None:
        self._writer.close()
        Manifest(self.stage, self.key, complete=True, inputs=self.inputs, count=len(self.done), info=info).write(
            self.path
        )

    def close(self) -> None:
        self._writer.close()


# --------------------------------------------------------------------------- run layout


@dataclass(frozen=True)
class RunDir:
    """Paths of the artifacts of one run (see docs/architecture.md for the contract)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def config(self) -> Path:
        return self.root / "config.yaml"

    def embeddings(self, encoder: str, split: str) -> Path:
        return self.root / "embeddings" / safe_name(encoder) / f"{split}.npy"

    def index(self, encoder: str) -> Path:
        return self.root / "index" / f"{safe_name(encoder)}.faiss"

    def neighbours(self, split: str) -> Path:
        return self.root / "neighbours" / f"{split}.jsonl"

    def candidates(self, generator: str, split: str) -> Path:
        return self.root / "candidates" / safe_name(generator) / f"{split}.jsonl"

    def synthesis(self, name: str, split: str) -> Path:
        return self.root / "synthesis" / safe_name(name) / f"{split}.jsonl"

    def fused(self, name: str, split: str) -> Path:
        return self.root / "fused" / safe_name(name) / f"{split}.jsonl"

    def model(self, name: str) -> Path:
        return self.root / "models" / safe_name(name)

    def fold_model(self, name: str, fold: int) -> Path:
        """The cross-fitting model of ``fold`` (beside the whole-split model, so retraining one keeps the other)."""
        return self.root / "models" / f"{safe_name(name)}.folds" / f"fold-{fold}"

    def submission(self, caption_set: str) -> Path:
        return self.root / "submissions" / f"{safe_name(caption_set)}.csv"

    def scores(self, caption_set: str, split: str) -> Path:
        return self.root / "scores" / f"{safe_name(caption_set)}.{split}.json"

    def rejects(self, split: str) -> Path:
        return self.root / "rejects" / f"{split}.csv"


def safe_name(name: str) -> str:
    """A name usable as a single path component (``local-dir:/a/b`` -> ``local-dir_a_b``)."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return out.strip("_.") or "unnamed"


class RunLockedError(RuntimeError):
    """Another process is running stages in the same run folder."""


# Set by a medcap command that holds a run's lock for the training processes it launched (medcap/launch.py):
# the absolute path of that run folder. Those processes write into it without taking the lock themselves.
LOCK_HELD = "MEDCAP_RUN_LOCK_HELD"


@contextlib.contextmanager
def run_lock(root: Path):
    """Hold ``root/.lock`` while stages run: two processes appending to one run would corrupt it.

    In a process launched by the command that holds it (``LOCK_HELD`` names ``root``), a held lock
    is that command's, held for this process: it goes on without taking it.
    """
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if os.environ.get(LOCK_HELD) == str(root.resolve()):
                log.debug("%s: locked by the medcap command that launched this training", root)
                yield
                return
            raise RunLockedError(
                f"{root} is in use by another medcap process; wait for it or use another run name"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
