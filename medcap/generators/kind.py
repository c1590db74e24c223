"""The contract between the generate/train stages and a generator kind (see ``generators/__init__.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import GeneratorConfig
from medcap.keys import key_settings
from medcap.records import Candidate, Example, NeighbourList

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

Item = tuple[Example, NeighbourList | None]
Generator = Callable[[list[Item]], list[Candidate]]  # may also have close()


class GeneratorKind:
    """What the stages ask of a generator kind; the defaults fit an untrained, model-free kind."""

    def trains(self, cfg: GeneratorConfig) -> bool:
        """True when the run must train a model for ``cfg`` before it generates."""
        return False

    def settings(self, pipe: Pipeline, cfg: GeneratorConfig) -> Any:
        """What shapes the captions, for the candidates' key (models by content when local)."""
        return key_settings(cfg)

    def train_settings(self, cfg: GeneratorConfig) -> Any:
        """What shapes the trained model, for its key (not how it decodes or is served)."""
        return None

    def needs(self, pipe: Pipeline, cfg: GeneratorConfig, split: str) -> list[tuple]:
        """Artifacts besides ``split``'s neighbours that generating ``split`` reads."""
        return []

    def train_needs(self, pipe: Pipeline, cfg: GeneratorConfig) -> list[tuple]:
        """Artifacts training reads (on the index split)."""
        return []

    def train(self, pipe: Pipeline, cfg: GeneratorConfig, train: list[Item], valid: list[Item], out: Path) -> None:
        raise ValueError(f"generator {cfg.name}: kind {cfg.kind!r} has nothing to train")

    def build(self, pipe: Pipeline, cfg: GeneratorConfig, split: str, model_dir: Path) -> Generator:
        raise NotImplementedError

    def chunk(self, cfg: GeneratorConfig) -> int:
        """Items per batch written to disk (the unit a crash can lose): the engine's batch, else 256."""
        engine = getattr(cfg, "engine", None)
        return max(1, engine.batch_size) if engine is not None else 256
