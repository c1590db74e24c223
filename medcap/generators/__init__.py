"""Generators: each writes one candidate caption per image into ``candidates/NAME/SPLIT.jsonl``.

A generator is built from its config by a builder in ``BUILDERS`` (kind -> builder) and is then
a callable from a batch of ``(example, neighbours)`` items to candidates. Heavy generators
(multimodal LLMs, the prefix captioner) import their modules only when built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcap.config import GeneratorConfig
from medcap.generators.neighbour import consensus, nearest
from medcap.records import Candidate, Example, NeighbourList

Item = tuple[Example, NeighbourList | None]
Generator = Callable[[list[Item]], list[Candidate]]

MLLM_KINDS = ("llava", "qwen2_5_vl", "medgemma", "smolvlm")


@dataclass(frozen=True)
class GeneratorInputs:
    """What a generator may read besides its items: trained model folder and cached embeddings."""

    model_dir: Path  # runs/NAME/models/GENERATOR (trained adapter or prefix model)
    embeddings: Path | None = None  # the split's retrieval embeddings (the prefix captioner reads them)
    vectors: tuple[list[str], np.ndarray] | None = None  # or the same in memory: (ids, rows)
    index_examples: dict[str, Example] | None = None  # neighbours' images for few-shot with images


def needs_training(cfg: GeneratorConfig) -> bool:
    """True for generators whose model the run must train first (prefix; SFT without a given adapter)."""
    return cfg.kind == "prefix" or (cfg.kind in MLLM_KINDS and cfg.mode == "sft" and cfg.adapter is None)


def _neighbour_builder(fn):
    def build(cfg: GeneratorConfig, inputs: GeneratorInputs) -> Generator:
        return lambda items: fn(cfg, [nb for _, nb in items])

    return build


def _mllm_builder(cfg: GeneratorConfig, inputs: GeneratorInputs) -> Generator:
    from medcap.generators.mllm import MLLMGenerator, make_engine

    adapter = cfg.adapter
    if adapter is None and cfg.mode == "sft":
        adapter = str(inputs.model_dir / "adapter")
    return MLLMGenerator(cfg, make_engine(cfg), adapter=adapter, index_examples=inputs.index_examples)


def _prefix_builder(cfg: GeneratorConfig, inputs: GeneratorInputs) -> Generator:
    from medcap.generators.prefix_train import PrefixGenerator
    from medcap.retrieval.embed import load_embeddings

    if inputs.vectors is None and inputs.embeddings is None:
        raise ValueError(f"generator {cfg.name}: the prefix captioner needs the split's retrieval embeddings")
    model = PrefixGenerator(cfg, inputs.model_dir / "model")  # train_prefix writes the final model there
    ids, vectors = inputs.vectors if inputs.vectors is not None else load_embeddings(inputs.embeddings)
    row = {id_: i for i, id_ in enumerate(ids)}

    def generate(items: list[Item]) -> list[Candidate]:
        batch = [ex.id for ex, _ in items]
        return model(batch, vectors[[row[i] for i in batch]])

    return generate


BUILDERS: dict[str, Callable[[GeneratorConfig, GeneratorInputs], Generator]] = {
    "nearest": _neighbour_builder(nearest),
    "consensus": _neighbour_builder(consensus),
    "prefix": _prefix_builder,
    **dict.fromkeys(MLLM_KINDS, _mllm_builder),
}


def build_generator(cfg: GeneratorConfig, inputs: GeneratorInputs) -> Generator:
    try:
        builder = BUILDERS[cfg.kind]
    except KeyError:
        raise ValueError(f"generator {cfg.name}: unknown kind {cfg.kind!r}; known: {sorted(BUILDERS)}") from None
    return builder(cfg, inputs)


def get_generator(kind: str) -> Callable[[GeneratorConfig, list[NeighbourList]], list[Candidate]]:
    """The neighbour captioners as plain functions of (config, neighbour lists)."""
    plain = {"nearest": nearest, "consensus": consensus}
    try:
        return plain[kind]
    except KeyError:
        raise ValueError(f"unknown generator kind {kind!r}; known: {sorted(plain)}") from None


def train_model(
    cfg: GeneratorConfig, model_dir: Path, train: list[Item], valid: list[Item], embeddings: Path | None = None
) -> Path:
    """Train the model a generator needs (prefix captioner or LoRA adapter) into ``model_dir``."""
    if cfg.kind == "prefix":
        from medcap.generators.prefix_train import train_prefix
        from medcap.retrieval.embed import load_embeddings

        if embeddings is None:
            raise ValueError(f"generator {cfg.name}: the prefix captioner trains on retrieval embeddings")
        ids, vectors = load_embeddings(embeddings)
        row = {id_: i for i, id_ in enumerate(ids)}

        def arrays(items: list[Item]):
            batch = [ex.id for ex, _ in items]
            return batch, vectors[[row[i] for i in batch]], [ex.caption for ex, _ in items]

        if cfg.prefix.lm == "scratch":  # a small LM learned from scratch on the training captions
            from dataclasses import replace

            from medcap.lms import build_scratch_lm

            if not cfg.prefix.train_lm:
                raise ValueError(f"generator {cfg.name}: prefix.lm: scratch needs prefix.train_lm: true")
            lm = build_scratch_lm([ex.caption for ex, _ in train], model_dir / "scratch-lm")
            cfg = replace(cfg, prefix=replace(cfg.prefix, lm=str(lm)))
        return train_prefix(cfg, *arrays(train), *arrays(valid), model_dir)
    if cfg.kind in MLLM_KINDS:
        from medcap.generators.train import train_generator

        return train_generator(cfg, train, valid, model_dir)
    raise ValueError(f"generator {cfg.name}: kind {cfg.kind!r} has nothing to train")
