"""Training of the LM-Fuser: (candidates, neighbours) -> reference caption, on a causal LM (LoRA or full).

The prompt is ``lm.fuser_prompt`` (candidates in a random order per example) rendered with the
tokenizer's chat template; the training sequence is the same messages plus the assistant turn.
Labels are -100 on every prompt token, on padding and after the first end-of-turn token, so only
the reference caption and its end of turn are learned. The rendered generation prompt must be a
token prefix of the training sequence (``PromptDriftError`` otherwise): training and inference
format prompts the same way.

AdamW with linear warmup and decay, gradient accumulation, ``max_steps`` or ``epochs``; the
validation loss every ``eval_every`` steps keeps the best model and stops early after
``PATIENCE`` validations without improvement. Every ``save_every`` steps an atomic checkpoint
(trainable weights, optimiser, scheduler, step, RNG, early-stopping state) goes to
``out_dir/checkpoints/step-N`` (temporary folder + rename); a rerun resumes from the latest one and
ends with the same weights as an uninterrupted run. ``out_dir/final`` holds the model (or the
adapter; the base model is named in ``medcap_fuser.json``), its tokenizer and ``medcap_fuser.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import FusionConfig
from medcap.engines.hf import text_only as text_messages
from medcap.fuser.lm import META, fuser_prompt
from medcap.generators.families import render_chat
from medcap.generators.sft_data import END_OF_TURN, IGNORE, PromptDriftError
from medcap.records import NeighbourList
from medcap.runs import atomic_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PATIENCE = 3  # validations without improvement before training stops
FORBIDDEN_TARGETS = ("lm_head", "embed_tokens")  # vLLM serves no adapter that touches them

TrainItem = tuple[dict[str, str], NeighbourList | None, str]  # candidates, neighbours, reference caption


def add_special_tokens(tokenizer: Any, texts: Sequence[str]) -> bool:
    """The hf engine's rule: let the tokenizer add BOS unless the chat template already did."""
    bos = tokenizer.bos_token
    return not (bos and all(t.startswith(bos) for t in texts))


