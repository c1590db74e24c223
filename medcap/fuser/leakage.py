"""The leakage guard: a learned fuser must train on candidates for images their generators never saw.

It reads the run's files, not the config's promises: each trained model lists the IDs it learned
from (``train_ids.json``), and a cross-fitted candidate row names the fold model that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from medcap.generators import needs_training
from medcap.generators.stage import TRAIN_IDS
from medcap.runs import read_jsonl

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline


class LeakageError(ValueError):
    """A fuser configuration that would learn from candidates of images their generators trained on."""


def check_fuser_inputs(pipe: Pipeline, fuser: str, split: str) -> None:
    """Raise LeakageError naming the generator and the overlap if ``fuser`` would train on leaked candidates."""
    problems = []
    ids = {ex.id for ex in pipe.split(split).examples}
    for generator in _trained_generators(pipe, fuser):
        overlap = _leaked_ids(pipe, generator, split, ids)
        if overlap:
            shown = ", ".join(sorted(overlap)[:5]) + (", ..." if len(overlap) > 5 else "")
            problems.append(
                f"generator {generator!r} was trained on {len(overlap)} of the {len(ids)} {split!r} images whose "
                f"candidates fuser {fuser!r} would learn from ({shown})"
            )
    if problems:
        raise LeakageError(
            "; ".join(problems)
            + f". Train the fuser on a split the generators did not train on (fusers.{fuser}.train_split), "
            f"or cross-fit the generators (`medcap train generator NAME -c CONFIG --folds 5`)."
        )


def _trained_generators(pipe: Pipeline, name: str) -> list[str]:
    """Generators with a trained model whose captions reach ``name``, directly or through a synthesizer."""
    found: list[str] = []
    for i in pipe.inputs_of(name):
        cfg = pipe.output_cfg(i)
        if i in [g.name for g in pipe.cfg.generators]:
            if needs_training(cfg):
                found.append(i)
        else:
            found += _trained_generators(pipe, i)
    return list(dict.fromkeys(found))


def _leaked_ids(pipe: Pipeline, generator: str, split: str, ids: set[str]) -> set[str]:
    model = pipe.run.model(generator)
    seen: dict[Path, frozenset[str]] = {}
    leaked = set()
    for row in read_jsonl(pipe.run.candidates(generator, split)):
        if row["id"] not in ids:
            continue
        folder = model / f"fold-{row['fold']}" if "fold" in row else model
        if folder not in seen:
            seen[folder] = _train_ids(folder)
        if row["id"] in seen[folder]:
            leaked.add(row["id"])
    return leaked


def _train_ids(folder: Path) -> frozenset[str]:
    path = folder / TRAIN_IDS
    if not path.exists():  # a model given by path (generators.NAME.adapter): we cannot tell, so trust it
        return frozenset()
    return frozenset(json.loads(path.read_text()))
