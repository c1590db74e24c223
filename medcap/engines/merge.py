"""LoRA merged into the base weights: a plain model folder that every engine serves without LoRA.

The users' usual workaround when vLLM cannot serve an adapter as trained (LoRA on the vision
tower or projector, which vLLM ignores without ``enable_tower_connector_lora``; an architecture
without LoRA support; a server started without ``--enable-lora``). ``merge_adapter`` loads the
base model in fp32, folds ``B @ A * alpha / r`` into each adapted weight with peft's
``merge_and_unload``, casts back to the dtype the base was saved in, and writes the model, its
processor (or tokenizer) and ``medcap_merged.json`` (base, adapter) atomically, with the
vision tower's weight names vLLM reads (``vllm_checkpoint.legacy_vision_keys``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from medcap.models.hub import ModelNotFoundError

if TYPE_CHECKING:
    from medcap.models.families import Family

log = logging.getLogger(__name__)

MERGED_META = "medcap_merged.json"


def saved_dtype(path: str) -> str | None:
    """The dtype a local model folder's config.json records (``dtype`` or the older ``torch_dtype``)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    cfg = json.loads(cfg_file.read_text())
    return cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")


def merge_adapter(family: Family | None, base: str, adapter: str | Path, out: str | Path) -> Path:
    """Write ``base`` with the LoRA ``adapter`` merged in to ``out`` (``family=None``: a text-only causal LM)."""
    import torch
    from peft import PeftModel

    from medcap.engines.vllm_checkpoint import legacy_vision_keys
    from medcap.files import atomic_dir, write_json
    from medcap.models.families import resolve_model

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"LoRA adapter {adapter} not found (no adapter_config.json in it)")
    if family is not None:
        model, processor = family.load(base, dtype="fp32", device="cpu")
        path = resolve_model(base, "the generator's `model`")
    else:
        from medcap.models.lms import load_causal_lm, resolve_lm_path

        model, processor = load_causal_lm(base, dtype="fp32", device="cpu")
        path = resolve_lm_path(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    target = saved_dtype(path)
    if target in ("bfloat16", "float16"):  # keep the base's size on disk; the merge itself ran in fp32
        merged = merged.to(getattr(torch, target))
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        legacy_vision_keys(tmp)
        write_json(tmp / MERGED_META, {"base_model": base, "adapter": str(adapter.resolve()), "dtype": target})
    log.info("merged %s into %s: %s", adapter, base, out)
    return out
