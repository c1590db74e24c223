"""The LoRA SFT forward pass, and validation: mean caption-token loss and the ROUGE-1 of greedy captions.

The captions come from the in-memory model, prompted with the same requests the collator trains
on (``Family.render`` + ``Family.encode``) and decoded as the ``hf`` engine does (greedy, cut at
the first stop token, ``clean_caption``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from medcap.generators.sft_data import Pair, SFTCollator
from medcap.models.training import token_losses

if TYPE_CHECKING:
    import torch

    from medcap.generators.mllm import MLLMConfig


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


# --------------------------------------------------------------------------- the recipe


def validate(
    model: Any, collator: SFTCollator, pairs: Sequence[Pair], cfg: MLLMConfig, device: str, bf16: bool
) -> tuple[float, float]:
    """(mean token loss over ``pairs``, ROUGE-1 of greedy captions for the first ``eval_samples``)."""
    import torch

    from medcap.eval.metrics import rouge1

    tc = cfg.train
    model.eval()
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(pairs), tc.batch_size):
            losses = forward_losses(model, collator(pairs[start : start + tc.batch_size]), device, bf16, 0.0)
            loss_sum, n = loss_sum + float(losses.sum()), n + losses.numel()
    sample = list(pairs[: tc.eval_samples])
    score = math.nan
    if sample:
        hyps = greedy_captions(model, collator, sample, cfg, device, bf16)
        score, _ = rouge1({ex.id: [ex.caption or ""] for ex, _ in sample}, {i: [h] for i, h in hyps.items()})
    model.train()
    return (loss_sum / n if n else math.nan), score


def greedy_captions(
    model: Any, collator: SFTCollator, pairs: Sequence[Pair], cfg: MLLMConfig, device: str, bf16: bool
) -> dict[str, str]:
    """Cleaned greedy captions from the in-memory model, prompted and decoded as the hf engine does."""
    import torch

    from medcap.engines.hf import generate_kwargs
    from medcap.models.captions import clean_caption

    family, processor = collator.family, collator.processor
    params = replace(cfg.generation, num_beams=1, do_sample=False)
    out: dict[str, str] = {}
    for start in range(0, len(pairs), cfg.train.batch_size):
        requests = collator.requests(pairs[start : start + cfg.train.batch_size])
        texts = [family.render(processor, r.messages, add_generation_prompt=True) for r in requests]
        enc = family.encode(processor, texts, [list(r.images) for r in requests]).to(device)
        if "pixel_values" in enc and enc["pixel_values"].is_floating_point():
            enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            tokens = model.generate(**enc, **generate_kwargs(params))[:, enc["input_ids"].shape[1] :].tolist()
        for r, row in zip(requests, tokens, strict=True):
            cut = next((i for i, t in enumerate(row) if t in collator.stop_ids), len(row))
            out[r.id] = clean_caption(processor.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return out
