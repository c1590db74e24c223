"""The LM-Fuser: a small causal LM, fine-tuned on (candidates -> reference) (``lm_train``), writes the caption.

Its prompt is ``lm_prompt.fuser_prompt``. ``LMFuser`` loads ``out_dir/final`` of a training run (a full model, or a LoRA adapter over the
base model named in ``medcap_fuser.json``) and decodes in batches with left padding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import EngineConfig, FuserConfig, GenerationConfig, LoraConfig, TrainConfig
from medcap.engines.base import Engine, Request
from medcap.fuser import Fuse, FuserKind
from medcap.fuser.lm_prompt import META, fuser_prompt, read_meta
from medcap.keys import key_settings
from medcap.models.captions import clean_caption
from medcap.models.hub import model_identity
from medcap.records import Candidate, NeighbourList

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

__all__ = ["LM", "META", "LMFuser", "LMKind", "fuser_prompt"]

Item = tuple[str, dict[str, str], NeighbourList | None]  # image ID, {caption set: caption}, neighbours


@dataclass
class LMFuserConfig(FuserConfig):
    """The LM-Fuser: a small causal LM fine-tuned on (candidates [+ neighbours' captions] -> reference)."""

    kind: str = "lm"
    model: str = "smollm2"  # the fuser's base causal LM (smollm2 offline, Qwen/Qwen2.5-0.5B-Instruct, ...)
    use_neighbours: bool = False  # also show the neighbours' captions
    k: int = 3  # neighbours shown when use_neighbours
    train_split: str | None = (
        "valid"  # split whose candidates it trains on (never one the generators trained on); null: the index split (cross-fitted inputs)
    )
    alternatives: int = 0  # also show this many of a ranking input's next hypotheses ("ranker #2", ...)
    lora: LoraConfig | None = None  # LoRA, or None for full fine-tuning
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


class LMFuser:
    """Fused captions from a trained LM-Fuser folder (``train_fuser``'s ``final``, or its ``out_dir``).

    ``engine`` replaces the default ``hf`` engine (for tests, or a vLLM engine serving the same
    base model with ``enable_lora``); requests carry the adapter path when the fuser is a LoRA.
    """

    def __init__(self, cfg: LMFuserConfig, model_dir: Path, *, engine: Engine | None = None) -> None:
        self.cfg = cfg
        model_dir = Path(model_dir)
        # A training folder (``train_fuser``'s out_dir) stands for its ``final`` model.
        self.model_dir = model_dir / "final" if (model_dir / "final" / META).is_file() else model_dir
        self.meta = read_meta(self.model_dir)
        self.adapter = str(self.model_dir) if self.meta.get("adapter") else None
        self.model_name = self.meta["base_model"] if self.adapter else str(self.model_dir)
        if engine is None:
            from medcap.engines import make_engine

            engine = make_engine(self.model_name, cfg.engine, owner=f"fusers.{cfg.name}")
        self.engine = engine

    def request(self, image_id: str, candidates: dict[str, str], neighbours: NeighbourList | None) -> Request:
        messages = fuser_prompt(candidates, neighbours, self.cfg)
        return Request(id=image_id, messages=tuple(messages), adapter=self.adapter, params=self.cfg.generation)

    def __call__(self, items: list[Item]) -> list[Candidate]:
        """One fused caption per item, in order."""
        out: list[Candidate] = []
        size = max(self.cfg.engine.batch_size, 1)
        for start in range(0, len(items), size):
            requests = [self.request(i, c, n) for i, c, n in items[start : start + size]]
            for req, comp in zip(requests, self.engine.generate(requests), strict=True):
                extra = {"model": self.meta.get("base_model"), "fuser": str(self.model_dir), "raw": comp.text}
                out.append(Candidate(req.id, clean_caption(comp.text), self.cfg.name, extra))
            log.debug("%s: %d/%d images fused", self.cfg.name, len(out), len(items))
        return out

    def close(self) -> None:
        """Free the engine."""
        self.engine.close()


class LMKind(FuserKind):
    """The LM-Fuser: trained (train-fuser stage) on its train split's caption sets, never captioning that split."""

    def trains(self, cfg: LMFuserConfig) -> bool:
        return True

    def covers(self, cfg: LMFuserConfig, split: str) -> bool:
        return split != cfg.train_split

    def train_split(self, pipe: Pipeline, cfg: LMFuserConfig) -> str:
        return cfg.train_split or pipe.cfg.data.index_split

    def wants_neighbours(self, cfg: LMFuserConfig) -> bool:
        return cfg.use_neighbours

    def settings(self, pipe: Pipeline, cfg: LMFuserConfig) -> Any:
        from medcap.engines import resolved

        return key_settings(cfg), model_identity(cfg.model), resolved(cfg.engine)

    def train_settings(self, cfg: LMFuserConfig) -> Any:
        shaping = (cfg.use_neighbours, cfg.k, cfg.candidates, cfg.train_split, cfg.alternatives)
        return shaping, key_settings(cfg.lora), key_settings(cfg.train), model_identity(cfg.model)

    def needs(self, pipe: Pipeline, cfg: LMFuserConfig, split: str) -> list[tuple]:
        return [("train-fuser", cfg.name)] + ([("retrieve", split)] if cfg.use_neighbours else [])

    def train(self, pipe: Pipeline, cfg: LMFuserConfig, out: Path) -> None:
        from medcap.data.folds import holdout
        from medcap.fuser import candidate_captions
        from medcap.fuser.leakage import check_fuser_inputs
        from medcap.fuser.lm_train import train_fuser

        split = self.train_split(pipe, cfg)
        examples = pipe.split(split).examples
        if any(ex.caption is None for ex in examples):
            raise ValueError(f"fuser {cfg.name}: train_split {split!r} has no reference captions")
        inputs = pipe.inputs_of(cfg.name)
        candidates = candidate_captions(pipe, inputs, split, cfg.alternatives)
        check_fuser_inputs(pipe, cfg.name, split)
        neighbours = pipe.neighbour_lists(split) if cfg.use_neighbours else {}
        train_items, valid_items = holdout([(ex, neighbours.get(ex.id)) for ex in examples], pipe.cfg.seed)

        def rows(items):
            return [(candidates[ex.id], nb, ex.caption) for ex, nb in items]

        train_fuser(cfg, rows(train_items), rows(valid_items), out)

    def build(self, pipe: Pipeline, cfg: LMFuserConfig, split: str) -> Fuse:
        return LMFuser(cfg, pipe.run.model(cfg.name))


LM = LMKind()
