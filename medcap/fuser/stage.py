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
from medcap.fuser import candidate_captions, fuser_kind
from medcap.launch import hand_off, launcher_for
from medcap.models.distributed import world
from medcap.models.hub import model_identity
from medcap.pipeline import Stage
from medcap.runs import Manifest, ResumableJsonl, safe_name, start_folder

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

BATCH = 64  # images fused and written per batch


class Pool(Stage):
    """``pool/MODEL/``: the index's hypotheses embedded once for the pool fusers (``fuser/pool.py``)."""

    name = "pool"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        wanted = [
            need[1:]
            for f in pipe.cfg.fusers
            for split in pipe.cfg.data.query_splits
            if fuser_kind(f.kind).covers(f, split)
            for need in fuser_kind(f.kind).needs(pipe, f, split)
            if need[0] == "pool"
        ]
        return list(dict.fromkeys(wanted))

    def path(self, pipe: Pipeline, model: str) -> Path:
        return pipe.run.root / "pool" / safe_name(model)

    def settings(self, pipe: Pipeline, model: str) -> Any:
        from medcap.retrieval.projection import TEXT_MODEL

        # the utility model by content when it is a folder; the caption-space text model; the index's captions
        return model_identity(model), TEXT_MODEL, pipe.data_key(pipe.cfg.data.index_split), "v1"

    def make(self, pipe: Pipeline, out: Path, key: str, model: str) -> None:
        from medcap.eval.metrics import load_bertscorer
        from medcap.fuser.pool import build_pool
        from medcap.retrieval.stages import sentence_model_of

        start_folder(out, "pool", key)
        examples = pipe.split(pipe.cfg.data.index_split).examples
        rows = [(ex.id, ex.caption, str(ex.group or ex.id)) for ex in examples if (ex.caption or "").strip()]
        bert = pipe.resource(("bertscorer", model), lambda: load_bertscorer(model, batch_size=64, device="cpu"))
        build_pool(out, key, rows, bert, sentence_model_of(pipe))


class TrainFuser(Stage):
    name = "train-fuser"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(f.name,) for f in pipe.cfg.fusers if fuser_kind(f.kind).trains(f)]

    def path(self, pipe: Pipeline, name: str) -> Path:
        return pipe.run.model(name)

    def needs(self, pipe: Pipeline, name: str) -> list[tuple]:
        cfg = pipe.cfg_of(name, "fuse")
        kind = fuser_kind(cfg.kind)
        split = kind.train_split(pipe, cfg)
        return list(
            dict.fromkeys([*(pipe.caption_need(i, split) for i in pipe.inputs_of(name)), *kind.train_needs(pipe, cfg)])
        )

    def settings(self, pipe: Pipeline, name: str) -> Any:
        cfg = pipe.cfg_of(name, "fuse")
        kind = fuser_kind(cfg.kind)
        # the seed draws the validation hold-out; the train split's references are what it learns
        return kind.train_settings(cfg), pipe.cfg.seed, pipe.data_key(kind.train_split(pipe, cfg))

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
        kind = fuser_kind(cfg.kind)
        kind.train(pipe, cfg, out)
        if w.is_main:
            info = {"split": kind.train_split(pipe, cfg), "processes": w.size}
            Manifest("train", key, complete=True, info=info).write(out)
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
        candidates = candidate_captions(pipe, inputs, split, getattr(cfg, "alternatives", 0))
        neighbours = pipe.neighbour_lists(split) if kind.wants_neighbours(cfg) else {}
        sink = ResumableJsonl(
            out, "fuse", key, inputs=tuple(str(pipe.path(*pipe.caption_need(i, split))) for i in inputs)
        )
        todo = [ex.id for ex in pipe.split(split).examples if ex.id not in sink.done]
        if todo:
            fuse = kind.build(pipe, cfg, split)
            try:
                for batch in batched(todo, BATCH):  # neighbours read a batch at a time: never all in memory
                    sink.write([c.to_json() for c in fuse([(i, candidates[i], neighbours.get(i)) for i in batch])])
            finally:
                close = getattr(fuse, "close", None)
                if close is not None:
                    close()
        sink.finish()
