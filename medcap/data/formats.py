"""Data set readers: the ImageCLEF/ROCO folder layout and CSV/JSONL manifests.

Each reader turns one split into :class:`RawRow` records that remember the file and line they
came from, plus the problems it found. Checks common to every format (empty captions,
duplicate IDs, unreadable images) live in :mod:`medcap.data`; the Hugging Face reader is in
:mod:`medcap.data.hf`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcap.config import DataConfig
from medcap.data.problems import Problem
from medcap.data.tables import Table, read_csv_table, read_jsonl_table

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
STANDARD_SPLITS = ("train", "valid", "test")


@dataclass
class RawRow:
    """One row of a split before validation: an Example plus where it came from and what is wrong."""

    id: str
    image: Path | bytes | None
    caption: str | None
    file: str
    line: int | None
    concepts: tuple[str, ...] = ()
    group: str | None = None
    problems: list[Problem] = field(default_factory=list)


@dataclass
class SplitScan:
    """What a reader found in one split.

    ``problems`` are not tied to a kept row (a malformed CSV row, a concept row for an unknown ID);
    ``fatal`` ones make the split unusable; ``labelled`` says whether captions are expected.
    """

    rows: list[RawRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    fatal: list[Problem] = field(default_factory=list)
    labelled: bool = True


def order_splits(names: set[str]) -> list[str]:
    """train, valid, test first, then the others alphabetically."""
    return [s for s in STANDARD_SPLITS if s in names] + sorted(names - set(STANDARD_SPLITS))


def parse_concepts(value: Any) -> tuple[str, ...]:
    """Concepts from a ``;``-separated string, a JSON list written as a string, or a list."""
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text.strip("[]").split(",")
        else:
            value = text.split(";")
    return tuple(str(v).strip() for v in value if str(v).strip())


def _text(value: Any) -> str | None:
    """A cell as stripped text; None for a missing value."""
    if value is None:
        return None
    return str(value).strip()


# --------------------------------------------------------------------------- ImageCLEF layout


def imageclef_splits(root: Path) -> list[str]:
    """Splits named by ``*_captions.csv`` files and by ``train/valid/test`` folders."""
    names = {p.name[: -len("_captions.csv")] for p in root.glob("*_captions.csv")}
    names |= {s for s in STANDARD_SPLITS if (root / s).is_dir()}
    return order_splits(names)


def _image_dir(cfg: DataConfig, root: Path, split: str, split_specific: bool = False) -> Path | None:
    """The first existing folder of ``cfg.image_dirs`` (optionally only templates naming ``{split}``)."""
    for template in cfg.image_dirs:
        if split_specific and "{split}" not in template:
            continue
        folder = root / template.format(split=split)
        if folder.is_dir():
            return folder
    return None


def _list_images(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` by stem and by full name (earlier extensions in IMAGE_EXTS win)."""
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTS)}
    found: dict[str, tuple[int, Path]] = {}
    with os.scandir(folder) as it:
        for entry in it:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() not in rank or not entry.is_file():
                continue
            path = folder / entry.name
            found[entry.name] = (-1, path)
            if stem not in found or rank[ext.lower()] < found[stem][0]:
                found[stem] = (rank[ext.lower()], path)
    return {k: p for k, (_, p) in found.items()}


def read_groups(path: Path, column: str | None) -> tuple[dict[str, str], list[Problem]]:
    """Case/patient of each ID from ``metadata.csv`` (column ``ID`` and ``column``)."""
    if column is None or not path.is_file():
        return {}, []
    table = read_csv_table(path, ["ID"], [column])
    if table.fatal:
        return {}, table.fatal
    if column not in table.columns:
        log.warning("%s: no column %r; images have no group, so same-case exclusion is off", path, column)
        return {}, table.problems
    groups: dict[str, str] = {}
    first: dict[str, int] = {}
    problems = list(table.problems)
    for line, rec in table.rows:
        image_id = rec["ID"].strip()
        if image_id in first:
            problems.append(Problem(str(path), line, f"duplicate ID {image_id!r} (first on line {first[image_id]})"))
            continue
        first[image_id] = line
        if rec[column].strip():
            groups[image_id] = rec[column].strip()
    return groups, problems


def _read_concepts(path: Path, scan: SplitScan, by_id: dict[str, RawRow]) -> None:
    """Attach ``{split}_concepts.csv`` rows to the split's rows; unknown or repeated IDs are problems."""
    table = read_csv_table(path, ["ID", "CUIs"])
    scan.fatal.extend(table.fatal)
    scan.problems.extend(table.problems)
    first: dict[str, int] = {}
    for line, rec in table.rows:
        image_id = rec["ID"].strip()
        if image_id in first:
            scan.problems.append(
                Problem(str(path), line, f"duplicate ID {image_id!r} (first on line {first[image_id]})")
            )
            continue
        first[image_id] = line
        row = by_id.get(image_id)
        if row is None:
            scan.problems.append(Problem(str(path), line, f"concepts for ID {image_id!r}, which is not in the split"))
            continue
        row.concepts = parse_concepts(rec["CUIs"])


