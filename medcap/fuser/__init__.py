"""Fusers: one final caption per image from the caption sets of generators (and synthesizers).

A fuser's ``kind`` names a :class:`FuserKind` in ``KINDS`` (imported when first used): ``mbr``
(minimum-Bayes-risk selection over the candidates), ``pool-mbr`` (MBR with a BERTScore utility over
every index caption and sentence against the neighbours' captions), ``rerank`` (image-caption similarity), ``lm`` (the LM-Fuser, a small
LM trained on candidates -> reference), ``ranker`` (a model that learns which hypothesis of pool-MBR's
list fits the image). The fuse and train-fuser stages (``fuser/stage.py``) know no kind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import FuserConfig
from medcap.keys import key_settings
from medcap.records import Candidate, NeighbourList
from medcap.registry import Registry

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

# image ID, {caption set: caption}, neighbours (read when the kind asks for them)
Item = tuple[str, dict[str, str], NeighbourList | None]
Fuse = Callable[[list[Item]], list[Candidate]]  # may also have close()

KINDS = Registry(
    "fuser kind",
    {
        "mbr": "medcap.fuser.mbr:MBR",
        "pool-mbr": "medcap.fuser.pool_mbr:POOL_MBR",
        "rerank": "medcap.fuser.mbr:RERANK",
        "lm": "medcap.fuser.lm:LM",
        "ranker": "medcap.fuser.ranker:RANKER",
    },
)


class FuserKind:
    """What the stages ask of a fuser kind; the defaults fit a training-free one."""

    uses_neighbours = False  # True: items carry the split's neighbours

    def trains(self, cfg: FuserConfig) -> bool:
        return False

    def covers(self, cfg: FuserConfig, split: str) -> bool:
        """False for a split the fuser must not caption (an LM-Fuser's training split)."""
        return True

    def settings(self, pipe: Pipeline, cfg: FuserConfig) -> Any:
        return key_settings(cfg)

    def train_settings(self, cfg: FuserConfig) -> Any:
        return None

    def train_split(self, pipe: Pipeline, cfg: FuserConfig) -> str:
        """The split a learned fuser trains on."""
        return cfg.train_split

    def train_needs(self, pipe: Pipeline, cfg: FuserConfig) -> list[tuple]:
        """Artifacts its training reads besides the caption sets on its train split."""
        return [("retrieve", self.train_split(pipe, cfg))] if self.wants_neighbours(cfg) else []

    def needs(self, pipe: Pipeline, cfg: FuserConfig, split: str) -> list[tuple]:
        """Artifacts besides the caption sets it reads."""
        return []

    def wants_neighbours(self, cfg: FuserConfig) -> bool:
        return self.uses_neighbours

    def train(self, pipe: Pipeline, cfg: FuserConfig, out: Path) -> None:
        raise ValueError(f"fuser {cfg.name}: kind {cfg.kind!r} has nothing to train")

    def build(self, pipe: Pipeline, cfg: FuserConfig, split: str) -> Fuse:
        raise NotImplementedError


def candidate_captions(
    pipe: Pipeline, inputs: list[str], split: str, alternatives: int = 0
) -> dict[str, dict[str, str]]:
    """``{image: {caption set: caption}}`` of ``inputs`` on ``split`` (made first when their stage may run).

    ``alternatives`` > 0 adds, for a caption set whose rows rank alternatives (the ranker's), its next ones
    as ``"NAME #2"``, ``"NAME #3"``, ...: a generative fuser then reads the ranker's top hypotheses.
    """
    from medcap.files import read_jsonl

    out: dict[str, dict[str, str]] = {}
    for name in inputs:
        for row in read_jsonl(pipe.make(*pipe.caption_need(name, split))):
            caps = out.setdefault(row["id"], {})
            caps[name] = row["caption"]
            for k, alt in enumerate((row.get("alternatives") or [])[1 : alternatives + 1], start=2):
                caps[f"{name} #{k}"] = alt
    return out


def register(kind: str, impl: FuserKind | str, settings: type | str = FuserConfig) -> None:
    """Add a fuser kind: an object, or ``"module:attr"`` naming one, and its settings class (a ``FuserConfig``
    subclass beside its code; the base for a kind with no settings of its own)."""
    KINDS[kind] = impl
    FuserConfig.KINDS[kind] = settings


def fuser_kind(kind: str) -> FuserKind:
    return KINDS.get(kind)
