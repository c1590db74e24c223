"""Generators: each writes one candidate caption per image into ``candidates/NAME/SPLIT.jsonl``.

A generator's ``kind`` names a :class:`GeneratorKind` in ``KINDS`` (name -> ``"module:attr"``,
imported when first used). The kind says what it reads besides the split's neighbours, whether
and how it trains, which settings shape its captions, and builds the callable that turns a batch
of ``(example, neighbours)`` items into candidates. The generate and train stages
(``generators/stage.py``) know no kind: adding one is one file with its kind object and one line
in ``KINDS`` (or :func:`register` at run time).
"""

from __future__ import annotations

from collections.abc import Callable

from medcap.config import GeneratorConfig
from medcap.generators.kind import Generator, GeneratorKind, Item
from medcap.generators.neighbour import consensus, nearest
from medcap.records import Candidate, NeighbourList
from medcap.registry import Registry

__all__ = ["KINDS", "MLLM_KINDS", "Generator", "GeneratorKind", "Item", "generator_kind", "needs_training", "register"]

MLLM_KINDS = ("llava", "qwen2_5_vl", "medgemma", "smolvlm")
KINDS = Registry(
    "generator kind",
    {
        "nearest": "medcap.generators.neighbour:NEAREST",
        "consensus": "medcap.generators.neighbour:CONSENSUS",
        "constant": "medcap.generators.neighbour:CONSTANT",
        "prefix": "medcap.generators.prefix_train:PREFIX",
        **dict.fromkeys(MLLM_KINDS, "medcap.generators.mllm:MLLM"),
    },
)


def register(kind: str, impl: GeneratorKind | str, settings: type | str = GeneratorConfig) -> None:
    """Add a generator kind: an object, or ``"module:attr"`` naming one, and its settings class (a
    ``GeneratorConfig`` subclass beside its code; the base for a kind with no settings of its own)."""
    KINDS[kind] = impl
    GeneratorConfig.KINDS[kind] = settings


def generator_kind(kind: str) -> GeneratorKind:
    return KINDS.get(kind)


def needs_training(cfg: GeneratorConfig) -> bool:
    """True for generators whose model the run must train first (prefix; SFT without a given adapter)."""
    return generator_kind(cfg.kind).trains(cfg)


def get_generator(kind: str) -> Callable[[GeneratorConfig, list[NeighbourList]], list[Candidate]]:
    """The neighbour captioners as plain functions of (config, neighbour lists)."""
    plain = {"nearest": nearest, "consensus": consensus}
    try:
        return plain[kind]
    except KeyError:
        raise ValueError(f"unknown generator kind {kind!r}; known: {sorted(plain)}") from None
