"""Multimodal LLM families: how each is loaded, which modules LoRA adapts, and its chat formatting.

A ``Family`` knows one architecture (LLaVA-1.5, Qwen2.5-VL, MedGemma, SmolVLM): its default hub id,
its transformers class, the language-model modules LoRA targets (vLLM applies LoRA to the language
model only, so adapters never touch the vision tower), and the two calls every engine and the
trainer share: ``render`` (chat template to text, the one place chat formatting happens) and
``encode`` (processor call, left-padded for generation). Models load from a hub id (cache only
when ``HF_HUB_OFFLINE`` is set) or a local folder; anything missing fails at once with
:class:`ModelNotFoundError` saying how to provide it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medcap.models.chat import add_special_tokens, render_chat
from medcap.models.devices import resolve_device, torch_dtype
from medcap.models.hub import ModelNotFoundError, resolve_model

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

log = logging.getLogger(__name__)


DEFAULT_PROMPT = "Write a concise diagnostic caption for this medical image."
QWEN_MAX_PIXELS = 512 * 28 * 28  # Qwen2.5-VL's default cap; uncapped images exhaust GPU memory
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Family:
    """One multimodal LLM architecture."""

    name: str  # registry key (the generator ``kind``)
    default_model: str  # hub id used when the config names no model
    model_class: str  # transformers class name
    lm_module: str  # name of the language-model submodule (LoRA targets live under it)
    default_prompt: str = DEFAULT_PROMPT
    max_images: int = 1  # images one prompt may hold (few-shot with neighbour images)
    default_max_pixels: int | None = None  # image pixel cap applied through the processor

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """PEFT ``target_modules`` regex (one string) for the LM's attention projections only."""
        return (self.lora_target_regex(ATTENTION),)

    def lora_target_regex(self, modules: Sequence[str] = ATTENTION) -> str:
        """A PEFT ``target_modules`` regex for ``modules`` of the language model, never the vision tower."""
        return rf".*{self.lm_module}.*\.({'|'.join(modules)})"

    def load(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_pixels: int | None = None,
    ) -> tuple[PreTrainedModel, ProcessorMixin]:
        """Model (eval mode, on ``device``) and processor (left padding) from a hub id or local folder."""
        import transformers

        name = model or self.default_model
        path = resolve_model(name, f"generators.<name>.model (family {self.name})")
        dev = resolve_device(device)
        cls = getattr(transformers, self.model_class)
        try:
            processor = transformers.AutoProcessor.from_pretrained(path)
            # On a GPU, load the weights straight onto it rather than through CPU memory.
            placement = {"device_map": dev} if dev.startswith("cuda") else {}
            net = cls.from_pretrained(path, dtype=torch_dtype(dtype, dev), **placement)
        except OSError as e:
            raise ModelNotFoundError(f"cannot load {self.name} model {name!r} from {path}: {e}") from e
        processor.tokenizer.padding_side = "left"
        if processor.tokenizer.pad_token is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
        if getattr(net.generation_config, "pad_token_id", None) is None:
            net.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        cap = max_pixels or self.default_max_pixels
        if cap:
            cap_pixels(processor, cap)
        net.to(dev).eval()
        log.info("loaded %s (%s) on %s", name, self.model_class, dev)
        return net, processor

    def render(self, processor: Any, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        """The chat template applied to ``messages`` (content parts), as text."""
        return render_chat(processor, messages, add_generation_prompt=add_generation_prompt)

    def encode(
        self,
        processor: Any,
        texts: list[str],
        images: list[list[Image.Image]] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenise rendered ``texts`` with their images, left-padded, as PyTorch tensors."""
        processor.tokenizer.padding_side = "left"
        has_images = images is not None and any(images)
        return processor(
            text=texts,
            images=images if has_images else None,
            return_tensors="pt",
            padding=True,
            add_special_tokens=add_special_tokens(texts, processor.tokenizer.bos_token),
            **kwargs,
        )


def cap_pixels(processor: Any, max_pixels: int) -> None:
    """Cap the image processor's pixels per image (Qwen2-VL style ``size.longest_edge``)."""
    ip = processor.image_processor
    size = dict(ip.size or {})
    if "longest_edge" in size or hasattr(ip, "max_pixels"):
        size["longest_edge"] = max_pixels
        if size.get("shortest_edge", 0) > max_pixels:
            size["shortest_edge"] = max_pixels
        ip.size = size
        if hasattr(ip, "max_pixels"):
            ip.max_pixels = max_pixels
        if hasattr(ip, "min_pixels") and size.get("shortest_edge") is not None:
            ip.min_pixels = size["shortest_edge"]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # LLaVA-1.5 was trained on one image per prompt, and its chat template puts images first.
        Family("llava", "llava-hf/llava-1.5-7b-hf", "LlavaForConditionalGeneration", "language_model", max_images=1),
        # Qwen/Qwen2.5-VL-3B-Instruct is the smaller option (about 8 GB in bf16).
        Family(
            "qwen2_5_vl",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            "Qwen2_5_VLForConditionalGeneration",
            "language_model",
            max_images=6,
            default_max_pixels=QWEN_MAX_PIXELS,
        ),
        Family("medgemma", "google/medgemma-4b-it", "Gemma3ForConditionalGeneration", "language_model", max_images=4),
        Family(
            "smolvlm",
            "HuggingFaceTB/SmolVLM-256M-Instruct",
            "Idefics3ForConditionalGeneration",
            "text_model",
            max_images=4,
        ),
    )
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown multimodal LLM family {name!r}; known: {sorted(FAMILIES)}") from None
