"""One training loop for every trainer in medcap: LoRA SFT, the prefix captioner and the LM-Fuser.

A trainer builds its model and a :class:`Recipe` (how to make micro-batch ``m`` from example
indices, the summed token loss of a batch and its token count, validation, how to save the model
as a folder); :func:`fit` does the rest the same way for all three:

- a seeded data order (``models/schedule.py``): micro-batch ``m`` is a fixed slice of epoch
  ``m // per_epoch``'s permutation, so it depends on (seed, m) alone and a resumed run sees the
  same batches; its dropout is seeded by (seed, m) too;
- gradient accumulation with the loss averaged over every counted token of the window;
- AdamW, linear warmup and decay, gradient clipping;
- validation every ``eval_every`` steps: the model with the lowest ``val_loss`` is kept in ``best/``,
  and training stops after ``patience`` validations without improvement when a patience is given;
- an atomic checkpoint (trainable weights, optimiser, scheduler, RNG states, loop state) every
  ``save_every`` steps in ``checkpoints/step-NNNNNNN``, data that ``torch.load(weights_only=True)``
  reads (``models/checkpoints.py``); a rerun continues from the newest one and ends with the same
  weights as an uninterrupted run; a checkpoint made with other settings or data
  (``Recipe.fingerprint``) is refused, never resumed, and so is one that needs unpickling;
- ``stop_after`` (checkpoint and return after that many steps in this call) and ``on_step``.

The finished model goes to ``out_dir/FINAL`` (the best one, or the last without validation),
with the trainer's report written into the same atomic folder; then ``training.json`` records the
finished training and the checkpoints go (``train.keep_checkpoints`` keeps them).

**Data parallel.** Under ``accelerate launch`` or ``torchrun`` (``models/distributed.py``) every
process runs this loop on a whole copy of the model. The global batch is the config's whatever
the number of processes N: an optimiser step is ``grad_accum`` micro-batches of ``batch_size``
examples, and process r takes micro-batches r, r + N, ... of the step (each of ``batch_size``
examples, so ``batch_size`` is what one device holds). The token count is summed over every
process before the backward passes and the gradients after them, dropout draws from (seed,
micro-batch) alone, so N processes end with the weights of one, to float rounding, and resume
from each other's checkpoints (the data position is in micro-batches, not per-process steps).
Rank 0 validates and writes checkpoints, ``best/``, the final model and the history; the others wait.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import TrainConfig
from medcap.files import atomic_dir, read_json, write_atomic, write_json
from medcap.models import checkpoints as ckpt
from medcap.models.chat import IGNORE
from medcap.models.checkpoints import CHECKPOINTS, KEEP, STATE, checkpoints
from medcap.models.distributed import World, broadcast_parameters, sum_gradients, world
from medcap.models.schedule import Plan, linear_schedule, log_plan, micro_seed, total_steps

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS", "KEEP", "STATE", "LoopState", "Plan", "Recipe", "checkpoints", "fit", "linear_schedule",
           "reset", "total_steps"]  # fmt: skip

GRAD_CLIP = 1.0
DONE = "training.json"  # beside the final model: the finished training's fingerprint and loop state


@dataclass
class LoopState:
    """What a checkpoint records besides tensors."""

    step: int = 0  # optimiser steps done; the data position is step * grad_accum micro-batches
    examples: int = 0  # training examples those micro-batches held (every process together)
    processes: int = 1  # how many processes trained (the last of them, after a resume)
    best_loss: float | None = None
    best_step: int | None = None
    bad: int = 0  # validations in a row without improvement
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per step, validation metrics merged in

    @property
    def validations(self) -> list[dict[str, Any]]:
        return [row for row in self.history if "val_loss" in row]


@dataclass
class Recipe:
    """What one trainer supplies to :func:`fit`."""

    model: Any  # torch.nn.Module; its parameters with requires_grad are trained
    n: int  # training examples
    batch: Callable[[list[int], int], Any]  # (example indices, micro-batch number m) -> a batch
    loss: Callable[[Any], torch.Tensor]  # batch -> sum of its token losses
    tokens: Callable[[Any], int]  # batch -> how many tokens its loss sums over
    save: Callable[[Path], None]  # the model, as a finished folder (best/ and the final folder)
    fingerprint: str  # settings + data a checkpoint must match to be resumed
    validate: Callable[[], dict[str, float]] | None = None  # -> {"val_loss": ..., other metrics}
    report: Callable[[Path, LoopState], None] | None = None  # writes the trainer's report into the final folder
    name: str = "train"  # progress bar and log label
    # reads a finished folder back into ``model``: a training already finished (its checkpoints gone) returns at
    # once, and a trainer that uses ``model`` after fit needs this to get the trained weights (not the initial ones)
    load: Callable[[Path], None] | None = None


def seed_everything(seed: int) -> None:
    """Seed torch, Python and NumPy before a model is built (LoRA and mapper initialisation draw from them).

    Under a launcher this also joins the process group, which puts each process on its own GPU
    before the model is loaded there.
    """
    import torch

    world()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """Per-token (focal when gamma > 0) cross-entropy of next-token predictions where labels != IGNORE."""
    import torch.nn.functional as F

    logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    keep = labels != IGNORE
    logp = F.log_softmax(logits[keep], dim=-1).gather(1, labels[keep].unsqueeze(1)).squeeze(1)
    return -logp if gamma <= 0 else -(1.0 - logp.exp()).pow(gamma) * logp


def label_tokens(labels: torch.Tensor) -> int:
    """Tokens a next-token loss counts: labels after the first position that are not IGNORE."""
    return int((labels[:, 1:] != IGNORE).sum())


def train_step(
    window: list[Any],
    loss: Callable[[Any], torch.Tensor],
    tokens: Callable[[Any], int],
    params: list[Any],
    opt: Any,
    sched: Any,
    *,
    seeds: list[int] | None = None,
    w: World | None = None,
) -> float:
    """One optimiser step over accumulated micro-batches: the loss averaged over all their counted tokens.

    ``seeds``: a torch seed per micro-batch (its dropout). ``w``: the processes training together;
    each passes its own micro-batches, and the token count and the gradients are summed over all.
    """
    import torch

    w = w or World()
    count = sum(tokens(b) for b in window)
    if w.size > 1:
        count = int(w.sum(torch.tensor([count], dtype=torch.int64, device=w.device)).item())
    count = max(count, 1)
    total = 0.0
    for i, batch in enumerate(window):
        with _seeded(seeds[i] if seeds is not None else None, params):
            value = loss(batch) / count
            value.backward()
        total += value.item()
    if w.size > 1:
        (total,) = sum_gradients(w, params, [total])
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total


@contextlib.contextmanager
def _seeded(seed: int | None, params: list[Any]) -> Iterator[None]:
    """Run a micro-batch with torch's RNG seeded by ``seed`` (then put the RNG back as it was)."""
    if seed is None:
        yield
        return
    import torch

    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(out_dir: Path, model: Any, opt: Any, sched: Any, state: LoopState, fingerprint: str) -> Path:
    blob = {
        "fingerprint": fingerprint,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": ckpt.rng_state(),
        "state": asdict(state),
    }
    return ckpt.write(out_dir, state.step, blob)


