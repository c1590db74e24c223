"""The ``hf`` engine: batched ``model.generate`` in transformers, with PEFT LoRA adapters per request.

Works anywhere (CPU included). Requests are grouped by adapter and generation settings, then run
``cfg.batch_size`` at a time with left padding (a batch that runs out of memory is retried at half
the size, kept from then on: ``medcap.models.oom``); only the new tokens are decoded. Adapters load
once each with peft (``PeftModel.from_pretrained`` for the first, ``load_adapter`` after) and are
switched with ``set_adapter``; ``adapter=None`` runs the base model inside ``disable_adapter()``.
``family=None`` serves a text-only causal LM (the synthesizer's), formatted by its tokenizer's chat
template.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import EngineConfig, GenerationConfig
from medcap.engines.base import Completion, Request
from medcap.models.chat import add_special_tokens, eos_ids, render_chat, text_only
from medcap.models.families import Family
from medcap.models.hub import ModelNotFoundError
from medcap.models.oom import HalvingBatches

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


def generate_kwargs(params: GenerationConfig) -> dict[str, Any]:
    """``model.generate`` arguments for greedy, beam or sampling decoding."""
    kw: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "num_beams": params.num_beams,
        "do_sample": params.do_sample,
        "repetition_penalty": params.repetition_penalty,
    }
    if params.do_sample:
        kw.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
    else:  # explicit, so a model's own sampling defaults cannot leak in
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def as_image(image: Any) -> Image.Image:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    with Image.open(Path(image)) as im:
        return im.convert("RGB")


class HFEngine:
    """Transformers inference for a multimodal family, or for a text-only causal LM when ``family`` is None."""

    def __init__(
        self, family: Family | None, model: str | None, cfg: EngineConfig, *, max_pixels: int | None = None
    ) -> None:
        from medcap.models.devices import inference_dtype, resolve_device

        self.family = family
        self.cfg = cfg
        dtype = inference_dtype(cfg.dtype, resolve_device(cfg.device))  # auto: bf16 where the CPU has it
        if family is not None:
            self.model, self.processor = family.load(model, dtype=dtype, device=cfg.device, max_pixels=max_pixels)
            self.tokenizer = self.processor.tokenizer
        else:
            if model is None:
                raise ValueError("a text-only HFEngine needs a model name or path")
            from medcap.models.lms import load_causal_lm

            self.model, self.tokenizer = load_causal_lm(model, dtype=dtype, device=cfg.device)
            self.tokenizer.padding_side = "left"
            self.processor = None
        self.model_name = model or (family.default_model if family else "")
        self._peft: Any = None  # the PeftModel wrapping self.model, once an adapter is loaded
        self._adapters: dict[str, str] = {}  # adapter path -> peft adapter name
        self._batches = HalvingBatches(
            cfg.batch_size,
            f"hf engine {self.model_name}",
            hint="lower generation.max_new_tokens or max_pixels, or use a smaller dtype or model",
        )

    # ------------------------------------------------------------------ adapters

    @contextlib.contextmanager
    def _adapter(self, adapter: str | None) -> Iterator[None]:
        if adapter is None:
            with self._peft.disable_adapter() if self._peft is not None else contextlib.nullcontext():
                yield
            return
        key = str(Path(adapter).resolve())
        if key not in self._adapters:
            if not (Path(key) / "adapter_config.json").is_file():
                raise ModelNotFoundError(f"LoRA adapter {adapter!r} not found (no adapter_config.json in it)")
            name = f"adapter_{len(self._adapters)}"
            if self._peft is None:
                from peft import PeftModel

                # LoRA layers are injected into self.model in place; generate() keeps working on it.
                self._peft = PeftModel.from_pretrained(self.model, key, adapter_name=name, is_trainable=False)
            else:
                self._peft.load_adapter(key, adapter_name=name, is_trainable=False)
            self._peft.eval()
            self._adapters[key] = name
            log.info("loaded LoRA adapter %s as %s", adapter, name)
        self._peft.set_adapter(self._adapters[key])
        yield

    # ------------------------------------------------------------------ generation

    def render(self, request: Request) -> str:
        """The request's prompt text after the chat template."""
        if self.family is not None:
            return self.family.render(self.processor, request.messages, add_generation_prompt=True)
        return render_chat(self.tokenizer, text_only(request.messages), add_generation_prompt=True)

    def _encode(self, batch: list[Request]):
        texts = [self.render(r) for r in batch]
        if self.family is not None:
            images = [[as_image(i) for i in r.images] for r in batch]
            return self.family.encode(self.processor, texts, images)
        special = add_special_tokens(texts, self.tokenizer.bos_token)
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)

    def _eos_ids(self) -> set[int]:
        ids = set(eos_ids(self.model))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _run(self, batch: list[Request]) -> list[Completion]:
        import torch

        params = batch[0].params
        enc = self._encode(batch).to(self.model.device)
        if "pixel_values" in enc and enc["pixel_values"].is_floating_point():
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        if params.do_sample:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            out = self.model.generate(**enc, **generate_kwargs(params))
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        eos, pad = self._eos_ids(), self.tokenizer.pad_token_id
        completions = []
        for r, tokens in zip(batch, new, strict=True):
            cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), None)
            kept = tokens[:cut] if cut is not None else [t for t in tokens if t != pad]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            completions.append(Completion(r.id, text.strip(), n_tokens=len(kept)))
        return completions

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions for ``requests``, in their order."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.adapter, astuple(r.params)), []).append(i)
        results: list[Completion | None] = [None] * len(requests)
        for (adapter, _), idx in groups.items():
            with self._adapter(adapter):
                for i, c in zip(idx, self._batches.run([requests[i] for i in idx], self._run), strict=True):
                    results[i] = c
        return [c for c in results if c is not None]

    def close(self) -> None:
        """Free the model (and GPU memory)."""
        self.model = self._peft = None
        self._adapters.clear()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def HFTextEngine(model: str, cfg: EngineConfig) -> HFEngine:  # noqa: N802 - reads as a class at call sites
    """A text-only causal LM engine (chat template from the tokenizer): ``HFEngine(None, model, cfg)``."""
    return HFEngine(None, model, cfg)
