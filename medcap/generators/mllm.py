"""The multimodal LLM generator: prompts from ``prompts.build_messages``, any engine, cleaned captions.

``MLLMGenerator`` turns (example, neighbours) pairs into engine requests (query image, plus the
neighbours' images in few-shot mode with ``shot_images``), sends them ``cfg.engine.batch_size`` at a
time, and cleans each output into one caption. ``MLLM`` is the generator kind of every family
(llava, qwen2_5_vl, medgemma, smolvlm): zero-shot, few-shot, or SFT with a LoRA adapter the run
trains (``generators/train.py``) unless ``adapter`` names one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import ConfigError, EngineConfig, GenerationConfig, GeneratorConfig, LoraConfig, TrainConfig
from medcap.engines.base import Engine, Request
from medcap.generators.kind import Generator, GeneratorKind, Item
from medcap.generators.prompts import mllm_request
from medcap.keys import key_settings
from medcap.models.captions import clean_caption
from medcap.models.families import get_family
from medcap.models.hub import model_identity
from medcap.records import Candidate, Example, NeighbourList

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

MODES = ("zero-shot", "sft", "few-shot")


@dataclass
class MLLMConfig(GeneratorConfig):
    """A multimodal LLM generator (every family: llava, qwen2_5_vl, medgemma, smolvlm)."""

    kind: str = "llava"
    model: str | None = None  # hub id or local path (default: the family's)
    mode: str = "zero-shot"  # zero-shot | sft | few-shot
    k: int | None = None  # few-shot: neighbours' captions shown as examples (None: every retrieved one)
    adapter: str | None = None  # LoRA adapter folder; sft default: the run's trained adapter for this generator
    shot_images: bool = False  # few-shot: also show the neighbours' images, where model and engine allow
    prompt: str | None = None  # the instruction; default: the family's
    max_pixels: int | None = None  # qwen2_5_vl: cap image pixels (default 512*28*28) or it runs out of memory
    engine: EngineConfig = field(default_factory=EngineConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    folds: int = 0  # >= 2: cross-fit on the index split (K adapters, each writes its held-out fold's candidates)

    def check(self, where: str) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"{where}.mode: {self.mode!r} is not one of {sorted(MODES)}")


def make_engine(cfg: MLLMConfig) -> Engine:
    """The engine ``cfg.engine`` names, serving the generator's model (default: the family's)."""
    from medcap.engines import make_engine as make

    return make(cfg.model, cfg.engine, family=cfg.kind, max_pixels=cfg.max_pixels, owner=f"generators.{cfg.name}")


class MLLMGenerator:
    """Captions from a multimodal LLM behind any engine.

    ``index_examples`` (the index split's examples by ID) supplies the neighbours' image files when
    ``cfg.shot_images`` is set in few-shot mode.
    """

    def __init__(
        self,
        cfg: MLLMConfig,
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
        return mllm_request(self.cfg, example, neighbours, adapter=self.adapter, index_examples=self.index_examples)

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
            log.debug("%s: %d/%d images captioned", self.cfg.name, len(out), len(items))
        return out

    def close(self) -> None:
        """Free the engine's model."""
        if self.engine is not None:
            self.engine.close()


class MLLMKind(GeneratorKind):
    """Multimodal LLMs of every family: prompts from neighbours in few-shot mode, LoRA SFT when asked."""

    def trains(self, cfg: MLLMConfig) -> bool:
        return cfg.mode == "sft" and cfg.adapter is None

    def settings(self, pipe: Pipeline, cfg: MLLMConfig) -> Any:
        from medcap.engines import resolved

        return key_settings(cfg), model_identity(cfg.model), model_identity(cfg.adapter), resolved(cfg.engine)

    def train_settings(self, cfg: MLLMConfig) -> Any:
        shaping = (cfg.kind, cfg.mode, cfg.k, cfg.shot_images, cfg.prompt, cfg.max_pixels)
        return shaping, key_settings(cfg.lora), key_settings(cfg.train), model_identity(cfg.model)

    def train_needs(self, pipe: Pipeline, cfg: MLLMConfig) -> list[tuple]:
        return [("retrieve", pipe.cfg.data.index_split)] if cfg.mode == "few-shot" else []

    def train(self, pipe: Pipeline, cfg: MLLMConfig, train: list[Item], valid: list[Item], out: Path) -> None:
        from medcap.generators.train import train_generator

        train_generator(cfg, train, valid, out)

    def build(self, pipe: Pipeline, cfg: MLLMConfig, split: str, model_dir: Path) -> Generator:
        from dataclasses import replace

        from medcap.engines.pool import spec_of

        adapter = cfg.adapter
        if adapter is None and cfg.mode == "sft":
            if cfg.lora.merge:  # the adapter merged into the base weights: served without LoRA
                cfg, adapter = replace(cfg, model=str(model_dir / "merged")), None
            else:
                adapter = str(model_dir / "adapter")
        index = {ex.id: ex for ex in pipe.split(pipe.cfg.data.index_split).examples} if cfg.shot_images else None
        engine = engine_pool(pipe).engine(spec_of(cfg))
        return MLLMGenerator(cfg, engine, adapter=adapter, index_examples=index)


def engine_pool(pipe: Pipeline) -> Any:
    """The run's engines, one per base model and settings: generators that share them share one weight load
    (one ``LoRARequest`` per adapter on vLLM). Every generator artifact still to make is announced first, so
    an engine reserves images for its most demanding user and closes after its last one."""
    from medcap.engines.pool import EnginePool, spec_of
    from medcap.generators import MLLM_KINDS
    from medcap.pipeline import get_stage

    def announce() -> EnginePool:
        users = [
            spec_of(pipe.generator_cfg(name))
            for name, split in get_stage("generate").targets(pipe)
            if pipe.generator_cfg(name).kind in MLLM_KINDS and not pipe.fresh("generate", name, split)
        ]
        return EnginePool(users)

    return pipe.resource("engine-pool", announce)


MLLM = MLLMKind()
