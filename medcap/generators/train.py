"""LoRA supervised fine-tuning of a multimodal LLM generator (peft), resumable, in a plain PyTorch loop.

``train_generator`` loads the family's model, attaches LoRA to the language model only (vLLM
applies LoRA there and rejects adapters that touch ``lm_head``/``embed_tokens``), and trains on
(image, caption) sequences from :mod:`medcap.generators.sft_data`, whose prompts are the ones
inference uses. AdamW with linear warmup and decay, gradient accumulation (the loss is the mean
over every caption token of the accumulated batches), bf16 autocast on a GPU, seeded shuffling.
Every ``eval_every`` steps it logs the validation loss and the ROUGE-1 of greedy captions, and
keeps the adapter with the best validation loss. Every ``save_every`` steps a checkpoint (adapter,
optimizer, scheduler, RNG states, step) is written atomically to ``out_dir/checkpoints/step-N``;
a rerun continues from the latest one and ends with the same weights as an uninterrupted run.

Output: ``out_dir/adapter`` — ``adapter_config.json`` + ``adapter_model.safetensors`` (standard
PEFT, loadable by vLLM) and ``medcap_train.json`` (config, steps, best validation loss, ROUGE-1).
Before the first step, ``check_vllm_serving`` says which adapted modules vLLM would serve, ignore
or refuse for this architecture (``medcap.engines.vllm_lora``) and refuses an adapter vLLM would
serve differently from the trained model, unless ``lora.merge: true``: then ``out_dir/merged``
also holds the base weights with the adapter merged in, which every engine serves without LoRA.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import GeneratorConfig, LoraConfig
from medcap.configio import config_hash, to_dict
from medcap.generators.families import Family, cap_pixels, get_family, resolve_device, resolve_model
from medcap.generators.sft_data import IGNORE, Pair, SFTCollator, check_pairs
from medcap.generators.sft_eval import validate
from medcap.runs import write_json

if TYPE_CHECKING:
    import torch

    from medcap.engines.vllm_lora import AdapterVerdict

log = logging.getLogger(__name__)

FORBIDDEN = ("lm_head", "embed_tokens", "modules_to_save")  # vLLM rejects adapters holding these
CHECKPOINTS_KEPT = 2  # older checkpoints are deleted
VAL_LOSS_MAX = 256  # validation examples in the validation loss (the first ones; pass a subset to choose)
GRAD_CLIP = 1.0


@dataclass
class TrainState:
    """What a checkpoint records besides tensors."""

    step: int = 0  # optimiser steps done; the data position is step * grad_accum micro-batches
    best_loss: float | None = None
    best_step: int | None = None
    best_rouge1: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- adapter rules


def check_adapter_config(lora: LoraConfig, family: Family) -> None:
    """Refuse LoRA settings whose adapter vLLM would reject (lm_head, embed_tokens, modules_to_save)."""
    targets = lora.target_modules
    names = [targets] if isinstance(targets, str) else list(targets)
    probes = ["lm_head", f"model.{family.lm_module}.embed_tokens"]
    bad = [t for t in names if any(f in t for f in FORBIDDEN)]
    if isinstance(targets, str):
        bad += [p for p in probes if re.fullmatch(targets, p)]
    saved = getattr(lora, "modules_to_save", None)
    if bad or saved:
        raise ValueError(
            f"LoRA config for {family.name} asks to train {sorted(set(bad)) or saved}: vLLM applies LoRA to the "
            "language model's linear layers only and rejects adapters that hold lm_head, embed_tokens or "
            "modules_to_save. Remove them from generators.<name>.lora.target_modules."
        )


def target_modules(lora: LoraConfig, family: Family) -> str:
    """PEFT target regex: module names (``q_proj``, ...) inside the family's language model only.

    An empty list means the family's default targets; a string is taken as the user's own regex.
    """
    targets = lora.target_modules
    if isinstance(targets, str):
        return targets
    return family.lora_target_regex(targets) if targets else family.lora_targets[0]


def verify_adapter(folder: Path) -> None:
    """Raise if a saved adapter holds lm_head/embed_tokens/modules_to_save weights or settings."""
    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("modules_to_save"):
        raise ValueError(f"{folder}: adapter_config.json sets modules_to_save={config['modules_to_save']}")
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        bad = [k for k in f.keys() if any(x in k for x in FORBIDDEN)]  # noqa: SIM118 - safe_open is not iterable
    if bad:
        raise ValueError(f"{folder}: the adapter holds weights vLLM rejects: {bad[:5]}")


def check_vllm_serving(adapted: set[str], family: Family, cfg: GeneratorConfig) -> AdapterVerdict | None:
    """Say what vLLM would do with an adapter on ``adapted`` modules; refuse one it would serve unlike trained.

    Allowed anyway with ``lora.merge: true`` (the merged weights need no LoRA support), and for
    tower/projector modules with ``engine.extra.enable_tower_connector_lora: true`` where vLLM has it.
    """
    from medcap.engines.vllm_lora import VLLM_LORA, classify

    if family.model_class not in VLLM_LORA:
        log.warning("%s: vLLM's LoRA support for %s is not recorded; not checked", cfg.name, family.model_class)
        return None
    tower = bool(cfg.engine.extra.get("enable_tower_connector_lora"))
    verdict = classify(family.model_class, adapted, tower_connector_lora=tower)
    log.info("%s: vLLM and this adapter (%s): %s", cfg.name, family.model_class, verdict.describe())
    if verdict.exact:
        return verdict
    if cfg.lora.merge:
        log.warning("%s: vLLM %s; lora.merge writes merged weights that every engine serves", cfg.name,
                    verdict.describe())  # fmt: skip
        return verdict
    raise ValueError(
        f"generators.{cfg.name}.lora.target_modules: vLLM {verdict.describe()} for {family.model_class}, so "
        "vLLM would serve a model other than the one trained. Target the language model only "
        f"({family.lm_module}: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), or set "
        f"generators.{cfg.name}.lora.merge: true (merged weights, no LoRA at serving time)"
        + (", or serve tower/projector LoRA with engine.extra.enable_tower_connector_lora: true "
           "(experimental in vLLM)" if verdict.ignored and not verdict.refused else "")
    )  # fmt: skip


# --------------------------------------------------------------------------- model


def _load(cfg: GeneratorConfig, family: Family, device: str, bf16: bool) -> tuple[Any, Any]:
    """The base model (frozen) with LoRA attached, and its processor."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if cfg.lora.qlora:
        model, processor = _load_4bit(cfg, family)
    else:
        dtype = "bf16" if bf16 and device.startswith("cuda") else "fp32"
        model, processor = family.load(cfg.model, dtype=dtype, device=device, max_pixels=cfg.max_pixels)
    model.requires_grad_(False)
    peft_cfg = PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=target_modules(cfg.lora, family),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_cfg)
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    check_vllm_serving(adapted, family, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA on %s: %d trainable of %d parameters (%.3f%%)", family.name, trainable, total, 100 * trainable / total
    )
    return model, processor


