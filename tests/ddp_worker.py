"""A tiny training for the data-parallel tests and bench/train_ddp.py: ``train(out)`` in this process, or

    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT [--exit-after STEP] [--stop-after N] [--checkpointing]

in several (gloo on CPUs). Examples are sequences of 1-3 "tokens" (so micro-batches count different
numbers of tokens), the model has dropout (so the per-micro-batch seeds matter), and validation
keeps a best model, as the real trainers do.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from medcap.config import TrainConfig
from medcap.models import training

N, DIM, CLASSES = 24, 8, 5


def config(**overrides) -> TrainConfig:
    base = dict(max_steps=6, batch_size=3, grad_accum=4, lr=0.05, warmup_ratio=0.2, eval_every=3, save_every=2)
    return TrainConfig(**(base | overrides))


class Net(torch.nn.Module):
    """Linear, tanh, dropout, linear; ``checkpointing``: the first three recomputed in the backward pass
    (reentrant activation checkpointing, what QLoRA's gradient checkpointing does)."""

    def __init__(self, hidden: int, checkpointing: bool = False):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(DIM, hidden), torch.nn.Tanh(), torch.nn.Dropout(0.2))
        self.head = torch.nn.Linear(hidden, CLASSES)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training:
            from torch.utils.checkpoint import checkpoint

            return self.head(checkpoint(self.body, x.requires_grad_(), use_reentrant=True))
        return self.head(self.body(x))


def recipe(hidden: int = 16, n: int = N, checkpointing: bool = False) -> training.Recipe:
    training.seed_everything(0)
    model = Net(hidden, checkpointing)
    g = torch.Generator().manual_seed(1)
    lengths = [1 + i % 3 for i in range(n)]
    xs = [torch.randn(t, DIM, generator=g) for t in lengths]
    ys = [torch.randint(0, CLASSES, (t,), generator=g) for t in lengths]
    vx, vy = torch.randn(8, DIM, generator=g), torch.randint(0, CLASSES, (8,), generator=g)

    def batch(idx: list[int], m: int):
        return torch.cat([xs[i] for i in idx]), torch.cat([ys[i] for i in idx])

    def loss(b) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(b[0]), b[1], reduction="sum")

    def validate() -> dict[str, float]:
        return {"val_loss": float(torch.nn.functional.cross_entropy(model(vx), vy))}

    def save(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))

    def load(folder: Path) -> None:
        model.load_state_dict(weights(folder))

    return training.Recipe(
        model=model,
        n=n,
        batch=batch,
        loss=loss,
        tokens=lambda b: len(b[1]),
        save=save,
        fingerprint=f"ddp-worker-{hidden}-{n}",
        validate=validate,
        name="ddp worker",
        load=load,
    )


def train(out: Path, tc: TrainConfig | None = None, *, exit_after: int | None = None, checkpointing=False, **kw):
    """Train the tiny recipe into ``out``; ``exit_after``: rank 1 dies (os._exit) after that step."""

    def on_step(step: int) -> None:
        if exit_after is not None and step == exit_after and training.world().rank == 1:
            os._exit(3)

    r = recipe(checkpointing=checkpointing)
    return training.fit(r, tc or config(), out, "final", on_step=on_step, **kw)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "weights.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--exit-after", type=int, default=None)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    tc = config(max_steps=args.steps, batch_size=args.batch_size)
    start = time.perf_counter()
    if args.hidden != 16 or args.n != N:  # the bench: a bigger model, no validation
        r = recipe(args.hidden, args.n)
        r.validate = None
        training.fit(r, tc, Path(args.out), "final", stop_after=args.stop_after)
    else:
        train(
            Path(args.out), tc, exit_after=args.exit_after, stop_after=args.stop_after, checkpointing=args.checkpointing
        )
    if training.world().is_main:
        print(f"seconds {time.perf_counter() - start:.3f}", flush=True)


if __name__ == "__main__":
    main()