def _load_checkpoint(path: Path, model: Any, opt: Any, sched: Any, fingerprint: str) -> LoopState:
    saved = ckpt.read(path)
    if saved["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} was written with other settings or data; pass resume=False (or train into another folder) "
            "to start afresh"
        )
    result = model.load_state_dict(saved["trainable"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights the model does not have: {result.unexpected_keys[:3]}")
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    ckpt.set_rng_state(saved["rng"])
    return LoopState(**saved["state"])


def _finished(out_dir: Path, final: str, fingerprint: str) -> LoopState | None:
    """The loop state of a training already finished in ``out_dir`` with this fingerprint, else None."""
    path = out_dir / DONE
    if not path.is_file() or not (out_dir / final).is_dir():
        return None
    done = read_json(path)
    return LoopState(**done["state"]) if done.get("fingerprint") == fingerprint else None


def reset(out_dir: Path, final: str) -> None:
    """Forget a training: its checkpoints, best model, history and finished model (rank 0 removes them)."""
    w = world()
    if w.is_main:
        for name in (CHECKPOINTS, "best", final):
            shutil.rmtree(Path(out_dir) / name, ignore_errors=True)
        for name in ("history.jsonl", DONE):
            (Path(out_dir) / name).unlink(missing_ok=True)
    w.barrier()


# --------------------------------------------------------------------------- the loop


def fit(
    recipe: Recipe,
    tc: TrainConfig,
    out_dir: Path,
    final: str,
    *,
    patience: int | None = None,
    stop_after: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[Path, LoopState]:
    """Train ``recipe.model``; returns (``out_dir/final``, loop state).

    With ``stop_after`` the call returns after that many steps once a checkpoint is written, and
    the final folder does not exist yet; calling again resumes. A training already finished in
    ``out_dir`` with the same fingerprint returns at once (``recipe.load`` reads its model back).
    """
    import torch

    from medcap.logs import progress

    w = world()
    out_dir = Path(out_dir)
    done = _finished(out_dir, final, recipe.fingerprint)
    if done is not None:
        log.info("%s: already trained: %s", recipe.name, out_dir / final)
        if recipe.load is not None:
            recipe.load(out_dir / final)
        return out_dir / final, done
    if w.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (out_dir / CHECKPOINTS).glob(".step-*.tmp"):  # a checkpoint cut off by a kill
            shutil.rmtree(stale, ignore_errors=True)
    model, accum = recipe.model, max(tc.grad_accum, 1)
    plan = Plan(recipe.n, max(tc.batch_size, 1), tc.seed)
    total = total_steps(tc, recipe.n)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(int(tc.warmup_ratio * total), total))

    state = LoopState(processes=w.size)
    found = checkpoints(out_dir)
    if found:
        state = _load_checkpoint(found[-1], model, opt, sched, recipe.fingerprint)
        log.info(
            "%s: resuming at step %d of %d (%d examples in) from %s",
            recipe.name, state.step, total, state.examples, found[-1],
        )  # fmt: skip
        if state.processes != w.size:
            log.info(
                "%s: the checkpoint was written by %d process(es), this run has %d: the same data order and global "
                "batch, so it continues where it stopped", recipe.name, state.processes, w.size,
            )  # fmt: skip
        state.processes = w.size
    elif w.is_main:
        shutil.rmtree(out_dir / "best", ignore_errors=True)
    broadcast_parameters(w, params)
    log_plan(recipe, tc, plan, total, w)

    def validate() -> dict[str, float]:
        metrics = None
        if w.is_main:
            model.eval()
            with torch.no_grad():
                metrics = recipe.validate()
            model.train()
        metrics = w.share(metrics)
        loss = metrics["val_loss"]
        if state.best_loss is None or loss < state.best_loss:
            state.best_loss, state.best_step, state.bad = loss, state.step, 0
            if w.is_main:
                with atomic_dir(out_dir / "best") as tmp:
                    recipe.save(tmp)
        else:
            state.bad += 1
        state.stopped_early = patience is not None and state.bad >= patience
        log.info("%s step %d: %s", recipe.name, state.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def checkpoint() -> None:
        if w.is_main:
            _save_checkpoint(out_dir, model, opt, sched, state, recipe.fingerprint)
            rows = "".join(json.dumps(row) + "\n" for row in state.validations)
            write_atomic(out_dir / "history.jsonl", rows)
        w.barrier()  # every process knows the checkpoint is whole before it goes on (or is killed)

    model.train()
    done_here = 0
    with progress(total=total, initial=state.step, desc=recipe.name, unit="step") as bar:
        while state.step < total and not state.stopped_early:
            first = state.step * accum
            mine = plan.shard(first, accum, w)
            window = [recipe.batch(plan.indices(m), m) for m in mine]
            seeds = [micro_seed(tc.seed, m) for m in mine]
            loss_value = train_step(window, recipe.loss, recipe.tokens, params, opt, sched, seeds=seeds, w=w)
            state.step += 1
            state.examples += sum(plan.size(m) for m in range(first, first + accum))
            done_here += 1
            row: dict[str, Any] = {"step": state.step, "loss": loss_value, "lr": sched.get_last_lr()[0]}
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            last = state.step == total
            if recipe.validate is not None and (state.step % tc.eval_every == 0 or last):
                row |= validate()
            state.history.append(row)
            pause = stop_after is not None and done_here >= stop_after and not last
            if state.step % tc.save_every == 0 or last or pause or state.stopped_early:
                checkpoint()
            if on_step is not None:
                on_step(state.step)
            if pause and not state.stopped_early:
                log.info("%s: stopped at step %d of %d; call again to resume", recipe.name, state.step, total)
                return out_dir / final, state
    if state.stopped_early:
        log.info("%s: early stop at step %d: no improvement in %d validations", recipe.name, state.step, patience)
    if w.is_main:
        _write_final(recipe, tc, out_dir, final, state)
    w.barrier()
    return out_dir / final, state


def _write_final(recipe: Recipe, tc: TrainConfig, out_dir: Path, final: str, state: LoopState) -> None:
    """The final model (the best one, else the last) and its report; then the record, then the scaffolding goes."""
    best = out_dir / "best"
    with atomic_dir(out_dir / final) as tmp:
        if best.is_dir():
            shutil.copytree(best, tmp, dirs_exist_ok=True)
        else:
            recipe.save(tmp)
        if recipe.report is not None:
            recipe.report(tmp, state)
    write_json(out_dir / DONE, {"fingerprint": recipe.fingerprint, "final": final, "state": asdict(state)})
    shutil.rmtree(best, ignore_errors=True)
    if not tc.keep_checkpoints:  # the final model is written: optimiser state is GBs nobody resumes from
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    log.info("%s: model written to %s", recipe.name, out_dir / final)
