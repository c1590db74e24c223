"""Training of the LM-Fuser: (candidates, neighbours) -> reference caption, on a causal LM (LoRA or full).

The prompt is ``lm.fuser_prompt`` (candidates in a random order per example) rendered with the
tokenizer's chat template; the training sequence is the same messages plus the assistant turn.
Labels are -100 on every prompt token, on padding and after the first end-of-turn token, so only
the reference caption and its end of turn are learned. The rendered generation prompt must be a
token prefix of the training sequence (``PromptDriftError`` otherwise): training and inference
format prompts the same way.

Training runs in medcap's one loop (``models/training.py``): the validation loss every
``eval_every`` steps keeps the best model and stops early after ``PATIENCE`` validations without
improvement; atomic checkpoints; exact resume. ``out_dir/final`` holds the model (or the adapter;
the base model is named in ``medcap_fuser.json``), its tokenizer and ``medcap_fuser.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.fuser.lm_prompt import META, fuser_prompt
from medcap.keys import key_settings
from medcap.models import training
from medcap.models.chat import (
    IGNORE,
    PromptDriftError,
    add_special_tokens,
    check_text_prefix,
    check_token_prefix,
    close_turn,
    eos_ids,
    mask_labels,
    render_chat,
    stop_ids,
    text_only,
)
from medcap.models.training import label_tokens, token_losses
from medcap.records import NeighbourList

if TYPE_CHECKING:
    import torch

    from medcap.fuser.lm import LMFuserConfig

__all__ = ["IGNORE", "PATIENCE", "FuserCollator", "PromptDriftError", "train_fuser"]

log = logging.getLogger(__name__)

PATIENCE = 3  # validations without improvement before training stops
FINAL = "final"
FORBIDDEN_TARGETS = ("lm_head", "embed_tokens")  # vLLM serves no adapter that touches them

TrainItem = tuple[dict[str, str], NeighbourList | None, str]  # candidates, neighbours, reference caption


class FuserCollator:
    """Items -> right-padded ``input_ids``, ``attention_mask`` and ``labels`` (caption tokens only)."""

    def __init__(self, tokenizer: Any, cfg: LMFuserConfig, *, max_length: int, eos_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_length = max_length
        self.precision = cfg.train.precision
        self.stop_ids = stop_ids(tokenizer, eos_ids)

    def texts(self, item: TrainItem, rng: random.Random | None) -> tuple[str, str]:
        """(generation prompt, training text); the second extends the first."""
        candidates, neighbours, reference = item
        messages = text_only(fuser_prompt(candidates, neighbours, self.cfg, rng=rng))
        prompt = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        turn = {"role": "assistant", "content": reference.strip()}
        full = render_chat(self.tokenizer, [*messages, turn], add_generation_prompt=False)
        check_text_prefix(prompt, full, "LM-Fuser")
        return prompt, close_turn(prompt, full, self.tokenizer, self.stop_ids)

    def __call__(self, items: Sequence[TrainItem], rng: random.Random | None = None) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        pairs = [self.texts(item, rng) for item in items]
        fulls = [f for _, f in pairs]
        enc = tok(
            fulls,
            return_tensors="pt",
            padding=True,
            padding_side="right",
            add_special_tokens=add_special_tokens(fulls, tok.bos_token),
        )
        ids, attn = enc["input_ids"], enc["attention_mask"]
        prompt_lens = []
        for i, (prompt, _) in enumerate(pairs):
            p = tok(prompt, add_special_tokens=add_special_tokens(prompt, tok.bos_token))["input_ids"]
            n = check_token_prefix(p, ids[i, : int(attn[i].sum())].tolist(), tok, "LM-Fuser")
            if n >= self.max_length:
                raise ValueError(
                    f"a fuser prompt is {n} tokens, more than train.max_length={self.max_length}; "
                    "raise max_length or show fewer candidates/neighbours"
                )
            prompt_lens.append(n)
        labels = mask_labels(ids.clone(), attn, prompt_lens, self.stop_ids)
        out = {"input_ids": ids, "attention_mask": attn, "labels": labels}
        return {k: v[:, : self.max_length] for k, v in out.items()}


def _clean_items(items: Sequence[TrainItem], what: str) -> list[TrainItem]:
    kept = [it for it in items if it[2] and it[2].strip() and any(c and c.strip() for c in it[0].values())]
    if len(kept) < len(items):
        log.warning(
            "%s: %d of %d items without a reference or candidates are skipped", what, len(items) - len(kept), len(items)
        )
    return kept


def _fingerprint(cfg: LMFuserConfig, train: Sequence[TrainItem]) -> str:
    """What a checkpoint must match to be resumed: the training settings and the data."""
    h = hashlib.sha256()
    for cands, nl, ref in train:
        h.update(json.dumps([sorted(cands.items()), nl.to_json() if nl else None, ref]).encode())
    settings = {k: v for k, v in key_settings(cfg).items() if k not in ("engine", "generation", "name")}
    return json.dumps({"settings": settings, "data": h.hexdigest()}, sort_keys=True)


def _load_model(cfg: LMFuserConfig):
    from medcap.models.lms import load_causal_lm

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


def _valid_loss(model: Any, collator: FuserCollator, items: Sequence[TrainItem], batch_size: int) -> float:
    """Token-weighted mean loss over the validation items (candidates in their inference order)."""
    total, count = 0.0, 0
    for s in range(0, len(items), batch_size):
        batch = collator(items[s : s + batch_size])
        total += float(_loss(model, batch, collator.precision))
        count += label_tokens(batch["labels"])
    return total / max(count, 1)


def _loss(model: Any, batch: dict[str, torch.Tensor], precision: str) -> torch.Tensor:
    """Summed next-token loss of a collated batch (bf16 autocast on CUDA unless fp32 is asked for)."""
    import contextlib

    import torch

    inputs = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
    cuda = model.device.type == "cuda" and precision != "fp32"
    with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
        logits = model(**inputs).logits
    return token_losses(logits, batch["labels"]).sum()


def train_fuser(
    cfg: LMFuserConfig,
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
    out_dir, tc = Path(out_dir), cfg.train
    if not resume:
        training.reset(out_dir, FINAL)
    if (out_dir / FINAL / META).is_file():
        log.info("LM-Fuser already trained: %s", out_dir / FINAL)
        return out_dir / FINAL
    train, valid = _clean_items(train, "fuser train"), _clean_items(valid, "fuser valid")
    if not train:
        raise ValueError("no fuser training item has both a reference caption and a candidate")

    training.seed_everything(tc.seed)
    model, tok = _load_model(cfg)
    collator = FuserCollator(tok, cfg, max_length=tc.max_length, eos_ids=eos_ids(model))

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)

    def report(folder: Path, state: training.LoopState) -> None:
        meta = {
            "base_model": cfg.model,
            "adapter": cfg.lora is not None,
            "config": asdict(cfg),
            "steps": state.step,
            "best_step": state.best_step,
            "best_val_loss": state.best_loss,
            "stopped_early": state.stopped_early,
        }
        (folder / META).write_text(json.dumps(meta, indent=2))

    recipe = training.Recipe(
        model=model,
        n=len(train),
        batch=lambda idx, m: collator([train[i] for i in idx], rng=random.Random(f"{tc.seed}:order:{m}")),
        loss=lambda batch: _loss(model, batch, tc.precision),
        tokens=lambda batch: label_tokens(batch["labels"]),
        save=save,
        fingerprint=_fingerprint(cfg, train),
        validate=(lambda: {"val_loss": _valid_loss(model, collator, valid, tc.batch_size)}) if valid else None,
        report=report,
        name=f"fuser {cfg.name}",
    )
    final, _ = training.fit(recipe, tc, out_dir, FINAL, patience=PATIENCE, stop_after=stop_after)
    return final
