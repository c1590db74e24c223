"""The processes of one training: one, or N started by ``accelerate launch`` / ``torchrun`` (data parallel).

:func:`world` reads the launcher's environment. Without a launcher (no ``WORLD_SIZE`` above 1) it
is a single process: nothing distributed is imported or started, and the training loop runs as
it always did. Under a launcher it joins the process group through ``accelerate.PartialState``
(gloo on CPUs, NCCL on GPUs; each process on its own GPU, so ``cuda`` means that process's GPU),
and :class:`World` gives the loop what data parallelism needs: rank, barriers, sums and rank 0's
values broadcast. Gradients are summed after the local micro-batches (:func:`sum_gradients`), the
arithmetic of DDP, so any ``Recipe`` works whatever model its closures call.

FSDP and DeepSpeed (from an accelerate config) are refused: the loop keeps a whole copy of the
model in every process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)

WAIT = timedelta(hours=6)  # how long a process waits for the others (rank 0 may be making inputs or validating)
BUCKET = 1 << 24  # gradient elements summed per collective (64 MB of fp32)


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 without a launcher); starts nothing."""
    return int(os.environ.get("RANK", "0") or 0)


def launched() -> bool:
    """True in a process that a launcher started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def lone_cpu_launch() -> bool:
    """True in the one process ``accelerate launch --num_processes N --cpu`` starts.

    accelerate starts several CPU processes only through mpirun (``--mpirun_hostfile``); without it
    it runs the script once, with ``MASTER_ADDR`` set but no ranks.
    """
    return _flag("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ and not launched()


@dataclass(frozen=True)
class World:
    """The processes training together; a single process by default."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives run: cpu (gloo) or this process's GPU (NCCL)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def sum(self, tensor: Any) -> Any:
        """``tensor`` summed over every process (a new tensor on ``tensor``'s device)."""
        if self.size == 1:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor.to(self.device), "sum").to(tensor.device)

    def broadcast(self, tensor: Any) -> Any:
        """Rank 0's ``tensor`` in every process (a tensor on ``tensor``'s device)."""
        if self.size == 1:
            return tensor
        from accelerate.utils import broadcast

        return broadcast(tensor.to(self.device).contiguous(), from_process=0).to(tensor.device)

    def share(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` in every process (validation metrics: numbers made here, not read from disk)."""
        if self.size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it writes a shared file), the others after it (they find it written)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def world() -> World:
    """The processes of this training, joined into their process group on first use under a launcher."""
    if not launched():
        return World()
    import torch
    from accelerate import PartialState

    for name, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if _flag(name):
            raise ValueError(
                f"the accelerate config asks for {what}; medcap's training loop is data-parallel with a whole copy "
                "of the model in every process (DDP). LoRA and QLoRA adapters of the 7B generators fit one GPU "
                "each: launch without FSDP/DeepSpeed (`accelerate launch --multi_gpu`)"
            )
    fresh = not torch.distributed.is_initialized()
    cpu = _flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=WAIT)
    if fresh and torch.distributed.is_initialized():  # ours to close: a gloo group left open aborts at exit
        atexit.register(_close, state)
    size = int(os.environ["WORLD_SIZE"])
    if state.num_processes != size:
        raise RuntimeError(f"the launcher started {size} processes but accelerate sees {state.num_processes}")
    device = "cpu" if state.backend == "gloo" else str(state.device)
    return World(state.process_index, state.num_processes, state.local_process_index, device)


def _close(state: Any) -> None:
    """Leave the process group at exit; a gloo group left to the interpreter's teardown aborts the process."""
    import gc

    state.destroy_process_group()
    gc.collect()  # its threads go now, not in C++ static destructors ("terminate called": 1 exit in 8 without it)


def sum_gradients(w: World, params: list[Any], extra: list[float]) -> list[float]:
    """Sum the gradients of ``params`` over every process, in place, as DDP does; returns ``extra`` summed too.

    A parameter without a gradient in every process keeps none (AdamW then skips it, as in one
    process); one with a gradient somewhere gets the sum, zeros standing in where it had none.
    """
    import torch

    device = params[0].device if params else torch.device("cpu")
    meta = torch.tensor([float(p.grad is not None) for p in params] + list(extra), dtype=torch.float64, device=device)
    meta = w.sum(meta)
    live = [p for p, has in zip(params, meta[: len(params)].tolist(), strict=True) if has > 0]
    for p, has in zip(params, meta[: len(params)].tolist(), strict=True):
        if has == 0:
            p.grad = None
    for bucket in _buckets(live):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in bucket])
        flat = w.sum(flat)
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
    return meta[len(params) :].tolist()


def broadcast_parameters(w: World, params: list[Any]) -> None:
    """Rank 0's values of ``params`` in every process (the same start, as DDP makes it)."""
    if w.size == 1:
        return
    import torch

    for bucket in _buckets(params):
        with torch.no_grad():
            flat = w.broadcast(torch.cat([p.detach().reshape(-1).float() for p in bucket]))
            offset = 0
            for p in bucket:
                n = p.numel()
                p.copy_(flat[offset : offset + n].view_as(p))
                offset += n


def _buckets(params: list[Any]) -> Iterator[list[Any]]:
    bucket: list[Any] = []
    size = 0
    for p in params:
        bucket.append(p)
        size += p.numel()
        if size >= BUCKET:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
