"""Files that survive a crash: atomic writes (a reader never sees half a file, a full disk leaves the old
one) and append-only JSONL (flushed and fsynced a batch at a time; a torn last line is dropped)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- atomic files


def umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file.

    The file gets the mode a plain ``open`` would give it (0644 under the usual umask), not the
    private 0600 of a temporary file: teammates read reports and submissions in shared folders. If the
    write fails (a full disk), the previous file stays as it was and no temporary file is left.
    """
    return write_atomic_all({Path(path): data})[0]


def write_atomic_all(files: dict[Path, str | bytes]) -> list[Path]:
    """Write several files that belong together: every one is written and synced before any replaces its old
    version, so a failed write (a full disk) leaves all the old versions as they were."""
    temps: list[tuple[str, Path]] = []
    mode = 0o666 & ~umask()
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    return [path for _, path in temps]


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``target`` whole, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        yield tmp
        _shareable(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old.exists() and not target.exists():  # the swap itself failed: put the previous folder back
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shareable(folder: Path) -> None:
    """Give what a writer left private in ``folder`` (safetensors writes 0600) the mode a plain ``open`` gives.

    Teammates read models in shared run folders; execute bits are kept.
    """
    mask = umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode & 0o777
                os.chmod(path, (0o666 & ~mask) | (mode & 0o111))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- JSONL


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete rows of a JSONL file; a torn last line (a crash mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):  # only the last line can be torn
                log.warning("%s:%d: ignoring a truncated last line", path, i)
                continue
            raise ValueError(f"{path}:{i}: not valid JSON") from None
    return rows


def finished_ids(path: Path) -> set[str]:
    """The IDs of a JSONL file's complete rows, read a line at a time (100k rows: ~10 MB, not the rows)."""
    done: set[str] = set()
    if not path.exists():
        return done
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():  # a torn last line has no newline
                try:
                    done.add(json.loads(line)["id"])
                except json.JSONDecodeError:
                    raise ValueError(f"{path}: a row that is not valid JSON before the last line") from None
    return done


class JsonlWriter:
    """Appends rows to a JSONL file a batch at a time, flushed and fsynced, so a crash loses one batch.

    A batch is all or nothing: if its write fails (a full disk), the file is cut back to the rows before it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._file = self.path.open("a", encoding="utf-8")

    def _repair(self) -> None:
        """Drop a torn last line left by a crash, so appended rows start on a fresh line.

        Reads the file backwards from its end, a block at a time: a 100,000-row file is not read whole.
        """
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("r+b") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            while pos > 0:
                step = min(1 << 16, pos)
                pos -= step
                f.seek(pos)
                block = f.read(step)
                if pos + step == end and block.endswith(b"\n"):
                    return
                newline = block.rfind(b"\n")
                if newline >= 0:
                    f.truncate(pos + newline + 1)
                    return
            f.truncate(0)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        committed = os.fstat(self._file.fileno()).st_size  # the buffer is empty between batches
        try:
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self._rollback(committed)
            raise

    def _rollback(self, size: int) -> None:
        """Cut off a batch that failed half-way, and start a fresh file object (the old one holds its rest)."""
        with contextlib.suppress(OSError):
            self._file.close()  # may fail again flushing the rest of the batch; that is cut off below
        with self.path.open("r+b") as f:
            f.truncate(size)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
