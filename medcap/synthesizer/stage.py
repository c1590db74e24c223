"""The synthesize stage: an instruction LLM merges neighbours' captions and caption sets into one caption.

Writes ``synthesis/NAME/SPLIT.jsonl`` a batch at a time (a rerun resumes).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.keys import key_settings
from medcap.logs import progress
from medcap.models.hub import model_identity
from medcap.pipeline import Stage
from medcap.runs import ResumableJsonl

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline


class Synthesize(Stage):
    name = "synthesize"
    command = "medcap synthesize CONFIG"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(s.name, split) for split in pipe.cfg.data.query_splits for s in pipe.cfg.synthesizers]

    def path(self, pipe: Pipeline, name: str, split: str) -> Path:
        return pipe.run.synthesis(name, split)

    def needs(self, pipe: Pipeline, name: str, split: str) -> list[tuple]:
        return [*(pipe.caption_need(i, split) for i in pipe.inputs_of(name)), ("retrieve", split)]

    def settings(self, pipe: Pipeline, name: str, split: str) -> Any:
        from medcap.engines import resolved

        cfg = pipe.cfg_of(name, "synthesize")
        return key_settings(cfg), model_identity(cfg.model), resolved(cfg.engine), pipe.data_key(split)

    def make(self, pipe: Pipeline, out: Path, key: str, name: str, split: str) -> None:
        from medcap.synthesizer.synthesize import Synthesizer

        cfg = pipe.cfg_of(name, "synthesize")
        inputs = pipe.inputs_of(name)
        candidates = {i: pipe.captions(i, split) for i in inputs}
        neighbours = pipe.neighbour_lists(split)
        sink = ResumableJsonl(
            out, "synthesize", key, inputs=tuple(str(pipe.path(*pipe.caption_need(i, split))) for i in inputs)
        )
        todo = [
            (ex, neighbours.get(ex.id), {i: candidates[i][ex.id] for i in inputs})
            for ex in pipe.split(split).examples
            if ex.id not in sink.done
        ]
        if todo:
            synthesizer = Synthesizer(cfg)
            size = max(1, cfg.engine.batch_size)
            try:
                for start in progress(range(0, len(todo), size), desc=f"synthesize {name}/{split}", unit="batch"):
                    sink.write([c.to_json() for c in synthesizer(todo[start : start + size])])
            finally:
                synthesizer.close()
        sink.finish()
