"""Data sets in, :class:`~medcap.records.Example` records out, with every input problem named.

Three formats (``DataConfig.format``):

- ``imageclef``: the ImageCLEF/ROCO folder (``{split}_captions.csv``, ``{split}_concepts.csv``,
  images by ID, optional ``metadata.csv`` with the case column); see :mod:`medcap.data.formats`.
- ``manifest``: one CSV or JSONL file with ``id, image, caption[, concepts, group, split]``;
  without a ``split`` column every row is ``train``; image paths are relative to the manifest.
- ``hf``: a Hugging Face imagefolder directory or hub id; see :mod:`medcap.data.hf`.

Every problem is a :class:`~medcap.data.problems.Problem` with the file and 1-based line (header =
line 1). ``load_split`` raises one :class:`~medcap.data.problems.InputError` listing them all, or, with
``on_error: skip``, drops the bad rows and returns them as ``rejects``. Problems that make a whole
file unusable (no such file, a required column missing from the header) raise in both modes.
``load_split`` only checks that image files exist and are not empty; ``check_dataset`` also
decodes every image.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from medcap.config import DataConfig
from medcap.data.formats import (
    IMAGE_EXTS,
    RawRow,
    SplitScan,
    imageclef_splits,
    manifest_splits,
    read_imageclef,
    read_manifest,
)
from medcap.data.problems import InputError, Problem
from medcap.files import write_atomic
from medcap.records import Example

log = logging.getLogger(__name__)

FORMATS = ("imageclef", "manifest", "hf")
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class SplitData:
    """The usable examples of one split, and the rows dropped because ``on_error`` is ``skip``."""

    split: str
    examples: list[Example]
    rejects: list[Problem] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # every ID the split's files name, skipped rows too, in order
    skipped: int = 0  # rows dropped (on_error: skip)

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids = [ex.id for ex in self.examples]


# --------------------------------------------------------------------------- public API


def list_splits(cfg: DataConfig) -> list[str]:
    """The splits present in the data set (train, valid, test first)."""
    _check_root(cfg)
    if cfg.format == "imageclef":
        return imageclef_splits(Path(cfg.root))
    if cfg.format == "manifest":
        return manifest_splits(cfg)
    from medcap.data.hf import hf_splits

    return hf_splits(cfg)


def load_split(cfg: DataConfig, split: str) -> SplitData:
    """Read one split; raise an InputError listing every problem, or skip bad rows (``on_error: skip``).

    ``A+B`` is the union of splits A and B, in that order (e.g. ``data.index_split: train+valid``: a
    submission run's index); an ID in both is an error.
    """
    if "+" in split:
        return _union(cfg, split)
    scan = _scan(cfg, split)
    _check_rows(scan, deep=cfg.verify_images)
    problems = _sorted(scan.problems + [p for r in scan.rows for p in r.problems])
    where = f"split {split!r} of {cfg.root}"
    if scan.fatal or (problems and cfg.on_error != "skip"):
        found = _sorted(scan.fatal + problems)
        raise InputError(found, f"{len(found)} problem(s) in {where}")
    examples = [
        Example(r.id, r.image, r.caption if scan.labelled else None, r.concepts, r.group)
        for r in scan.rows
        if not r.problems
    ]
    ids = list(dict.fromkeys(r.id for r in scan.rows if r.id))
    log.debug("%s: %d examples", where, len(examples))
    return SplitData(split, examples, problems, ids, skipped=len(scan.rows) - len(examples))


def _union(cfg: DataConfig, split: str) -> SplitData:
    parts = [load_split(cfg, name) for name in split.split("+")]
    seen: dict[str, str] = {}
    for part in parts:
        for i in part.ids:
            if i in seen:
                raise InputError(
                    [Problem(cfg.root, None, f"ID {i!r} is in split {seen[i]!r} and in split {part.split!r}")],
                    f"split {split!r}: the splits it joins share an image",
                )
            seen[i] = part.split
    return SplitData(
        split,
        [ex for p in parts for ex in p.examples],
        [x for p in parts for x in p.rejects],
        [i for p in parts for i in p.ids],
        sum(p.skipped for p in parts),
    )


def check_dataset(cfg: DataConfig, splits: list[str] | None = None) -> list[Problem]:
    """Every problem of every split (images decoded too), plus IDs that appear in two splits."""
    try:
        splits = list_splits(cfg) if splits is None else splits
    except InputError as e:
        return e.problems
    if not splits:
        return [Problem(cfg.root, None, "no splits found (expected e.g. train_captions.csv or a train/ folder)")]
    found: list[Problem] = []
    seen: dict[str, tuple[str, RawRow]] = {}
    for split in splits:
        try:
            scan = _scan(cfg, split)
        except InputError as e:
            found.extend(e.problems)
            continue
        _check_rows(scan, deep=True)
        found.extend(scan.fatal + scan.problems + [p for r in scan.rows for p in r.problems])
        for row in scan.rows:
            if row.id in seen and seen[row.id][0] != split:
                other_split, other = seen[row.id]
                found.append(
                    Problem(row.file, row.line, f"ID {row.id!r} is also in split {other_split!r} ({_location(other)})")
                )
            seen.setdefault(row.id, (split, row))
    return _sorted(list(dict.fromkeys(found)))  # metadata.csv problems are found once per split


def unreferenced_images(cfg: DataConfig, splits: list[str]) -> list[str]:
    """Warnings for image files in the data set's image folders that no row of any split names."""
    if cfg.format != "imageclef":
        return []
    named: set[Path] = set()
    folders: set[Path] = set()
    splits = list(dict.fromkeys(part for split in splits for part in split.split("+")))  # a union reads its parts
    for split in splits:
        try:
            scan = _scan(cfg, split)
        except InputError:
            continue
        for row in scan.rows:
            if isinstance(row.image, Path):
                named.add(row.image.resolve())
                folders.add(row.image.parent.resolve())
    out = []
    for folder in sorted(folders):
        extra = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.resolve() not in named)
        if extra:
            shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
            out.append(f"{folder}: {len(extra)} image(s) that no row of {', '.join(splits)} names ({shown})")
    return out


