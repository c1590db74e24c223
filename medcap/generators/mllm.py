"""The multimodal LLM generator: prompts from ``prompts.build_messages``, any engine, cleaned captions.

``MLLMGenerator`` turns (example, neighbours) pairs into engine requests (query image, plus the
neighbours' images in few-shot mode with ``shot_images``), sends them ``cfg.engine.batch_size`` at a
time, and cleans each output into one caption. ``make_engine`` builds the engine a generator config
names (hf, vllm or openai).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from medcap.config import GeneratorConfig
from medcap.data import load_image
from medcap.engines.base import Engine, Request
from medcap.generators.clean import clean_caption
from medcap.generators.families import get_family
from medcap.generators.prompts import build_messages
from medcap.records import Candidate, Example, NeighbourList

log = logging.getLogger(__name__)


def make_engine(cfg: GeneratorConfig) -> Engine:
    """The engine ``cfg.engine.kind`` names, serving ``cfg.model`` (default: the family's)."""
    if "ray" in cfg.engine.extra:  # scale out: the same engine in Ray Data workers (docs/scaling.md)
        from medcap.engines.ray import make_ray_engine

        return make_ray_engine(cfg)
    kind = cfg.engine.kind
    family = get_family(cfg.kind)
    if kind == "hf":
        from medcap.engines.hf import HFEngine

        return HFEngine(family, cfg.model, cfg.engine, max_pixels=cfg.max_pixels)
    if kind == "vllm":
        from medcap.engines.vllm import VLLMEngine

        return VLLMEngine(family, cfg.model, cfg.engine, max_pixels=cfg.max_pixels)
    if kind == "openai":
        from medcap.engines.openai import OpenAIEngine

        return OpenAIEngine(cfg.model or family.default_model, cfg.engine)
    raise ValueError(f"unknown engine kind {kind!r} for generator {cfg.name!r}; use hf | vllm | openai")


class MLLMGenerator:
    """Captions from a multimodal LLM behind any engine.

    ``index_examples`` (the index split's examples by ID) supplies the neighbours' image files when
    ``cfg.shot_images`` is set in few-shot mode.
    """

    def __init__(
        self,
        cfg: GeneratorConfig,
        engine: Engine,
        adapter: str | None = None,
        *,
        index_examples: Mapping[str, Example] | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.adapter = adapter if adapter is not None else cfg.adapter
        self.index_examples = index_examples or {}
        self.family = get_family(cfg.kind)
        self.model_name = cfg.model or self.family.default_model

    def request(self, example: Example, neighbours: NeighbourList | None) -> Request:
        """The engine request for one image."""
        cfg = self.cfg
        shot_images = cfg.mode == "few-shot" and cfg.shot_images
        messages, with_images = build_messages(
            cfg.mode,
            neighbours=neighbours,
            k=cfg.k,
            instruction=cfg.prompt or self.family.default_prompt,
            shot_images=shot_images,
            query_id=example.id,
            max_images=self.family.max_images,
        )
        missing = [nid for nid in with_images if nid not in self.index_examples]
        if missing:
            raise ValueError(
                f"generator {cfg.name!r}: shot_images needs the index split's examples to load neighbour images; "
                f"missing {missing[:5]} (pass index_examples)"
            )
        images: list[Any] = [load_image(self.index_examples[nid]) for nid in with_images]
        images.append(load_image(example))
        return Request(
            id=example.id,
            messages=tuple(messages),
            images=tuple(images),
            adapter=self.adapter,
            params=cfg.generation,
        )

    def __call__(self, items: list[tuple[Example, NeighbourList | None]]) -> list[Candidate]:
        """One candidate per example, in order."""
        out: list[Candidate] = []
        size = max(self.cfg.engine.batch_size, 1)
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            requests = [self.request(ex, nl) for ex, nl in chunk]
            for req, comp in zip(requests, self.engine.generate(requests), strict=True):
                extra = {"mode": self.cfg.mode, "model": self.model_name, "raw": comp.text}
                if self.adapter:
                    extra["adapter"] = str(self.adapter)
                out.append(Candidate(req.id, clean_caption(comp.text), self.cfg.name, extra))
            log.info("%s: %d/%d images captioned", self.cfg.name, len(out), len(items))
        return out
