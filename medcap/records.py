"""Records that flow between stages: small frozen dataclasses, each carrying the image ID."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Example:
    """One image of a data set and what is known about it.

    ``image`` is a file path, or the encoded bytes when the image lives inside a data set
    (Hugging Face ``datasets``) rather than on disk. ``caption`` is ``None`` for a test split
    without references; ``group`` is the case/patient the image belongs to, when known.
    """

    id: str
    image: Path | bytes | None
    caption: str | None = None
    concepts: tuple[str, ...] = ()
    group: str | None = None


@dataclass(frozen=True)
class Neighbour:
    """A retrieved training image: its ID, similarity score, caption and concepts."""

    id: str
    score: float
    caption: str | None = None
    concepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class NeighbourList:
    """The k nearest training images of one query image, best first."""

    id: str
    neighbours: tuple[Neighbour, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "neighbours": [asdict(n) | {"concepts": list(n.concepts)} for n in self.neighbours]}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> NeighbourList:
        return cls(
            id=row["id"],
            neighbours=tuple(
                Neighbour(n["id"], float(n["score"]), n.get("caption"), tuple(n.get("concepts") or ()))
                for n in row["neighbours"]
            ),
        )


@dataclass(frozen=True)
class Candidate:
    """A caption written for one image by one generator (or synthesizer, or fuser)."""

    id: str
    caption: str
    generator: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "caption": self.caption, "generator": self.generator, **self.extra}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Candidate:
        extra = {k: v for k, v in row.items() if k not in ("id", "caption", "generator")}
        return cls(id=row["id"], caption=row["caption"], generator=row.get("generator", ""), extra=extra)