def load_image(example: Example) -> Image.Image:
    """The example's image as an RGB PIL image; an InputError naming the file when it cannot be read."""
    src = example.image
    name = f"{example.id} (image bytes)" if isinstance(src, (bytes, bytearray)) else str(src)
    if src is None:
        raise InputError([Problem(example.id, None, "the example has no image")])
    try:
        im = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
        im.load()
    except FileNotFoundError as e:
        raise InputError([Problem(name, None, "image missing")]) from e
    except _PIL_ERRORS as e:
        raise InputError([Problem(name, None, f"image unreadable: {e}")]) from e
    return _to_rgb(im)


def write_rejects(path: Path, problems: list[Problem]) -> None:
    """Write problems as a CSV ``file,line,message`` (atomically)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "line", "message"])
    for p in problems:
        writer.writerow([p.file, "" if p.line is None else p.line, p.message])
    write_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- internals


def _check_root(cfg: DataConfig) -> None:
    if cfg.format not in FORMATS:
        raise InputError([Problem(cfg.root, None, f"unknown data format {cfg.format!r}; use one of {FORMATS}")])
    root = Path(cfg.root)
    if cfg.format == "imageclef" and not root.is_dir():
        raise InputError([Problem(cfg.root, None, "no such data set folder")])
    if cfg.format == "manifest" and not root.is_file():
        raise InputError([Problem(cfg.root, None, "no such manifest file (expected a .csv or .jsonl file)")])


def _scan(cfg: DataConfig, split: str) -> SplitScan:
    _check_root(cfg)
    if cfg.format == "imageclef":
        return read_imageclef(cfg, split)
    if cfg.format == "manifest":
        return read_manifest(cfg, split)
    from medcap.data.hf import read_hf

    return read_hf(cfg, split)


def _check_rows(scan: SplitScan, deep: bool) -> None:
    """Add the checks every format shares to each row: caption, duplicate ID, image file."""
    first: dict[str, RawRow] = {}
    for row in scan.rows:
        if scan.labelled and not (row.caption or "").strip():
            row.problems.append(Problem(row.file, row.line, f"empty caption for ID {row.id!r}"))
        if row.id in first:
            row.problems.append(
                Problem(row.file, row.line, f"duplicate ID {row.id!r} (first on {_where(first[row.id])})")
            )
        else:
            first[row.id] = row
        if isinstance(row.image, Path) and row.image.is_file() and os.stat(row.image).st_size == 0:
            row.problems.append(Problem(row.file, row.line, f"image unreadable: {row.image} is empty"))
    if not deep:
        return
    todo = [r for r in scan.rows if r.image is not None and not r.problems]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        # in chunks: one live Future per image of a 100k split is what the garbage collector keeps rescanning
        errors = [
            e for s in range(0, len(todo), 1024) for e in pool.map(lambda r: _image_error(r.image), todo[s : s + 1024])
        ]
    for row, error in zip(todo, errors, strict=True):
        if error is not None:
            shown = row.image if isinstance(row.image, Path) else "(image bytes)"
            row.problems.append(Problem(row.file, row.line, f"image unreadable: {shown}: {error}"))


def _image_error(src: Path | bytes) -> str | None:
    """Why the image cannot be decoded, or None. ``verify`` checks the structure, a draft load the data."""
    try:
        for step in ("verify", "load"):
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                if step == "verify":
                    im.verify()
                else:
                    im.draft("L", (64, 64))  # JPEG: decode at 1/8 scale, which still reads every byte
                    im.load()
    except _PIL_ERRORS as e:
        return str(e) or type(e).__name__
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, rescaling 16-bit and float images (common in medical PNGs) to 8 bits first."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(arr.astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def _where(row: RawRow) -> str:
    return f"line {row.line}" if row.line is not None else row.file


def _location(row: RawRow) -> str:
    return f"{row.file}:{row.line}" if row.line is not None else row.file


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line or 0))
