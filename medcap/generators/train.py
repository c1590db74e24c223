"""LoRA supervised fine-tuning of a multimodal LLM generator (peft), resumable, in a plain PyTorch loop.

``train_generator`` loads the family's model, attaches LoRA to the language model only (vLLM
applies LoRA there and rejects adapters that touch ``lm_head``/``embed_tokens``), and trains on
(image, caption) sequences from :mod:`medcap.generators.sft_data`, whose prompts are the ones
inference uses, in medcap's one training loop (``models/training.py``: seeded batches,
accumulation, schedule, best model, atomic checkpoints and exact resume). bf16 autocast on a GPU.
Every ``eval_every`` steps it measures the validation loss and the ROUGE-1 of greedy captions.

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
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import LoraConfig
from medcap.configio import config_hash, to_dict
from medcap.files import write_json
from medcap.generators.sft_data import Pair, SFTCollator, check_pairs
from medcap.generators.sft_eval import forward_losses, validate
from medcap.keys import key_settings
from medcap.models import training
from medcap.models.chat import eos_ids
from medcap.models.distributed import world
from medcap.models.families import Family, cap_pixels, get_family, resolve_device, resolve_model
from medcap.models.training import label_tokens

if TYPE_CHECKING:
    from medcap.generators.mllm import MLLMConfig

    pass

    from medcap.engines.vllm_lora import AdapterVerdict

log = logging.getLogger(__name__)

FORBIDDEN = ("lm_head", "embed_tokens", "modules_to_save")  # vLLM rejects adapters holding these
VAL_LOSS_MAX = 256  # validation examples in the validation loss (the first ones; pass a subset to choose)
FINAL = "adapter"


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


def check_vllm_serving(adapted: set[str], family: Family, cfg: MLLMConfig) -> AdapterVerdict | None:
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


def _load(cfg: MLLMConfig, family: Family, device: str, bf16: bool) -> tuple[Any, Any]:
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


def _load_4bit(cfg: MLLMConfig, family: Family) -> tuple[Any, Any]:
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
    device_map = {"": torch.cuda.current_device()}  # this process's GPU under a launcher
    model = cls.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16, device_map=device_map)
    processor = transformers.AutoProcessor.from_pretrained(path)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    if cap := cfg.max_pixels or family.default_max_pixels:
        cap_pixels(processor, cap)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True), processor


# --------------------------------------------------------------------------- loss and steps


def train_generator(
    cfg: MLLMConfig,
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
    tc = cfg.train
    if not train:
        raise ValueError(f"generator {cfg.name}: no training examples")
    check_pairs(train, "train")
    check_pairs(valid, "valid")
    family = get_family(cfg.kind)
    check_adapter_config(cfg.lora, family)
    out_dir = Path(out_dir)
    if not resume:
        training.reset(out_dir, FINAL)
    device = resolve_device(cfg.engine.device)
    if tc.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"generators.{cfg.name}.train.precision: {tc.precision!r} is not auto | fp32 | bf16")
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.startswith("cuda"))

    training.seed_everything(tc.seed)
    model, processor = _load(cfg, family, device, bf16)
    index = {ex.id: ex for ex, _ in train}
    make = lambda: SFTCollator(  # noqa: E731 - one for training, one for validation (separate counters)
        cfg, family, processor, max_length=tc.max_length, index_examples=index, eos_ids=eos_ids(model)
    )
    collator, val_collator = make(), make()
    fingerprint = config_hash(
        to_dict(cfg.lora),
        key_settings(tc),
        cfg.model,
        cfg.kind,
        cfg.mode,
        cfg.prompt,
        cfg.k,
        cfg.shot_images,
        cfg.max_pixels,
        [ex.id for ex, _ in train],
    )

    def run_validation() -> dict[str, float]:
        loss, score = validate(model, val_collator, valid[:VAL_LOSS_MAX], cfg, device, bf16)
        return {"val_loss": loss, "val_rouge1": score}

    def report(folder: Path, state: training.LoopState) -> None:
        verify_adapter(folder)
        write_json(
            folder / "medcap_train.json",
            {
                "config": to_dict(cfg),
                "steps": state.step,
                "adapter_step": state.best_step if state.best_step is not None else state.step,
                "best_val_loss": state.best_loss,
                "val_rouge1": next((r["val_rouge1"] for r in state.validations if r["step"] == state.best_step), None),
                "train_examples": len(train),
                "truncated": collator.truncated,
                "history": state.history,
            },
        )

    recipe = training.Recipe(
        model=model,
        n=len(train),
        batch=lambda idx, m: collator([train[i] for i in idx]),
        loss=lambda batch: forward_losses(model, batch, device, bf16, tc.focal_gamma).sum(),
        tokens=lambda batch: label_tokens(batch["labels"]),
        save=lambda folder: model.save_pretrained(str(folder), save_embedding_layers=False),
        fingerprint=fingerprint,
        validate=run_validation if valid else None,
        report=report,
        name=f"train {cfg.name}",
    )
    adapter, _ = training.fit(recipe, tc, out_dir, FINAL, on_step=on_step)
    if collator.truncated:
        log.warning(
            "%s: %d of %d training sequences cut to max_length=%d tokens",
            cfg.name,
            collator.truncated,
            collator.seen,
            tc.max_length,
        )
    log.info("%s: adapter written to %s", cfg.name, adapter)
    w = world()
    if cfg.lora.merge and w.is_main:
        from medcap.engines.merge import merge_adapter

        merge_adapter(family, cfg.model or family.default_model, adapter, out_dir / "merged")
    w.barrier()
    return adapter
