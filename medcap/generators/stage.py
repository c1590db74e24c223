"""The generate stage: training a generator's model, cross-fitting, and writing candidates.

Cross-fitting (``folds: K``) gives every index-split image an honest candidate: the index split is
cut into K folds by case, model ``i`` trains on the other K-1 folds and writes the candidates of
fold ``i``. Other splits are captioned by the model trained on the whole index split. The rows of
a cross-fitted file carry their fold, and each fold model lists the IDs it trained on, so the
fuser's leakage guard can check the claim from the files.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from medcap.config import config_hash
from medcap.generators import GeneratorInputs, Item, build_generator, needs_training, train_model
from medcap.runs import Manifest, ResumableJsonl, write_json

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

TRAIN_IDS = "train_ids.json"  # beside every trained model: the image IDs it learned from


def holdout(items: list[Item], seed: int, frac: float = 0.1) -> tuple[list[Item], list[Item]]:
    """Split items into train and a small validation part, by case so that no case is in both."""
    n_groups = len({ex.group or ex.id for ex, _ in items})
    if n_groups < 2:
        return items, []
    folds = group_folds(items, min(n_groups, max(2, round(1 / frac))), seed)
    held = set(folds[0])
    return [it for it in items if it[0].id not in held], [it for it in items if it[0].id in held]


def group_folds(items: list[Item], k: int, seed: int) -> list[list[str]]:
    """K lists of image IDs, cut by case (``Example.group``, else the image itself), seeded."""
    groups = sorted({ex.group or ex.id for ex, _ in items})
    if len(groups) < k:
        raise ValueError(f"cannot cut {len(groups)} case(s) into {k} folds")
    random.Random(seed).shuffle(groups)
    fold_of = {g: i % k for i, g in enumerate(groups)}
    folds: list[list[str]] = [[] for _ in range(k)]
    for ex, _ in items:
        folds[fold_of[ex.group or ex.id]].append(ex.id)
    return folds


def fit(pipe: Pipeline, name: str, items: list[Item], out: Path, key: str) -> Path:
    """Train ``name``'s model on ``items`` (10% of cases held out for validation) into ``out``, cached by key."""
    if pipe.cached(out, key):
        pipe.record("train", out, False)
        return out
    old = Manifest.read(out)
    if old is not None and old.key != key and out.exists():
        log.info("%s: trained with other settings; training afresh", out)
        shutil.rmtree(out)
    Manifest("train", key, complete=False).write(out)  # checkpoints under `out` resume with this key
    gcfg, index_split = pipe.generator_cfg(name), pipe.cfg.data.index_split
    embeddings = None
    if gcfg.kind == "prefix":
        embeddings = pipe.run.embeddings(pipe.cfg.retrieval.encoder.name, index_split)
        pipe.require(embeddings, pipe.embed_key(index_split), "medcap embed CONFIG")
    train_items, valid_items = holdout(items, pipe.cfg.seed)
    train_model(gcfg, out, train_items, valid_items, embeddings=embeddings)
    write_json(out / TRAIN_IDS, sorted(ex.id for ex, _ in train_items + valid_items))
    Manifest("train", key, complete=True, count=len(train_items), info={"valid": len(valid_items)}).write(out)
    pipe.record("train", out, True)
    return out


def index_items(pipe: Pipeline, name: str) -> list[Item]:
    """The index split's items, with their neighbours when the generator's prompt shows them."""
    index_split = pipe.cfg.data.index_split
    neighbours = {}
    if pipe.generator_cfg(name).mode == "few-shot":
        pipe.retrieve(index_split)
        neighbours = pipe.neighbour_lists(index_split)
    return [(ex, neighbours.get(ex.id)) for ex in pipe.split(index_split).examples]


def train(pipe: Pipeline, name: str) -> Path | None:
    """Train the generator's model on the whole index split, if it needs one."""
    if not needs_training(pipe.generator_cfg(name)):
        return None
    return fit(pipe, name, index_items(pipe, name), pipe.run.model(name), pipe.model_key(name))


def fold_models(pipe: Pipeline, name: str) -> list[tuple[Path, list[str]]]:
    """Train the K cross-fitting models of ``name``: (model folder, IDs of the fold it captions)."""
    gcfg = pipe.generator_cfg(name)
    items = index_items(pipe, name)
    folds = group_folds(items, gcfg.folds, pipe.cfg.seed)
    models = []
    for i, fold in enumerate(folds):
        held = set(fold)
        out = pipe.run.model(name) / f"fold-{i}"
        key = config_hash("fold", pipe.model_key(name), gcfg.folds, i)
        fit(pipe, name, [it for it in items if it[0].id not in held], out, key)
        models.append((out, fold))
    return models


def generate(pipe: Pipeline, name: str, split: str) -> Path:
    """Write ``candidates/NAME/SPLIT.jsonl`` (resuming a partial file), cross-fitted on the index split."""
    gcfg = pipe.generator_cfg(name)
    out, key = pipe.run.candidates(name, split), pipe.candidates_key(name, split)
    if pipe.cached(out, key):
        pipe.record("generate", out, False)
        return out
    neighbours = pipe.neighbour_lists(split)
    crossfit = needs_training(gcfg) and gcfg.folds >= 2 and split == pipe.cfg.data.index_split
    if crossfit:
        plan = fold_models(pipe, name)
    else:
        if needs_training(gcfg):
            pipe.require(pipe.run.model(name), pipe.model_key(name), f"medcap train generator {name}")
        plan = [(pipe.run.model(name), None)]
    enc = pipe.cfg.retrieval.encoder.name
    index_examples = {ex.id: ex for ex in pipe.split(pipe.cfg.data.index_split).examples}
    sink = ResumableJsonl(out, "generate", key, inputs=(str(pipe.run.neighbours(split)),))
    for fold, (model_dir, ids) in enumerate(plan):
        wanted = set(ids) if ids is not None else None
        todo = [
            (ex, neighbours.get(ex.id))
            for ex in pipe.split(split).examples
            if ex.id not in sink.done and (wanted is None or ex.id in wanted)
        ]
        if not todo:
            continue
        inputs = GeneratorInputs(
            model_dir=model_dir,
            embeddings=pipe.run.embeddings(enc, split) if gcfg.kind == "prefix" else None,
            index_examples=index_examples,
        )
        write_batches(
            build_generator(gcfg, inputs), todo, sink, gcfg, f"generate {name}/{split}", fold if crossfit else None
        )
    sink.finish(info={"folds": gcfg.folds} if crossfit else None)
    pipe.record("generate", out, True)
    return out


def write_batches(generate, todo: list[Item], sink: ResumableJsonl, gcfg, desc: str, fold: int | None) -> None:
    """Run a built generator over ``todo`` a batch at a time, appending each batch to ``sink``."""
    size = 256 if gcfg.kind in ("nearest", "consensus") else max(1, gcfg.engine.batch_size)
    try:
        for start in tqdm(range(0, len(todo), size), desc=desc, unit="batch", disable=len(todo) <= size):
            rows = [c.to_json() for c in generate(todo[start : start + size])]
            if fold is not None:
                for row in rows:
                    row["fold"] = fold
            sink.write(rows)
    finally:
        close = getattr(generate, "close", None)
        if close is not None:
            close()