def _load_4bit(cfg: GeneratorConfig, family: Family) -> tuple[Any, Any]:
    """QLoRA: the base model in 4-bit NF4 through bitsandbytes (CUDA only)."""
    import torch
    import transformers

    if not torch.cuda.is_available():
        raise RuntimeError("lora.qlora needs a CUDA GPU (bitsandbytes 4-bit); none is visible. Set lora.qlora: false.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError("lora.qlora needs bitsandbytes: pip install bitsandbytes") from e
    from peft import prepare_model_for_kbit_training

    name = cfg.model or family.default_model
    path = resolve_model(name, f"generators.{cfg.name}.model")
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    cls = getattr(transformers, family.model_class)
    model = cls.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0})
    processor = transformers.AutoProcessor.from_pretrained(path)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    if cap := cfg.max_pixels or family.default_max_pixels:
        cap_pixels(processor, cap)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True), processor


def _eos_ids(model: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]


# --------------------------------------------------------------------------- data order


@dataclass(frozen=True)
class Plan:
    """Seeded data order: micro-batch m is a fixed slice of epoch m // per_epoch's permutation."""

    n: int
    batch_size: int
    seed: int

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def indices(self, m: int) -> list[int]:
        import torch

        epoch, j = divmod(m, self.per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[j * self.batch_size : (j + 1) * self.batch_size].tolist()


# --------------------------------------------------------------------------- loss and steps


def token_losses(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """Per-token (focal when gamma > 0) cross-entropy of next-token predictions where labels != -100."""
    import torch.nn.functional as F

    logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    keep = labels != IGNORE
    logp = F.log_softmax(logits[keep], dim=-1).gather(1, labels[keep].unsqueeze(1)).squeeze(1)
    return -logp if gamma <= 0 else -(1.0 - logp.exp()).pow(gamma) * logp


def forward_losses(model: Any, batch: dict[str, Any], device: str, bf16: bool, gamma: float) -> torch.Tensor:
    """Per-token losses of one collated batch (bf16 autocast when ``bf16``)."""
    import torch

    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    pv = inputs.get("pixel_values")
    if pv is not None and pv.is_floating_point():
        inputs["pixel_values"] = pv.to(model.dtype)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        logits = model(**inputs).logits
    return token_losses(logits, batch["labels"], gamma)


def _step(
    model: Any, opt: Any, sched: Any, window: list[dict[str, Any]], device: str, bf16: bool, gamma: float
) -> float:
    """One optimiser step over the accumulated micro-batches; returns the mean token loss."""
    import torch

    n_tokens = max(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in window), 1)
    total = 0.0
    for batch in window:
        loss = forward_losses(model, batch, device, bf16, gamma).sum() / n_tokens
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], GRAD_CLIP)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total


# --------------------------------------------------------------------------- the recipe


