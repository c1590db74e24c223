"""Batches that halve on an out-of-memory error and stay halved: the guard of the hf engine and the embedder.

A GPU that runs out of memory on a batch of 16 usually manages 8. ``HalvingBatches.run`` retries
the failed batch at half its size, logs that once per halving, and keeps the smaller size for the
rest of the run (the object lives as long as the engine or the embedding pass); at a batch of 1 it
gives up with an error that says so.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's ``torch.OutOfMemoryError``, or another back-end's RuntimeError that says it ran out of memory (MPS)."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def free_accelerator_memory() -> None:
    """Drop what the failed batch left cached, so the smaller batch gets it."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class HalvingBatches:
    """Runs items ``size`` at a time; a batch that runs out of memory is retried at half the size, kept from then on."""

    size: int
    what: str  # names the work in messages, e.g. "hf engine llava-hf/llava-1.5-7b-hf"
    hint: str = ""  # what to try when even one item does not fit

    def __post_init__(self) -> None:
        self.size = max(1, int(self.size))

    def run(self, items: Sequence[T], fn: Callable[[Sequence[T]], Sequence[R]]) -> list[R]:
        """``fn`` over consecutive batches of ``items``; its results (one per item), in order."""
        import torch

        out: list[R] = []
        start = 0
        while start < len(items):
            batch = items[start : start + self.size]
            try:
                results = fn(batch)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                if len(batch) <= 1:
                    hint = f"; {self.hint}" if self.hint else ""
                    raise torch.OutOfMemoryError(
                        f"{self.what}: out of memory with a batch of 1, so halving the batch cannot help{hint} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                    ) from e
                failed = len(batch)
            else:
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.what}: {len(results)} results for a batch of {len(batch)}")
                out.extend(results)
                start += len(batch)
                continue
            # outside the except block, so the traceback and the tensors its frames hold are released first
            self.size = max(1, min(self.size, failed) // 2)
            log.warning(
                "%s: out of memory on a batch of %d; retrying with %d and keeping that size for the rest of the run",
                self.what,
                failed,
                self.size,
            )
            free_accelerator_memory()
        return out
