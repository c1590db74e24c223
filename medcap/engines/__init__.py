"""Inference engines behind one interface (``base.py``) and one factory: hf (transformers), vllm, openai (HTTP).

Generators, synthesizers and fusers all get their engine from :func:`make_engine`, so a model name
means the same thing to every stage: a multimodal family's model when ``family`` is given, else a
text-only causal LM (packaged names such as ``smollm2`` resolve to their local copy). An engine
config whose ``extra`` holds ``ray`` runs the same engine in Ray Data workers (docs/scaling.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medcap.engines.base import Completion, Engine, Request

if TYPE_CHECKING:
    from medcap.config import EngineConfig

__all__ = ["ENGINE_KINDS", "Completion", "Engine", "Request", "make_engine"]

ENGINE_KINDS = ("hf", "vllm", "openai", "auto")


def resolve_kind(kind: str) -> str:
    """``auto``: the fastest in-process engine this environment has (vLLM when it is installed, else hf)."""
    if kind != "auto":
        return kind
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def resolved(cfg: EngineConfig) -> tuple[str, str]:
    """(engine kind, dtype) that ``auto`` settings come to on this machine: part of the keys of what an engine writes."""
    from medcap.models.devices import inference_dtype, resolve_device

    return resolve_kind(cfg.kind), inference_dtype(cfg.dtype, resolve_device(cfg.device))


def make_engine(
    model: str | None,
    cfg: EngineConfig,
    *,
    family: str | None = None,
    max_pixels: int | None = None,
    max_images: int | None = None,
    owner: str = "engine",
) -> Engine:
    """The engine ``cfg.kind`` names, serving ``model`` (default: the family's); ``owner`` names the config in errors.

    ``max_images``: the most images one prompt may hold (vLLM reserves room for them at start; None: the family's).
    """
    from medcap.models.families import get_family

    if "ray" in cfg.extra:  # the same engine in Ray Data actors, each built from the config without `ray`
        import dataclasses
        import functools

        from medcap.engines.ray import make_ray_engine

        inner = dataclasses.replace(cfg, extra={k: v for k, v in cfg.extra.items() if k != "ray"})
        build = functools.partial(
            make_engine, model, inner, family=family, max_pixels=max_pixels, max_images=max_images, owner=owner
        )
        return make_ray_engine(build, cfg.extra["ray"], owner)
    if cfg.kind == "auto":
        import dataclasses

        cfg = dataclasses.replace(cfg, kind=resolve_kind(cfg.kind))
    fam = get_family(family) if family else None
    if fam is None and not model:
        raise ValueError(f"{owner}: a text-only engine needs a model name or path")
    if cfg.kind == "hf":
        from medcap.engines.hf import HFEngine

        return HFEngine(fam, model, cfg, max_pixels=max_pixels)
    if cfg.kind == "vllm":
        from medcap.engines.vllm import VLLMEngine
        from medcap.models.lms import resolve_lm_path

        name = model if fam else resolve_lm_path(model)
        return VLLMEngine(fam, name, cfg, max_pixels=max_pixels, max_images=max_images)
    if cfg.kind == "openai":
        from medcap.engines.openai import OpenAIEngine

        return OpenAIEngine(model or fam.default_model, cfg)
    raise ValueError(f"{owner}: unknown engine kind {cfg.kind!r}; use {' | '.join(ENGINE_KINDS)}")