def train_generator(
    cfg: GeneratorConfig,
    train: list[Pair],
    valid: list[Pair],
    out_dir: Path,
    *,
    resume: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> Path:
    """LoRA-tune ``cfg``'s model on ``train`` (validating on ``valid``); returns ``out_dir / "adapter"``.

    ``resume`` continues from the newest checkpoint in ``out_dir/checkpoints`` (False: start over).
    ``on_step(step)`` is called after every optimiser step, once its checkpoint is written.
    """
    import torch
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    from medcap.generators import sft_checkpoint as ck

    tc = cfg.train
    if not train:
        raise ValueError(f"generator {cfg.name}: no training examples")
    check_pairs(train, "train")
    check_pairs(valid, "valid")
    family = get_family(cfg.kind)
    check_adapter_config(cfg.lora, family)
    out_dir = Path(out_dir)
    device = resolve_device(cfg.engine.device)
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.startswith("cuda"))
    if tc.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"generators.{cfg.name}.train.precision: {tc.precision!r} is not auto | fp32 | bf16")

    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    model, processor = _load(cfg, family, device, bf16)
    index = {ex.id: ex for ex, _ in train}
    make = lambda: SFTCollator(  # noqa: E731 - one for training, one for validation (separate counters)
        cfg, family, processor, max_length=tc.max_length, index_examples=index, eos_ids=_eos_ids(model)
    )
    collator, val_collator = make(), make()
    plan = Plan(len(train), tc.batch_size, tc.seed)
    accum = max(tc.grad_accum, 1)
    total = tc.max_steps or max(math.ceil(tc.epochs * plan.per_epoch / accum), 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(tc.warmup_ratio * total), total)

    ck_dir, best_dir = out_dir / "checkpoints", out_dir / "best"
    key = config_hash(
        to_dict(cfg.lora),
        to_dict(tc) | {"eval_every": 0, "save_every": 0},
        cfg.model,
        cfg.kind,
        cfg.mode,
        cfg.prompt,
        cfg.k,
        cfg.shot_images,
        cfg.max_pixels,
        [ex.id for ex, _ in train],
    )
    state = TrainState()
    found = ck.checkpoints(ck_dir) if resume else []
    if found:
        state = TrainState(**ck.load_checkpoint(found[-1], model, opt, sched, key))
        log.info("%s: resuming from %s", cfg.name, found[-1])
    else:
        for stale in (ck_dir, best_dir):
            shutil.rmtree(stale, ignore_errors=True)
    log.info(
        "%s: %d optimiser steps of %d x %d examples (%d training examples)",
        cfg.name,
        total,
        tc.batch_size,
        accum,
        len(train),
    )

    model.train()
    bar = tqdm(total=total, initial=state.step, desc=f"train {cfg.name}", disable=None)
    while state.step < total:
        first = state.step * accum
        window = [collator([train[i] for i in plan.indices(m)]) for m in range(first, first + accum)]
        loss = _step(model, opt, sched, window, device, bf16, tc.focal_gamma)
        state.step += 1
        row: dict[str, Any] = {"step": state.step, "loss": loss, "lr": sched.get_last_lr()[0]}
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if valid and (state.step % tc.eval_every == 0 or state.step == total):
            val_loss, score = validate(model, val_collator, valid[:VAL_LOSS_MAX], cfg, device, bf16)
            row |= {"val_loss": val_loss, "val_rouge1": score}
            log.info(
                "%s step %d: loss %.4f, val loss %.4f, val ROUGE-1 %.4f", cfg.name, state.step, loss, val_loss, score
            )
            if state.best_loss is None or val_loss < state.best_loss:
                state.best_loss, state.best_step, state.best_rouge1 = val_loss, state.step, score
                ck.replace_dir(best_dir, lambda tmp: ck.save_adapter(model, tmp))
        state.history.append(row)
        if state.step % tc.save_every == 0 or state.step == total:
            ck.save_checkpoint(ck_dir, model, opt, sched, state, key, keep=CHECKPOINTS_KEPT)
        if on_step is not None:
            on_step(state.step)
    bar.close()
    if collator.truncated:
        log.warning(
            "%s: %d of %d training sequences cut to max_length=%d tokens",
            cfg.name,
            collator.truncated,
            collator.seen,
            tc.max_length,
        )

    def fill(tmp: Path) -> None:
        if best_dir.is_dir():
            shutil.copytree(best_dir, tmp, dirs_exist_ok=True)
        else:
            ck.save_adapter(model, tmp)
        verify_adapter(tmp)
        write_json(
            tmp / "medcap_train.json",
            {
                "config": to_dict(cfg),
                "steps": state.step,
                "adapter_step": state.best_step if best_dir.is_dir() else state.step,
                "best_val_loss": state.best_loss,
                "val_rouge1": state.best_rouge1,
                "train_examples": len(train),
                "truncated": collator.truncated,
                "history": state.history,
            },
        )

    adapter = ck.replace_dir(out_dir / "adapter", fill)
    log.info("%s: adapter written to %s", cfg.name, adapter)
    if cfg.lora.merge:
        from medcap.engines.merge import merge_adapter

        merge_adapter(family, cfg.model or family.default_model, adapter, out_dir / "merged")
    return adapter
