"""One training loop for every trainer in medcap: LoRA SFT, the prefix captioner and the LM-Fuser.

A trainer builds its model and a :class:`Recipe` (how to make micro-batch ``m`` from example
indices, the summed token loss of a batch and its token count, validation, how to save the model
as a folder); :func:`fit` does the rest the same way for all three:

- a seeded data order: micro-batch ``m`` is a fixed slice of epoch ``m // per_epoch``'s permutation,
  so it depends on (seed, m) alone and a resumed run sees the same batches;
- gradient accumulation with the loss averaged over every counted token of the window;
- AdamW, linear warmup and decay, gradient clipping;
- validation every ``eval_every`` steps: the model with the lowest ``val_loss`` is kept in ``best/``,
  and training stops after ``patience`` validations without improvement when a patience is given;
- an atomic checkpoint (trainable weights, optimiser, scheduler, RNG states, loop state) every
  ``save_every`` steps in ``checkpoints/step-NNNNNNN``; a rerun continues from the newest one and
  ends with the same weights as an uninterrupted run; a checkpoint made with other settings or
  data (``Recipe.fingerprint``) is refused, never resumed;
- ``stop_after`` (checkpoint and return after that many steps in this call) and ``on_step``.

The finished model goes to ``out_dir/FINAL`` (the best one, or the last without validation),
with the trainer's report written into the same atomic folder.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import TrainConfig
from medcap.files import atomic_dir, write_atomic
from medcap.models.chat import IGNORE

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE = "state.pt"
GRAD_CLIP = 1.0
KEEP = 2  # newest complete checkpoints kept


@dataclass
class LoopState:
    """What a checkpoint records besides tensors."""

    step: int = 0  # optimiser steps done; the data position is step * grad_accum micro-batches
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


def seed_everything(seed: int) -> None:
    """Seed torch, Python and NumPy before a model is built (LoRA and mapper initialisation draw from them)."""
    import torch

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
) -> float:
    """One optimiser step over accumulated micro-batches: the loss averaged over all their counted tokens."""
    import torch

    count = max(sum(tokens(b) for b in window), 1)
    total = 0.0
    for batch in window:
        value = loss(batch) / count
        value.backward()
        total += value.item()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total


# --------------------------------------------------------------------------- checkpoints


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out_dir: Path, model: Any, opt: Any, sched: Any, state: LoopState, fingerprint: str) -> Path:
    import torch

    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    blob = {
        "fingerprint": fingerprint,
        "trainable": trainable,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": _rng_state(),
        "state": asdict(state),
    }
    dst = Path(out_dir) / CHECKPOINTS / f"step-{state.step:07d}"
    try:
        with atomic_dir(dst) as tmp:
            torch.save(blob, tmp / STATE)
    except (OSError, RuntimeError) as e:  # a full disk surfaces from torch as "unexpected pos ..."
        free = shutil.disk_usage(Path(out_dir)).free // 2**20
        raise OSError(
            f"{dst}: the checkpoint could not be written ({free} MB free on that disk; the previous checkpoints "
            f"are kept and a rerun resumes from the newest): {e}"
        ) from e
    for old in checkpoints(out_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def _load_checkpoint(path: Path, model: Any, opt: Any, sched: Any, fingerprint: str) -> LoopState:
    import torch

    saved = torch.load(path / STATE, map_location="cpu", weights_only=False)  # our own file: RNG tuples
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
    _set_rng_state(saved["rng"])
    return LoopState(**saved["state"])


def reset(out_dir: Path, final: str) -> None:
    """Forget a training: its checkpoints, best model, history and finished model."""
    for name in (CHECKPOINTS, "best", final):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)
    (Path(out_dir) / "history.jsonl").unlink(missing_ok=True)


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
    the final folder does not exist yet; calling again resumes.
    """
    import torch

    from medcap.logs import progress

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, accum = recipe.model, max(tc.grad_accum, 1)
    plan = Plan(recipe.n, max(tc.batch_size, 1), tc.seed)
    total = total_steps(tc, recipe.n)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(int(tc.warmup_ratio * total), total))

    state = LoopState()
    found = checkpoints(out_dir)
    if found:
        state = _load_checkpoint(found[-1], model, opt, sched, recipe.fingerprint)
        log.info("%s: resuming at step %d of %d from %s", recipe.name, state.step, total, found[-1])
    else:
        shutil.rmtree(out_dir / "best", ignore_errors=True)
    log.info(
        "%s: %d steps of %d x %d examples (%d training examples)", recipe.name, total, plan.batch_size, accum, recipe.n
    )

    def validate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            metrics = recipe.validate()
        model.train()
        loss = metrics["val_loss"]
        if state.best_loss is None or loss < state.best_loss:
            state.best_loss, state.best_step, state.bad = loss, state.step, 0
            with atomic_dir(out_dir / "best") as tmp:
                recipe.save(tmp)
        else:
            state.bad += 1
        state.stopped_early = patience is not None and state.bad >= patience
        log.info("%s step %d: %s", recipe.name, state.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def checkpoint() -> None:
        _save_checkpoint(out_dir, model, opt, sched, state, recipe.fingerprint)
        rows = "".join(json.dumps(row) + "\n" for row in state.validations)
        write_atomic(out_dir / "history.jsonl", rows)

    model.train()
    done_here = 0
    with progress(total=total, initial=state.step, desc=recipe.name, unit="step") as bar:
        while state.step < total and not state.stopped_early:
            first = state.step * accum
            window = [recipe.batch(plan.indices(m), m) for m in range(first, first + accum)]
            loss_value = train_step(window, recipe.loss, recipe.tokens, params, opt, sched)
            state.step += 1
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

    best = out_dir / "best"
    with atomic_dir(out_dir / final) as tmp:
        if best.is_dir():
            shutil.copytree(best, tmp, dirs_exist_ok=True)
        else:
            recipe.save(tmp)
        if recipe.report is not None:
            recipe.report(tmp, state)
    shutil.rmtree(best, ignore_errors=True)
    log.info("%s: model written to %s", recipe.name, out_dir / final)
    return out_dir / final, state
