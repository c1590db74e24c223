"""Generators: each writes one candidate caption per image into ``candidates/NAME/SPLIT.jsonl``."""

from __future__ import annotations

from collections.abc import Callable

from medcap.config import GeneratorConfig
from medcap.generators.neighbour import consensus, nearest
from medcap.records import Candidate, NeighbourList

Generator = Callable[[GeneratorConfig, list[NeighbourList]], list[Candidate]]

# kind -> generator; later generators (multimodal LLMs, the prefix captioner) register here.
GENERATORS: dict[str, Generator] = {"nearest": nearest, "consensus": consensus}


def get_generator(kind: str) -> Generator:
    try:
        return GENERATORS[kind]
    except KeyError:
        raise ValueError(f"unknown generator kind {kind!r}; known: {sorted(GENERATORS)}") from None
