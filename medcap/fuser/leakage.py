"""The leakage guard: a learned fuser must train on candidates for images their generators never saw.

It reads the run's files, not the config's promises: each trained model lists the IDs it learned
from (``train_ids.json``), and a cross-fitted candidate row names the fold model that wrote it. It
fails closed: a learned generator whose training IDs cannot be found (an adapter given by path
without ``train_ids.json``) is refused, not trusted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from medcap.files import read_jsonl
from medcap.generators import needs_training
from medcap.generators.stage import TRAIN_IDS

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline


class LeakageError(ValueError):
    """A fuser configuration that would learn from candidates of images their generators trained on."""


def check_fuser_inputs(pipe: Pipeline, fuser: str, split: str) -> None:
    """Raise LeakageError naming the generator and the overlap if ``fuser`` would train on leaked candidates."""
    problems, folds_hint = [], []
    ids = {ex.id for ex in pipe.split(split).examples}
    for generator in learned_generators(pipe, fuser):
        try:
            overlap = _leaked_ids(pipe, generator, split, ids)
        except FileNotFoundError as e:
            problems.append(str(e))
            continue
        if overlap:
            shown = ", ".join(sorted(overlap)[:5]) + (", ..." if len(overlap) > 5 else "")
            problems.append(
                f"generator {generator!r} was trained on {len(overlap)} of the {len(ids)} {split!r} images whose "
                f"candidates fuser {fuser!r} would learn from ({shown})"
            )
            if split == pipe.cfg.data.index_split:
                folds_hint.append(f"--set generators.{generator}.folds=5")
    problems += _learned_fuser_inputs(pipe, fuser, split, ids)
    if problems:
        how = f"Train the fuser on a split the generators did not train on (fusers.{fuser}.train_split)"
        if folds_hint:
            how += f", or cross-fit the generators: add {' '.join(folds_hint)} to every command (or folds: 5 in CONFIG)"
        raise LeakageError("; ".join(problems) + f". {how}.")


def _learned_fuser_inputs(pipe: Pipeline, fuser: str, split: str, ids: set[str]) -> list[str]:
    """A learned fuser read on its own training split must give out-of-fold rows (each names its fold)."""
    from medcap.fuser import fuser_kind

    problems = []
    for i in pipe.inputs_of(fuser):
        cs = pipe.caption_set(i)
        if cs.stage != "fuse" or not fuser_kind(cs.cfg.kind).trains(cs.cfg):
            continue
        if fuser_kind(cs.cfg.kind).train_split(pipe, cs.cfg) != split:
            continue
        rows = [r for r in read_jsonl(pipe.path("fuse", i, split)) if r["id"] in ids]
        plain = [r["id"] for r in rows if "fold" not in r]
        if plain:
            problems.append(
                f"fuser {i!r} trained on {split!r} and gives {len(plain)} of its images without a fold (not "
                f"out-of-fold), so fuser {fuser!r} would learn from answers fitted to them (e.g. {plain[0]})"
            )
    return problems


def learned_generators(pipe: Pipeline, name: str) -> list[str]:
    """Generators with a learned model (trained by the run, or an adapter given by path) that reach ``name``."""
    found: list[str] = []
    for i in pipe.inputs_of(name):
        cs = pipe.caption_set(i)
        if cs.stage == "generate":
            if needs_training(cs.cfg) or getattr(cs.cfg, "adapter", None):
                found.append(i)
        else:
            found += learned_generators(pipe, i)
    return list(dict.fromkeys(found))


def _leaked_ids(pipe: Pipeline, generator: str, split: str, ids: set[str]) -> set[str]:
    cfg = pipe.generator_cfg(generator)
    adapter = getattr(cfg, "adapter", None)  # an adapter given by path, else the run's own model
    whole = Path(adapter) if adapter else pipe.run.model(generator)
    seen: dict[Path, frozenset[str]] = {}
    leaked = set()
    for row in read_jsonl(pipe.path("generate", generator, split)):
        if row["id"] not in ids:
            continue
        folder = pipe.run.fold_model(generator, row["fold"]) if "fold" in row else whole
        if folder not in seen:
            seen[folder] = _train_ids(folder, generator)
        if row["id"] in seen[folder]:
            leaked.add(row["id"])
    return leaked


def _train_ids(folder: Path, generator: str) -> frozenset[str]:
    for path in (folder / TRAIN_IDS, folder.parent / TRAIN_IDS):
        if path.is_file():
            return frozenset(json.loads(path.read_text()))
    raise FileNotFoundError(
        f"generator {generator!r}: {folder} lists no training IDs ({TRAIN_IDS}), so the guard cannot tell whether "
        f"a fuser would learn from its own training images; write the IDs it learned from to {folder / TRAIN_IDS}"
    )
