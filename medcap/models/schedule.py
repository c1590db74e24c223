"""What one optimiser step is: the seeded data order, its share for each process, the learning-rate schedule.

Micro-batch ``m`` is a fixed slice of epoch ``m // per_epoch``'s permutation, so it depends on
(seed, m) alone; a step is ``grad_accum`` consecutive micro-batches, whatever the number of
processes, and process r of N takes micro-batches r, r + N, ... of it (:meth:`Plan.shard`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import TrainConfig

if TYPE_CHECKING:
    from medcap.models.distributed import World

log = logging.getLogger("medcap.models.training")  # what a training says, under the loop's name


@dataclass(frozen=True)
class Plan:
    """Seeded data order: micro-batch ``m`` is a fixed slice of epoch ``m // per_epoch``'s permutation."""

    n: int
    batch_size: int
    seed: int

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def indices(self, m: int) -> list[int]:
        epoch, j = divmod(m, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return order[j * self.batch_size : (j + 1) * self.batch_size].tolist()

    def size(self, m: int) -> int:
        """Examples in micro-batch ``m`` (the last of an epoch may be short)."""
        j = m % self.per_epoch
        return min(self.batch_size, self.n - j * self.batch_size)

    def shard(self, first: int, count: int, w: World) -> list[int]:
        """The micro-batches of ``first .. first + count - 1`` that process ``w.rank`` of ``w.size`` takes."""
        return [m for m in range(first, first + count) if (m - first) % w.size == w.rank]


def micro_seed(seed: int, m: int) -> int:
    """The torch seed of micro-batch ``m`` (dropout): the same whichever process trains it."""
    return int(np.random.SeedSequence([seed, m]).generate_state(1)[0])


def total_steps(tc: TrainConfig, n: int) -> int:
    """Optimiser steps of a training: ``max_steps``, else ``epochs`` over ``n`` examples."""
    per_epoch = math.ceil(n / max(tc.batch_size, 1))
    return tc.max_steps or max(1, math.ceil(tc.epochs * per_epoch / max(tc.grad_accum, 1)))


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``s``: linear warmup over ``warmup`` steps, then linear decay to 0.

    The first step already learns ((s + 1) / (warmup + 1)), so even a one-step run moves the weights.
    """

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(0.0, (total - s) / max(1, total - warmup))

    return factor


def log_plan(recipe: Any, tc: TrainConfig, plan: Plan, total: int, w: World) -> None:
    """Say what a step is: the global batch, and how the processes share it."""
    accum = max(tc.grad_accum, 1)
    low, high = accum // w.size, -(-accum // w.size)
    each = str(high) if low == high else f"{low}-{high}"
    log.info(
        "%s: %d steps over %d training examples; global batch %d = batch_size %d x %s micro-batch(es) per process "
        "x %d process(es) (grad_accum %d in all)",
        recipe.name, total, recipe.n, plan.batch_size * accum, plan.batch_size, each, w.size, accum,
    )  # fmt: skip
    if low == 0:
        log.warning(
            "%s: grad_accum %d is less than the %d processes, so %d of them idle every step; make grad_accum a "
            "multiple of %d (batch_size x grad_accum is the global batch)",
            recipe.name, accum, w.size, w.size - accum, w.size,
        )  # fmt: skip
    elif low != high:
        log.warning("%s: grad_accum %d is not a multiple of %d processes: some do one micro-batch more", recipe.name,
                    accum, w.size)  # fmt: skip
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed not in ("no", tc.precision):
        log.warning("%s: accelerate's --mixed_precision %s is ignored; train.precision (%s) decides", recipe.name,
                    mixed, tc.precision)  # fmt: skip
