"""LoRA SFT data: (example, neighbours) pairs as chat sequences whose loss covers the caption only.

The prompt of a training sequence is built exactly as at inference: ``prompts.mllm_request``
(``prompts.build_messages`` plus the same images in the same order) rendered by ``Family.render``.
The training text is the same messages plus the assistant turn (``prompts.training_messages``).
The collator tokenises the batch with the processor (images included, right padding) and sets
the labels of every prompt token (up to and including the assistant header), every padding
token and anything after the end-of-turn token to -100, so only the caption and its end-of-turn
token are learned. The prompt length comes from tokenising the generation prompt on its own; it
must be a token prefix of the training sequence or :class:`PromptDriftError` is raised — the
check that training and inference format prompts the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from medcap.data.problems import InputError, Problem
from medcap.generators.prompts import mllm_request, training_messages
from medcap.models.chat import (
    IGNORE,
    PromptDriftError,
    check_text_prefix,
    check_token_prefix,
    close_turn,
    mask_labels,
    stop_ids,
)
from medcap.models.families import Family
from medcap.records import Example, NeighbourList

if TYPE_CHECKING:
    import torch

    from medcap.engines.base import Request
    from medcap.generators.mllm import MLLMConfig

log = logging.getLogger(__name__)

__all__ = ["IGNORE", "Pair", "PromptDriftError", "SFTCollator", "check_pairs"]

Pair = tuple[Example, NeighbourList | None]


def check_pairs(pairs: Sequence[Pair], split: str) -> None:
    """Every training pair needs a reference caption; an InputError lists those without one."""
    missing = [Problem(ex.id, None, f"{split} example has no caption to train on") for ex, _ in pairs if not ex.caption]
    if missing:
        raise InputError(missing, f"{len(missing)} {split} example(s) without a caption")


class SFTCollator:
    """Turns a list of (example, neighbours) pairs into a padded training batch with masked labels.

    ``index_examples`` (training examples by ID) supplies neighbour images for few-shot prompts
    with ``shot_images``; ``eos_ids`` are the model's own stop tokens (``generation_config``).
    ``truncated`` counts the sequences cut to ``max_length`` (from the caption side).
    """

    def __init__(
        self,
        cfg: MLLMConfig,
        family: Family,
        processor: Any,
        *,
        max_length: int,
        index_examples: Mapping[str, Example] | None = None,
        eos_ids: Sequence[int] = (),
    ) -> None:
        self.family = family
        self.processor = processor
        self.max_length = max_length
        self.cfg = cfg
        self.index_examples = index_examples
        self.stop_ids = stop_ids(processor.tokenizer, eos_ids)
        self.truncated = 0
        self.seen = 0

    def requests(self, pairs: Sequence[Pair]) -> list[Request]:
        """The inference requests (messages and images) for ``pairs``."""
        return [
            mllm_request(self.cfg, ex, nl, adapter=self.cfg.adapter, index_examples=self.index_examples)
            for ex, nl in pairs
        ]

    def texts(self, request: Request, caption: str) -> tuple[str, str]:
        """(generation prompt, training text) of one request; the second extends the first."""
        fam, proc = self.family, self.processor
        prompt = fam.render(proc, request.messages, add_generation_prompt=True)
        full = fam.render(proc, training_messages(list(request.messages), caption), add_generation_prompt=False)
        check_text_prefix(prompt, full, f"{request.id} ({fam.name})")
        return prompt, close_turn(prompt, full, proc.tokenizer, self.stop_ids)

    def __call__(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        requests = self.requests(pairs)
        texts = [self.texts(r, ex.caption or "") for r, (ex, _) in zip(requests, pairs, strict=True)]
        images = [list(r.images) for r in requests]
        enc = self.family.encode(self.processor, [full for _, full in texts], images, padding_side="right")
        ids, attn = enc["input_ids"], enc["attention_mask"]
        prompt_lens = [
            self._prompt_length(request, prompt, images[i], ids[i, : int(attn[i].sum())])
            for i, (request, (prompt, _)) in enumerate(zip(requests, texts, strict=True))
        ]
        enc["labels"] = mask_labels(ids.clone(), attn, prompt_lens, self.stop_ids)
        self.seen += len(pairs)
        return self._truncate(dict(enc), requests, prompt_lens)

    def _prompt_length(self, request: Request, prompt: str, images: list[Any], row: torch.Tensor) -> int:
        """Tokens of the generation prompt, checked to be a token prefix of the training sequence."""
        ids = self.family.encode(self.processor, [prompt], [images])["input_ids"][0]
        what = f"{request.id} ({self.family.name})"
        return check_token_prefix(ids.tolist(), row.tolist(), self.processor.tokenizer, what)

    def _truncate(
        self, batch: dict[str, torch.Tensor], requests: list[Request], prompt_lens: list[int]
    ) -> dict[str, torch.Tensor]:
        """Cut every per-token tensor to ``max_length`` columns (right padding: the caption end goes)."""
        ids = batch["input_ids"]
        if ids.shape[1] <= self.max_length:
            return batch
        for r, n in zip(requests, prompt_lens, strict=True):
            if n >= self.max_length:
                raise ValueError(
                    f"{r.id}: the prompt alone is {n} tokens, more than train.max_length={self.max_length}; "
                    "raise max_length, show fewer examples (k) or cap the image size (max_pixels)"
                )
        self.truncated += int((batch["attention_mask"].sum(1) > self.max_length).sum())
        shape = tuple(ids.shape)
        for key, value in batch.items():
            if hasattr(value, "shape") and tuple(value.shape) == shape:
                batch[key] = value[:, : self.max_length]
        return batch
