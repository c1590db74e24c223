"""LoRA SFT data: (example, neighbours) pairs as chat sequences whose loss covers the caption only.

The prompt of a training sequence is built exactly as at inference: ``MLLMGenerator.request``
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

from medcap.config import GeneratorConfig
from medcap.generators.families import Family
from medcap.generators.mllm import MLLMGenerator
from medcap.generators.prompts import training_messages
from medcap.problems import InputError, Problem
from medcap.records import Example, NeighbourList

if TYPE_CHECKING:
    import torch

    from medcap.engines.base import Request

log = logging.getLogger(__name__)

IGNORE = -100  # label value that cross-entropy skips
# End-of-turn tokens of the supported chat formats; the first one after the prompt ends what is learned.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<end_of_utterance>", "<|eot_id|>", "</s>")

Pair = tuple[Example, NeighbourList | None]


class PromptDriftError(ValueError):
    """The generation prompt is not a prefix of the training sequence: training and inference would differ."""


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
        cfg: GeneratorConfig,
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
        # The inference generator builds the prompt; its engine is never used here.
        self.builder = MLLMGenerator(cfg, None, index_examples=index_examples)  # type: ignore[arg-type]
        self.stop_ids = _stop_ids(processor.tokenizer, eos_ids)
        self.stop_strings = [processor.tokenizer.convert_ids_to_tokens(i) for i in sorted(self.stop_ids)]
        self.truncated = 0
        self.seen = 0

    def requests(self, pairs: Sequence[Pair]) -> list[Request]:
        """The inference requests (messages and images) for ``pairs``."""
        return [self.builder.request(ex, nl) for ex, nl in pairs]

    def texts(self, request: Request, caption: str) -> tuple[str, str]:
        """(generation prompt, training text) of one request; the second extends the first."""
        fam, proc = self.family, self.processor
        prompt = fam.render(proc, request.messages, add_generation_prompt=True)
        full = fam.render(proc, training_messages(list(request.messages), caption), add_generation_prompt=False)
        if not full.startswith(prompt):
            raise PromptDriftError(
                f"{request.id}: the {fam.name} generation prompt is not a prefix of the training text;\n"
                f"prompt ends: {prompt[-80:]!r}\ntraining text there: {full[len(prompt) - 80 : len(prompt) + 20]!r}"
            )
        completion = full[len(prompt) :]
        if not any(s in completion for s in self.stop_strings):
            # Templates such as LLaVA-1.5's close the assistant turn with nothing: add EOS so the model learns to stop.
            full = prompt + completion.rstrip() + self.processor.tokenizer.eos_token
        return prompt, full

    def __call__(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        requests = self.requests(pairs)
        texts = [self.texts(r, ex.caption or "") for r, (ex, _) in zip(requests, pairs, strict=True)]
        images = [list(r.images) for r in requests]
        enc = self.family.encode(self.processor, [full for _, full in texts], images, padding_side="right")
        ids, attn = enc["input_ids"], enc["attention_mask"]
        labels = ids.clone()
        labels[attn == 0] = IGNORE
        prompt_lens = []
        for i, (request, (prompt, _)) in enumerate(zip(requests, texts, strict=True)):
            start = self._prompt_length(request, prompt, images[i], ids[i, : int(attn[i].sum())])
            labels[i, :start] = IGNORE
            after = labels[i, start:].tolist()
            end = next((j for j, t in enumerate(after) if t in self.stop_ids), None)
            if end is not None:
                labels[i, start + end + 1 :] = IGNORE
            prompt_lens.append(start)
        enc["labels"] = labels
        self.seen += len(pairs)
        return self._truncate(dict(enc), requests, prompt_lens)

    def _prompt_length(self, request: Request, prompt: str, images: list[Any], row: torch.Tensor) -> int:
        """Tokens of the generation prompt, checked to be a token prefix of the training sequence."""
        import torch

        ids = self.family.encode(self.processor, [prompt], [images])["input_ids"][0]
        n = len(ids)
        if n >= len(row) or not torch.equal(row[:n], ids):
            tok = self.processor.tokenizer
            at = next((j for j in range(min(n, len(row))) if row[j] != ids[j]), min(n, len(row)))
            raise PromptDriftError(
                f"{request.id}: the tokenised {self.family.name} generation prompt ({n} tokens) is not a prefix of "
                f"the training sequence ({len(row)} tokens); first difference at token {at}: "
                f"prompt {tok.decode(ids[at : at + 5])!r} vs training {tok.decode(row[at : at + 5])!r}"
            )
        return n

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


def _stop_ids(tokenizer: Any, eos_ids: Sequence[int]) -> set[int]:
    """The model's stop tokens, the tokenizer's EOS and any known end-of-turn token in its vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = {int(i) for i in eos_ids if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids
