"""Hugging Face ``datasets`` reader: a local ``imagefolder`` directory or a hub data set id.

``datasets`` is imported only here, when such a data set is read. Images are not decoded: the
image column is cast to ``datasets.Image(decode=False)`` and each Example keeps the file path
when the file exists, else the encoded bytes. Problems name the data set and split, and their
line is the 1-based row number in that split (a data set has no file lines to point at).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medcap.config import DataConfig
from medcap.data.formats import RawRow, SplitScan, order_splits, parse_concepts
from medcap.data.problems import InputError, Problem

log = logging.getLogger(__name__)

CAPTION_COLUMNS = ("caption", "text", "report", "findings", "description")
ID_COLUMNS = ("id", "image_id")
CONCEPT_COLUMNS = ("concepts", "cuis")
SPLIT_ALIASES = {"valid": "validation", "validation": "valid", "val": "validation"}


def _load(cfg: DataConfig) -> Any:
    """``datasets.load_dataset`` on the root (a folder is read as an imagefolder); errors become InputError."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise InputError([Problem(cfg.root, None, "format 'hf' needs the `datasets` package")]) from e
    root = Path(cfg.root)
    try:
        if root.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(root))
        return datasets.load_dataset(cfg.root)
    except Exception as e:  # datasets raises many kinds; all mean "cannot read this data set"
        hint = (
            ""
            if root.is_dir()
            else " (no such folder; as a hub id it needs the hub or its cache: HF_HUB_OFFLINE=1 forbids downloads)"
        )
        raise InputError([Problem(cfg.root, None, f"cannot load Hugging Face data set: {e}{hint}")]) from e


def hf_splits(cfg: DataConfig) -> list[str]:
    """The split names of the data set, as the data set spells them."""
    return order_splits(set(_load(cfg)))


def _pick(columns: list[str], wanted: tuple[str, ...] | list[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[w.lower()] for w in wanted if w and w.lower() in lower), None)


def read_hf(cfg: DataConfig, split: str) -> SplitScan:
    """One split of a Hugging Face data set as raw rows (``valid`` and ``validation`` are aliases)."""
    import datasets

    dsd = _load(cfg)
    name = split if split in dsd else SPLIT_ALIASES.get(split)
    where = f"{cfg.root} ({split} split)"
    if name not in dsd:
        return SplitScan(fatal=[Problem(cfg.root, None, f"no split {split!r}; the data set has {sorted(dsd)}")])
    ds = dsd[name]
    image_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        return SplitScan(fatal=[Problem(where, None, f"no image column (columns: {ds.column_names})")])
    ds = ds.cast_column(image_col, datasets.Image(decode=False))
    cols = ds.column_names
    caption_col = _pick(cols, CAPTION_COLUMNS)
    id_col = _pick(cols, ID_COLUMNS)
    concept_col = _pick(cols, CONCEPT_COLUMNS)
    group_col = _pick(cols, [cfg.group_column or "", "group"])
    scan = SplitScan(labelled=caption_col is not None)
    if caption_col is None:
        log.info("%s: no caption column (%s); treating it as unlabelled", where, ", ".join(CAPTION_COLUMNS))
    for i, rec in enumerate(ds):
        img = rec[image_col] or {}
        path = Path(img["path"]) if img.get("path") else None
        image: Path | bytes | None = path if path is not None and path.is_file() else img.get("bytes")
        if id_col is not None and rec[id_col] is not None and str(rec[id_col]).strip():
            image_id = str(rec[id_col]).strip()
        elif path is not None:
            image_id = path.stem
        else:
            image_id = f"{split}_{i + 1:06d}"
        caption = rec[caption_col] if caption_col else None
        group = rec[group_col] if group_col else None
        row = RawRow(
            image_id,
            image,
            None if caption is None else str(caption),
            where,
            i + 1,
            parse_concepts(rec[concept_col]) if concept_col else (),
            str(group).strip() or None if group is not None else None,
        )
        if image is None:
            missing = f": {path}" if path is not None else ""
            row.problems.append(Problem(where, i + 1, f"image missing{missing}"))
        scan.rows.append(row)
    return scan
