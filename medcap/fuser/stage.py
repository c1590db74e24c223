"""The fuse stage: training-free fusion (MBR, reranking) and the learned LM-Fuser, with the leakage guard."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from medcap.runs import Manifest, ResumableJsonl, batched

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)


def ensure_inputs(pipe: Pipeline, name: str, split: str) -> None:
    """Make the caption sets ``name`` reads for ``split`` (generating or synthesizing them if needed)."""
    generators = {g.name for g in pipe.cfg.generators}
    pipe.embed(split)
    pipe.retrieve(split)
    for i in pipe.inputs_of(name):
        if i in generators:
            pipe.generate(i, split)
        else:
            ensure_inputs(pipe, i, split)
            pipe.synthesize(i, split)


def train_fuser(pipe: Pipeline, name: str) -> Path | None:
    """Train an ``lm`` fuser on its train split's candidates, after the leakage guard allows it."""
    from medcap.fuser.leakage import check_fuser_inputs
    from medcap.fuser.lm_train import train_fuser as fit
    from medcap.generators.stage import holdout

    cfg = pipe.output_cfg(name)
    if cfg.kind != "lm":
        return None
    out, key = pipe.run.model(name), pipe.fuser_model_key(name)
    if pipe.cached(out, key):
        pipe.record("train", out, False)
        return out
    split = cfg.train_split
    ensure_inputs(pipe, name, split)
    check_fuser_inputs(pipe, name, split)
    examples = pipe.split(split).examples
    if any(ex.caption is None for ex in examples):
        raise ValueError(f"fuser {name}: train_split {split!r} has no reference captions")
    inputs = pipe.inputs_of(name)
    candidates = {i: pipe.captions(i, split) for i in inputs}
    neighbours = pipe.neighbour_lists(split) if cfg.use_neighbours else {}
    train_items, valid_items = holdout([(ex, neighbours.get(ex.id)) for ex in examples], pipe.cfg.seed)

    def rows(items):
        return [({i: candidates[i][ex.id] for i in inputs}, nb, ex.caption) for ex, nb in items]

    Manifest("train", key, complete=False).write(out)
    fit(cfg, rows(train_items), rows(valid_items), out)
    Manifest("train", key, complete=True, count=len(train_items), info={"split": split}).write(out)
    pipe.record("train", out, True)
    return out


def fuse(pipe: Pipeline, name: str, split: str) -> Path | None:
    """Write ``fused/NAME/SPLIT.jsonl``; an ``lm`` fuser does not caption the split it trained on."""
    cfg = pipe.output_cfg(name)
    if cfg.kind == "lm" and split == cfg.train_split:
        log.info("fuser %s: not fusing %s, the split it trained on", name, split)
        return None
    out, key = pipe.run.fused(name, split), pipe.output_key(name, split)
    if pipe.cached(out, key):
        pipe.record("fuse", out, False)
        return out
    inputs = pipe.inputs_of(name)
    candidates = {i: pipe.captions(i, split) for i in inputs}
    sink = ResumableJsonl(out, "fuse", key, inputs=tuple(str(pipe.output_path(i, split)) for i in inputs))
    todo = [
        (ex.id, {i: candidates[i][ex.id] for i in inputs})
        for ex in pipe.split(split).examples
        if ex.id not in sink.done
    ]
    if todo:
        fuse_batch, close = _fuser(pipe, name, split)
        try:
            for batch in batched(todo, 64):
                sink.write([c.to_json() for c in fuse_batch(batch)])
        finally:
            close()
    sink.finish()
    pipe.record("fuse", out, True)
    return out


def _fuser(pipe: Pipeline, name: str, split: str):
    """(fuse a batch of (id, candidates), close) for the fuser's kind."""
    from medcap.fuser.mbr import mbr_fuse, rerank_fuse

    cfg = pipe.output_cfg(name)
    if cfg.kind == "mbr":
        return (lambda batch: mbr_fuse(cfg, batch)), (lambda: None)
    if cfg.kind == "rerank":
        from medcap.retrieval.embed import load_embeddings
        from medcap.retrieval.encoders import load_encoder

        enc = pipe.cfg.retrieval.encoder
        emb = pipe.run.embeddings(enc.name, split)
        pipe.require(emb, pipe.embed_key(split), "medcap embed CONFIG")
        ids, vectors = load_embeddings(emb)
        images = dict(zip(ids, vectors, strict=True))
        encoder = load_encoder(enc)
        return (lambda batch: rerank_fuse(cfg, batch, images, encoder)), (lambda: None)
    from medcap.fuser.lm import LMFuser

    pipe.require(pipe.run.model(name), pipe.fuser_model_key(name), f"medcap train fuser {name}")
    neighbours = pipe.neighbour_lists(split) if cfg.use_neighbours else {}
    model = LMFuser(cfg, pipe.run.model(name))
    return (lambda batch: model([(i, c, neighbours.get(i)) for i, c in batch])), model.close
