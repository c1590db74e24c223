"""Splits by case: a validation hold-out and K folds in which no case is on both sides.

Several images of one case share a caption (MedPix), so anything learned or selected on images must
be split by case (``Example.group``, else the image itself), never by image. Both are seeded.
"""

from __future__ import annotations

import random
from typing import Any

from medcap.records import Example

Item = tuple[Example, Any]  # an example and whatever travels with it (its neighbours)


def holdout(items: list[Item], seed: int, frac: float = 0.1) -> tuple[list[Item], list[Item]]:
    """Split items into train and a small validation part, by case so that no case is in both."""
    n_groups = len({ex.group or ex.id for ex, _ in items})
    if n_groups < 2:
        return items, []
    folds = group_folds(items, min(n_groups, max(2, round(1 / frac))), seed)
    held = set(folds[0])
    return [it for it in items if it[0].id not in held], [it for it in items if it[0].id in held]


def group_folds(items: list[Item], k: int, seed: int) -> list[list[str]]:
    """K lists of image IDs, cut by case (``Example.group``, else the image itself), seeded."""
    groups = sorted({ex.group or ex.id for ex, _ in items})
    if len(groups) < k:
        raise ValueError(f"cannot cut {len(groups)} case(s) into {k} folds")
    random.Random(seed).shuffle(groups)
    fold_of = {g: i % k for i, g in enumerate(groups)}
    folds: list[list[str]] = [[] for _ in range(k)]
    for ex, _ in items:
        folds[fold_of[ex.group or ex.id]].append(ex.id)
    return folds