def read_imageclef(cfg: DataConfig, split: str) -> SplitScan:
    """One split of an ImageCLEF/ROCO folder: captions, concepts, images and groups."""
    root = Path(cfg.root)
    scan = SplitScan()
    captions = root / f"{split}_captions.csv"
    if captions.is_file():
        folder = _image_dir(cfg, root, split)
        table = read_csv_table(captions, ["ID", "Caption"])
        scan.fatal.extend(table.fatal)
        scan.problems.extend(table.problems)
        if folder is None:
            looked = ", ".join(str(root / t.format(split=split)) for t in cfg.image_dirs)
            scan.fatal.append(Problem(str(captions), None, f"no image folder for split {split!r}; looked for {looked}"))
            return scan
        images = _list_images(folder)
        for line, rec in table.rows:
            row = RawRow(rec["ID"].strip(), images.get(rec["ID"].strip()), rec["Caption"], str(captions), line)
            if row.image is None:
                row.problems.append(
                    Problem(row.file, line, f"image missing: no {row.id}{{{','.join(IMAGE_EXTS)}}} in {folder}")
                )
            scan.rows.append(row)
        if not table.fatal and not table.rows and not table.problems:
            scan.fatal.append(Problem(str(captions), None, "no rows after the header"))
    else:
        folder = _image_dir(cfg, root, split, split_specific=True)
        if folder is None:
            scan.fatal.append(
                Problem(str(root), None, f"no split {split!r}: neither {captions.name} nor an image folder for it")
            )
            return scan
        scan.labelled = False  # an ImageCLEF test set: images without references
        images = _list_images(folder)
        for name in sorted(k for k, p in images.items() if p.stem == k):
            scan.rows.append(RawRow(name, images[name], None, str(images[name]), None))
        if not scan.rows:
            scan.fatal.append(Problem(str(folder), None, f"no images ({', '.join(IMAGE_EXTS)}) in the folder"))
    by_id = {r.id: r for r in scan.rows}
    concepts = root / f"{split}_concepts.csv"
    if concepts.is_file():
        _read_concepts(concepts, scan, by_id)
    groups, problems = read_groups(root / "metadata.csv", cfg.group_column)
    scan.problems.extend(p for p in problems if p.line is not None)
    scan.fatal.extend(p for p in problems if p.line is None)
    for row in scan.rows:
        row.group = groups.get(row.id)
    return scan


# --------------------------------------------------------------------------- manifests


def _read_manifest(cfg: DataConfig) -> Table:
    path = Path(cfg.root)
    optional = ["caption", "concepts", "group", "split"]
    if cfg.group_column:
        optional.append(cfg.group_column)
    reader = read_jsonl_table if path.suffix.lower() in (".jsonl", ".ndjson") else read_csv_table
    return reader(path, ["id", "image"], optional)


def manifest_splits(cfg: DataConfig) -> list[str]:
    """The values of the manifest's ``split`` column; ``["train"]`` when it has none."""
    table = _read_manifest(cfg)
    if table.fatal:
        from medcap.data.problems import InputError

        raise InputError(table.fatal, f"cannot read manifest {cfg.root}")
    if not any("split" in rec for _, rec in table.rows):
        return ["train"]
    return order_splits({_text(rec.get("split")) or "train" for _, rec in table.rows})


def read_manifest(cfg: DataConfig, split: str) -> SplitScan:
    """The rows of one split of a CSV/JSONL manifest.

    Rules: a manifest without a ``split`` column is all ``train`` (so is a row with an empty
    split); a relative ``image`` path is relative to the manifest's folder; a split whose rows all
    lack a caption (or a manifest with no ``caption`` column) is unlabelled, like a test set.
    """
    path = Path(cfg.root)
    table = _read_manifest(cfg)
    scan = SplitScan(problems=list(table.problems), fatal=list(table.fatal))
    if table.fatal:
        return scan
    group_key = cfg.group_column if cfg.group_column in table.columns else "group"
    for line, rec in table.rows:
        if (_text(rec.get("split")) or "train") != split:
            continue
        image_text = _text(rec["image"]) or ""
        image = Path(image_text) if image_text else None
        if image is not None and not image.is_absolute():
            image = path.parent / image
        image_id = _text(rec["id"]) or ""
        caption = rec.get("caption")
        row = RawRow(
            image_id,
            image,
            None if caption is None else str(caption),
            str(path),
            line,
            parse_concepts(rec.get("concepts")),
            _text(rec.get(group_key)) or None,
        )
        if not image_id:
            row.problems.append(Problem(row.file, line, "empty id"))
        if image is None:
            row.problems.append(Problem(row.file, line, "empty image path"))
        elif not image.is_file():
            row.problems.append(Problem(row.file, line, f"image missing: {image}"))
        scan.rows.append(row)
    if not scan.rows and not scan.problems:
        scan.fatal.append(Problem(str(path), None, f"no rows for split {split!r}"))
    scan.labelled = any((r.caption or "").strip() for r in scan.rows)
    if not scan.labelled:
        for row in scan.rows:
            row.caption = None
    return scan