class FuserCollator:
    """Items -> right-padded ``input_ids``, ``attention_mask`` and ``labels`` (caption tokens only)."""

    def __init__(self, tokenizer: Any, cfg: FusionConfig, *, max_length: int, eos_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_length = max_length
        self.precision = cfg.train.precision
        vocab = tokenizer.get_vocab()
        self.stop_ids = {int(i) for i in eos_ids if i is not None} | {vocab[t] for t in END_OF_TURN if t in vocab}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(int(tokenizer.eos_token_id))
        self.stop_strings = [tokenizer.convert_ids_to_tokens(i) for i in sorted(self.stop_ids)]

    def texts(self, item: TrainItem, rng: random.Random | None) -> tuple[str, str]:
        """(generation prompt, training text); the second extends the first."""
        candidates, neighbours, reference = item
        messages = text_messages(fuser_prompt(candidates, neighbours, self.cfg, rng=rng))
        prompt = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        turn = {"role": "assistant", "content": reference.strip()}
        full = render_chat(self.tokenizer, [*messages, turn], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise PromptDriftError(
                f"the chat template's generation prompt is not a prefix of the training text;\n"
                f"prompt ends: {prompt[-80:]!r}\ntraining text there: {full[max(len(prompt) - 80, 0) : len(prompt) + 20]!r}"
            )
        completion = full[len(prompt) :]
        if not any(s in completion for s in self.stop_strings):  # a template that closes the turn with nothing
            full = prompt + completion.rstrip() + self.tokenizer.eos_token
        return prompt, full

    def __call__(self, items: Sequence[TrainItem], rng: random.Random | None = None) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        pairs = [self.texts(item, rng) for item in items]
        fulls = [f for _, f in pairs]
        special = add_special_tokens(tok, fulls)
        enc = tok(fulls, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=special)
        ids, attn = enc["input_ids"], enc["attention_mask"]
        labels = ids.clone()
        labels[attn == 0] = IGNORE
        for i, (prompt, _) in enumerate(pairs):
            p = tok(prompt, add_special_tokens=add_special_tokens(tok, [prompt]))["input_ids"]
            row = ids[i, : int(attn[i].sum())].tolist()
            if len(p) >= len(row) or row[: len(p)] != p:
                at = next((j for j in range(min(len(p), len(row))) if row[j] != p[j]), min(len(p), len(row)))
                raise PromptDriftError(
                    f"the tokenised generation prompt ({len(p)} tokens) is not a prefix of the training sequence "
                    f"({len(row)} tokens); first difference at token {at}: prompt {tok.decode(p[at : at + 5])!r} "
                    f"vs training {tok.decode(row[at : at + 5])!r}"
                )
            if len(p) >= self.max_length:
                raise ValueError(
                    f"a fuser prompt is {len(p)} tokens, more than train.max_length={self.max_length}; "
                    "raise max_length or show fewer candidates/neighbours"
                )
            labels[i, : len(p)] = IGNORE
            end = next((j for j, t in enumerate(row[len(p) :]) if t in self.stop_ids), None)
            if end is not None:
                labels[i, len(p) + end + 1 :] = IGNORE
        out = {"input_ids": ids, "attention_mask": attn, "labels": labels}
        return {k: v[:, : self.max_length] for k, v in out.items()}


class _Batches:
    """Deterministic micro-batches: micro-batch ``m`` depends only on (seed, m), so resuming is exact."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)

    def __call__(self, m: int) -> list[int]:
        epoch, pos = divmod(m, self.per_epoch)
        perm = list(range(self.n))
        random.Random(f"{self.seed}:{epoch}").shuffle(perm)
        return perm[pos * self.bs : (pos + 1) * self.bs]


def _clean_items(items: Sequence[TrainItem], what: str) -> list[TrainItem]:
    kept = [it for it in items if it[2] and it[2].strip() and any(c and c.strip() for c in it[0].values())]
    if len(kept) < len(items):
        log.warning(
            "%s: %d of %d items without a reference or candidates are skipped", what, len(items) - len(kept), len(items)
        )
    return kept


def _fingerprint(cfg: FusionConfig, train: Sequence[TrainItem]) -> str:
    """What a checkpoint must match to be resumed: the training settings and the data."""
    h = hashlib.sha256()
    for cands, nl, ref in train:
        h.update(json.dumps([sorted(cands.items()), nl.to_json() if nl else None, ref]).encode())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("engine", "generation", "name")}
    return json.dumps({"settings": settings, "data": h.hexdigest()}, sort_keys=True)


def _atomic_dir(dst: Path, write) -> None:
    """Run ``write(tmp)`` on a temporary sibling folder, then put it in place of ``dst``."""
    with atomic_dir(dst) as tmp:
        write(tmp)


def _latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in root.glob("step-*") if (p / "state.pt").is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _load_model(cfg: FusionConfig):
    from medcap.lms import load_causal_lm

    precision = cfg.train.precision
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"fusers.{cfg.name}.train.precision: {precision!r} is not one of auto | fp32 | bf16")
    # Full fine-tuning keeps fp32 master weights (bf16 only through autocast); LoRA's frozen base may be bf16.
    dtype = "fp32" if cfg.lora is None else precision
    model, tok = load_causal_lm(cfg.model, dtype=dtype, device=cfg.engine.device)
    if cfg.lora is None:
        return model, tok
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    bad = [t for t in cfg.lora.target_modules if any(f in t for f in FORBIDDEN_TARGETS)]
    if bad:
        raise ValueError(
            f"fusers.{cfg.name}.lora.target_modules: {bad} adapt lm_head/embed_tokens, which vLLM cannot serve"
        )
    if cfg.lora.qlora:
        raise ValueError(
            f"fusers.{cfg.name}.lora.qlora is not supported for the LM-Fuser; use LoRA or full fine-tuning"
        )
    peft_cfg = PeftLora(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg), tok


def _autocast(model: Any, precision: str):
    """bf16 autocast on CUDA unless fp32 is asked for; nothing on a CPU."""
    import contextlib

    import torch

    if model.device.type == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _valid_loss(model: Any, collator: FuserCollator, items: Sequence[TrainItem], batch_size: int) -> float:
    """Token-weighted mean loss over the validation items (candidates in their inference order)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            batch = {k: v.to(model.device) for k, v in collator(items[s : s + batch_size]).items()}
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            with _autocast(model, collator.precision):
                total += float(model(**batch).loss) * n
            count += n
    model.train()
    return total / max(count, 1)


def _save_final(model: Any, tok: Any, cfg: FusionConfig, dst: Path, info: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {"base_model": cfg.model, "adapter": cfg.lora is not None, "config": asdict(cfg), **info}
        (tmp / META).write_text(json.dumps(meta, indent=2))

    _atomic_dir(dst, write)


def train_fuser(
    cfg: FusionConfig,
    train: list[TrainItem],
    valid: list[TrainItem],
    out_dir: Path,
    *,
    resume: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train an LM-Fuser and return ``out_dir/final``.

    ``resume``: continue from the latest checkpoint (or return at once when ``final`` exists);
    False starts afresh. ``stop_after``: checkpoint and return after this many optimiser steps in
    this call (time-boxed training; ``final`` is not written yet); calling again resumes.
    """
    import torch
    from tqdm.auto import tqdm

    out_dir, tc = Path(out_dir), cfg.train
    final, best_dir, ckpts = out_dir / "final", out_dir / "best", out_dir / "checkpoints"
    if not resume:
        for p in (final, best_dir, ckpts):
            shutil.rmtree(p, ignore_errors=True)
        (out_dir / "history.jsonl").unlink(missing_ok=True)
    if (final / META).is_file():
        log.info("LM-Fuser already trained: %s", final)
        return final
    train, valid = _clean_items(train, "fuser train"), _clean_items(valid, "fuser valid")
    if not train:
        raise ValueError("no fuser training item has both a reference caption and a candidate")
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(tc.seed)
    model, tok = _load_model(cfg)
    model.train()
    collator = FuserCollator(tok, cfg, max_length=tc.max_length, eos_ids=_eos_ids(model))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    batches = _Batches(len(train), tc.batch_size, tc.seed)
    total = tc.max_steps or max(1, math.ceil(tc.epochs * batches.per_epoch / tc.grad_accum))
    warmup = int(total * tc.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    fingerprint = _fingerprint(cfg, train)
    state: dict[str, Any] = {"step": 0, "best": math.inf, "bad": 0, "stopped_early": False}
    latest = _latest_checkpoint(ckpts)
    if latest is not None:
        saved = torch.load(latest / "state.pt", map_location=model.device, weights_only=False)
        if saved["fingerprint"] != fingerprint:
            raise ValueError(f"{latest} was written with other settings or data; pass resume=False to start afresh")
        unexpected = model.load_state_dict(saved["trainable"], strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{latest}: weights the model does not have: {unexpected[:3]}")
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"].cpu())
        if torch.cuda.is_available() and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        state = saved["state"]
        log.info("resuming %s at step %d of %d", out_dir, state["step"], total)

    def checkpoint() -> None:
        def write(tmp: Path) -> None:
            trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            torch.save(
                {
                    "fingerprint": fingerprint,
                    "trainable": trainable,
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "state": dict(state),
                },
                tmp / "state.pt",
            )

        dst = ckpts / f"step-{state['step']:07d}"
        _atomic_dir(dst, write)
        for old in ckpts.glob("step-*"):  # keep the newest complete checkpoint only
            if old != dst:
                shutil.rmtree(old, ignore_errors=True)

    def validate() -> None:
        if not valid:
            return
        loss = _valid_loss(model, collator, valid, tc.batch_size)
        improved = loss < state["best"]
        state["best"], state["bad"] = (loss, 0) if improved else (state["best"], state["bad"] + 1)
        log.info("step %d: valid loss %.4f%s", state["step"], loss, " (best)" if improved else "")
        with (out_dir / "history.jsonl").open("a") as f:
            f.write(json.dumps({"step": state["step"], "valid_loss": loss}) + "\n")
        if improved:
            _save_final(model, tok, cfg, best_dir, {"steps": state["step"], "best_val_loss": loss})
        state["stopped_early"] = state["bad"] >= PATIENCE

    done_here = 0
    bar = tqdm(total=total, initial=state["step"], desc=f"fuser {cfg.name}", unit="step")
    while state["step"] < total and not state["stopped_early"]:
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for a in range(tc.grad_accum):
            m = state["step"] * tc.grad_accum + a
            batch = collator([train[i] for i in batches(m)], rng=random.Random(f"{tc.seed}:order:{m}"))
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with _autocast(model, tc.precision):
                loss = model(**batch).loss / tc.grad_accum
            loss.backward()
            loss_sum += loss.item()
        opt.step()
        sched.step()
        state["step"] += 1
        done_here += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        last = state["step"] == total
        if state["step"] % tc.eval_every == 0 or last:
            validate()
        pause = stop_after is not None and done_here >= stop_after
        if state["step"] % tc.save_every == 0 or last or pause or state["stopped_early"]:
            checkpoint()
        if pause and not last and not state["stopped_early"]:
            bar.close()
            log.info("stopped at step %d of %d; call again to resume", state["step"], total)
            return final
    bar.close()
    if state["stopped_early"]:
        log.info("early stop at step %d: no improvement in %d validations", state["step"], PATIENCE)

    info = {"steps": state["step"], "stopped_early": state["stopped_early"]}
    if (best_dir / META).is_file():
        meta = json.loads((best_dir / META).read_text())
        meta.update(info, best_step=meta["steps"])
        (best_dir / META).write_text(json.dumps(meta, indent=2))
        _atomic_dir(final, lambda tmp: shutil.copytree(best_dir, tmp, dirs_exist_ok=True))
        shutil.rmtree(best_dir, ignore_errors=True)
    else:
        _save_final(model, tok, cfg, final, {**info, "best_val_loss": None})
    log.info("LM-Fuser saved to %s", final)
    return final


def _eos_ids(model: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
