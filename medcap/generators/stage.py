"""The train and generate stages: a generator's model, cross-fitting, and its candidates.

``train`` fits a generator's model (prefix captioner, LoRA adapter) on the index split, 10% of its
cases held out for validation (drawn with the run seed). ``generate`` writes
``candidates/NAME/SPLIT.jsonl`` a batch at a time (a rerun resumes).

Cross-fitting (``folds: K``) gives every index-split image an honest candidate: the index split is
cut into K folds by case, model ``i`` trains on the other K-1 folds and writes the candidates of
fold ``i``; the fold models live under ``models/NAME.folds/fold-I``, keyed by the training's key.
Other splits are captioned by the model trained on the whole index split. The rows of a
cross-fitted file carry their fold, and each model lists the IDs it trained on (``train_ids.json``),
so the fuser's leakage guard can check the claim from the files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import GeneratorConfig, config_hash
from medcap.data.folds import group_folds, holdout
from medcap.files import write_json
from medcap.generators import Item, generator_kind
from medcap.launch import hand_off, launcher_for
from medcap.logs import progress
from medcap.models.distributed import world
from medcap.pipeline import Stage
from medcap.runs import Manifest, ResumableJsonl, is_fresh, start_folder

if TYPE_CHECKING:
    from collections.abc import Mapping

    from medcap.pipeline import Pipeline
    from medcap.records import Example, NeighbourList

log = logging.getLogger(__name__)

TRAIN_IDS = "train_ids.json"  # beside every trained model: the image IDs it learned from


def crossfitted(pipe: Pipeline, cfg: GeneratorConfig, split: str) -> bool:
    """True when ``split``'s candidates come from K fold models (the index split of a ``folds >= 2`` generator)."""
    return (
        generator_kind(cfg.kind).trains(cfg) and cfg.folds >= 2 and split == pipe.cfg.data.index_split
    )  # trained kinds have folds


def index_items(pipe: Pipeline, cfg: GeneratorConfig) -> list[Item]:
    """The index split's items, with their neighbours when the generator's prompt shows them."""
    index_split = pipe.cfg.data.index_split
    shown = ("retrieve", index_split) in generator_kind(cfg.kind).train_needs(pipe, cfg)
    neighbours = pipe.neighbour_lists(index_split) if shown else {}
    return [(ex, neighbours.get(ex.id)) for ex in pipe.split(index_split).examples]


def fit(pipe: Pipeline, cfg: GeneratorConfig, items: list[Item], out: Path, key: str) -> None:
    """Train ``cfg``'s model on ``items`` (10% of cases held out for validation) into ``out``, keyed.

    A folder made with another key is removed first: a changed setting never resumes an old
    training or returns an old model. Under a launcher every process trains and rank 0 writes.
    """
    w = world()
    if w.is_main:
        start_folder(out, "train", key)
    w.barrier()
    train_items, valid_items = holdout(items, pipe.cfg.seed)
    generator_kind(cfg.kind).train(pipe, cfg, train_items, valid_items, out)
    if w.is_main:
        write_json(out / TRAIN_IDS, sorted(ex.id for ex, _ in train_items + valid_items))
        info = {"valid": len(valid_items), "processes": w.size}
        Manifest("train", key, complete=True, count=len(train_items), info=info).write(out)
    w.barrier()


class Train(Stage):
    """A generator's model trained on the whole index split."""

    name = "train"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(g.name,) for g in pipe.cfg.generators if generator_kind(g.kind).trains(g)]

    def path(self, pipe: Pipeline, name: str) -> Path:
        return pipe.run.model(name)

    def needs(self, pipe: Pipeline, name: str) -> list[tuple]:
        cfg = pipe.generator_cfg(name)
        return generator_kind(cfg.kind).train_needs(pipe, cfg)

    def settings(self, pipe: Pipeline, name: str) -> Any:
        cfg = pipe.generator_cfg(name)
        # the seed draws the validation hold-out; the index split's data is what it learns
        return generator_kind(cfg.kind).train_settings(cfg), pipe.cfg.seed, pipe.data_key(pipe.cfg.data.index_split)

    def hint(self, pipe: Pipeline, name: str) -> str:
        return f"medcap train generator {name} -c CONFIG"

    def make(self, pipe: Pipeline, out: Path, key: str, name: str) -> None:
        cfg = pipe.generator_cfg(name)
        launcher = launcher_for(cfg.train, pipe.launcher)
        if launcher is not None:  # train.processes > 1 or --launcher: in a launcher's processes
            hand_off(pipe, self.name, name, cfg.train, launcher, out, key)
        else:
            fit(pipe, cfg, index_items(pipe, cfg), out, key)


