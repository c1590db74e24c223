"""The train-fuser and fuse stages: learned fusers trained behind the leakage guard; every fuser's captions.

``train-fuser`` trains a fuser that learns (the LM-Fuser) on its train split's caption sets into
``models/NAME``, after the leakage guard allows it; a folder made with other settings is removed
first, never resumed. ``fuse`` writes ``fused/NAME/SPLIT.jsonl`` a batch at a time (a rerun resumes);
a fuser never captions the split it trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.files import batched
from medcap.fuser import fuser_kind
from medcap.launch import hand_off, launcher_for
from medcap.models.distributed import world
from medcap.pipeline import Stage
from medcap.runs import Manifest, ResumableJsonl, start_folder

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

BATCH = 64  # images fused and written per batch


class TrainFuser(Stage):
    name = "train-fuser"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(f.name,) for f in pipe.cfg.fusers if fuser_kind(f.kind).trains(f)]

    def path(self, pipe: Pipeline, name: str) -> Path:
        return pipe.run.model(name)

    def needs(self, pipe: Pipeline, name: str) -> list[tuple]:
        cfg = pipe.cfg_of(name, "fuse")
        needs = [pipe.caption_need(i, cfg.train_split) for i in pipe.inputs_of(name)]
        return needs + ([("retrieve", cfg.train_split)] if fuser_kind(cfg.kind).wants_neighbours(cfg) else [])

    def settings(self, pipe: Pipeline, name: str) -> Any:
        cfg = pipe.cfg_of(name, "fuse")
        # the seed draws the validation hold-out; the train split's references are what it learns
        return fuser_kind(cfg.kind).train_settings(cfg), pipe.cfg.seed, pipe.data_key(cfg.train_split)

    def hint(self, pipe: Pipeline, name: str) -> str:
        return f"medcap train fuser {name} -c CONFIG"

    def make(self, pipe: Pipeline, out: Path, key: str, name: str) -> None:
        cfg = pipe.cfg_of(name, "fuse")
        tc = getattr(cfg, "train", None)
        launcher = launcher_for(tc, pipe.launcher)
        if launcher is not None:  # train.processes > 1 or --launcher: in a launcher's processes
            hand_off(pipe, self.name, name, tc, launcher, out, key)
            return
        w = world()  # under a launcher every process trains and rank 0 writes
        if w.is_main:
            start_folder(out, "train", key)
        w.barrier()
        fuser_kind(cfg.kind).train(pipe, cfg, out)
        if w.is_main:
            Manifest("train", key, complete=True, info={"split": cfg.train_split, "processes": w.size}).write(out)
        w.barrier()


class Fuse(Stage):
    name = "fuse"
    command = "medcap fuse CONFIG"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [
            (f.name, split)
            for split in pipe.cfg.data.query_splits
            for f in pipe.cfg.fusers
            if fuser_kind(f.kind).covers(f, split)
        ]

    def path(self, pipe: Pipeline, name: str, split: str) -> Path:
        return pipe.run.fused(name, split)

    def needs(self, pipe: Pipeline, name: str, split: str) -> list[tuple]:
        cfg = pipe.cfg_of(name, "fuse")
        return [pipe.caption_need(i, split) for i in pipe.inputs_of(name)] + fuser_kind(cfg.kind).needs(
            pipe, cfg, split
        )

    def settings(self, pipe: Pipeline, name: str, split: str) -> Any:
        cfg = pipe.cfg_of(name, "fuse")
        return fuser_kind(cfg.kind).settings(pipe, cfg), pipe.data_key(split)

    def make(self, pipe: Pipeline, out: Path, key: str, name: str, split: str) -> None:
        cfg = pipe.cfg_of(name, "fuse")
        kind = fuser_kind(cfg.kind)
        if not kind.covers(cfg, split):
            raise ValueError(f"fuser {name} does not caption {split!r}, the split it trained on")
        inputs = pipe.inputs_of(name)
        candidates = {i: pipe.captions(i, split) for i in inputs}
        neighbours = pipe.neighbour_lists(split) if kind.wants_neighbours(cfg) else {}
        sink = ResumableJsonl(
            out, "fuse", key, inputs=tuple(str(pipe.path(*pipe.caption_need(i, split))) for i in inputs)
        )
        todo = [
            (ex.id, {i: candidates[i][ex.id] for i in inputs}, neighbours.get(ex.id))
            for ex in pipe.split(split).examples
            if ex.id not in sink.done
        ]
        if todo:
            fuse = kind.build(pipe, cfg, split)
            try:
                for batch in batched(todo, BATCH):
                    sink.write([c.to_json() for c in fuse(batch)])
            finally:
                close = getattr(fuse, "close", None)
                if close is not None:
                    close()
        sink.finish()
