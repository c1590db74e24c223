"""The synthesize stage: an instruction LLM merges neighbours' captions and candidates into one caption."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from medcap.runs import ResumableJsonl

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline


def synthesize(pipe: Pipeline, name: str, split: str) -> Path:
    """Write ``synthesis/NAME/SPLIT.jsonl`` (resuming a partial file)."""
    from medcap.synthesizer.synthesize import Synthesizer

    cfg = pipe.output_cfg(name)
    out, key = pipe.run.synthesis(name, split), pipe.output_key(name, split)
    if pipe.cached(out, key):
        pipe.record("synthesize", out, False)
        return out
    inputs = pipe.inputs_of(name)
    candidates = {i: pipe.captions(i, split) for i in inputs}
    neighbours = pipe.neighbour_lists(split)
    sink = ResumableJsonl(out, "synthesize", key, inputs=tuple(str(pipe.output_path(i, split)) for i in inputs))
    todo = [
        (ex, neighbours.get(ex.id), {i: candidates[i][ex.id] for i in inputs})
        for ex in pipe.split(split).examples
        if ex.id not in sink.done
    ]
    if todo:
        synthesizer = Synthesizer(cfg)
        size = max(1, cfg.engine.batch_size)
        try:
            for start in tqdm(range(0, len(todo), size), desc=f"synthesize {name}/{split}", unit="batch"):
                sink.write([c.to_json() for c in synthesizer(todo[start : start + size])])
        finally:
            synthesizer.close()
    sink.finish()
    pipe.record("synthesize", out, True)
    return out