class Generate(Stage):
    """``candidates/NAME/SPLIT.jsonl``: one caption per image of the split, cross-fitted on the index split."""

    name = "generate"
    command = "medcap generate CONFIG"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        # generator by generator (all its splits together), those of one model next to each other:
        # a shared engine (engines/pool.py) is loaded once and closed before the next model's
        order = sorted(range(len(pipe.cfg.generators)), key=lambda i: (_model_of(pipe.cfg.generators[i]), i))
        gens = [pipe.cfg.generators[i] for i in order]
        return [(g.name, split) for g in gens for split in pipe.cfg.data.query_splits]

    def path(self, pipe: Pipeline, name: str, split: str) -> Path:
        return pipe.run.candidates(name, split)

    def needs(self, pipe: Pipeline, name: str, split: str) -> list[tuple]:
        cfg = pipe.generator_cfg(name)
        kind = generator_kind(cfg.kind)
        needs = [("retrieve", split), *kind.needs(pipe, cfg, split)]
        if crossfitted(pipe, cfg, split):
            needs += kind.train_needs(pipe, cfg)
        elif kind.trains(cfg):
            needs.append(("train", name))
        return list(dict.fromkeys(needs))

    def settings(self, pipe: Pipeline, name: str, split: str) -> Any:
        cfg = pipe.generator_cfg(name)
        kind = generator_kind(cfg.kind)
        folds = None
        if crossfitted(pipe, cfg, split):  # the fold models are part of this artifact: their training's key
            folds = (cfg.folds, pipe.key("train", name))
        return kind.settings(pipe, cfg), pipe.data_key(split), folds

    def make(self, pipe: Pipeline, out: Path, key: str, name: str, split: str) -> None:
        cfg = pipe.generator_cfg(name)
        kind = generator_kind(cfg.kind)
        neighbours = pipe.neighbour_lists(split)
        crossfit = crossfitted(pipe, cfg, split)
        plan = fold_models(pipe, cfg) if crossfit else [(pipe.run.model(name), None)]
        sink = ResumableJsonl(out, "generate", key, inputs=(str(pipe.path("retrieve", split)),))
        for fold, (model_dir, ids) in enumerate(plan):
            wanted = set(ids) if ids is not None else None
            todo = [
                ex
                for ex in pipe.split(split).examples
                if ex.id not in sink.done and (wanted is None or ex.id in wanted)
            ]
            if todo:
                generate = kind.build(pipe, cfg, split, model_dir)
                write_batches(
                    generate, todo, neighbours, sink, kind.chunk(cfg), f"generate {name}/{split}",
                    fold if crossfit else None,
                )  # fmt: skip
        sink.finish(info={"folds": cfg.folds} if crossfit else None)


def _model_of(cfg: GeneratorConfig) -> str:
    """What a generator's engine loads (its model, else its kind), to keep generators of one model together."""
    return getattr(cfg, "model", None) or cfg.kind


def fold_models(pipe: Pipeline, cfg: GeneratorConfig) -> list[tuple[Path, list[str]]]:
    """Train the K cross-fitting models of ``cfg``: (model folder, IDs of the fold it captions)."""
    items = index_items(pipe, cfg)
    folds = group_folds(items, cfg.folds, pipe.cfg.seed)
    models = []
    for i, fold in enumerate(folds):
        held = set(fold)
        out = pipe.run.fold_model(cfg.name, i)
        fold_key = config_hash("fold", pipe.key("train", cfg.name), cfg.folds, i)
        if is_fresh(out, fold_key):
            pipe.record("train", out, False)
        else:
            fit(pipe, cfg, [it for it in items if it[0].id not in held], out, fold_key)
            pipe.record("train", out, True)
        models.append((out, fold))
    return models


def write_batches(
    generate, todo: list[Example], neighbours: Mapping[str, NeighbourList], sink: ResumableJsonl, size: int,
    desc: str, fold: int | None,
) -> None:  # fmt: skip
    """Run a built generator over ``todo`` a batch at a time (neighbours read per batch), appending to ``sink``."""
    try:
        for start in progress(range(0, len(todo), size), desc=desc, unit="batch"):
            rows = [c.to_json() for c in generate([(ex, neighbours.get(ex.id)) for ex in todo[start : start + size]])]
            if fold is not None:
                for row in rows:
                    row["fold"] = fold
            sink.write(rows)
    finally:
        close = getattr(generate, "close", None)
        if close is not None:
            close()
