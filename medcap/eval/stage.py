"""The evaluate and submit stages: suites with intervals and per-image Parquet; validated submission files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from medcap.config import config_hash
from medcap.runs import Manifest, write_json

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)


def evaluate(pipe: Pipeline, name: str, split: str) -> Path | None:
    """Score a caption set with the eval suite: corpus means, 95% intervals, per-image Parquet."""
    from medcap.eval.suites import run_suite, save_per_image

    examples = {ex.id: ex for ex in pipe.split(split).examples}
    refs = {i: ex.caption for i, ex in examples.items()}
    if any(c is None for c in refs.values()):
        log.info("evaluate: split %s has no reference captions; not scored", split)
        return None
    out = pipe.run.scores(name, split)
    e = pipe.cfg.eval
    key = config_hash("evaluate", e, pipe.output_key(name, split), pipe.data_key(split))
    if pipe.cached(out, key):
        pipe.record("evaluate", out, False)
        return out
    settings = (
        "metrics",
        "bootstrap",
        "bertscore_measure",
        "clip_encoder",
        "bleurt_checkpoint",
        "clinicalbleurt_checkpoint",
        "medbertscore_model",
        "medbertscore_num_layers",
    )
    overrides = {k: getattr(e, k) for k in settings} | {"seed": pipe.cfg.seed}
    result = run_suite(e.suite, refs, pipe.captions(name, split), examples=examples, eval_cfg=e, overrides=overrides)
    save_per_image(result, out.with_suffix(".parquet"))
    per_image = {i: {m: float(v) for m, v in row.items()} for i, row in result.per_image.iterrows()}
    write_json(
        out,
        {
            "variant": name,
            "split": split,
            "suite": e.suite,
            "n": result.n,
            "metrics": result.metrics,
            "ci": {m: list(v) for m, v in result.ci.items()},
            "skipped": result.skipped,
            "per_image": per_image,
        },
    )
    Manifest("evaluate", key, complete=True, count=result.n).write(out)
    pipe.record("evaluate", out, True)
    return out


def submit(pipe: Pipeline, generator: str, split: str, year: int | None = None, out: Path | None = None) -> Path:
    from medcap.eval.submission import validate_submission, write_submission
    from medcap.problems import InputError

    year = year or pipe.cfg.submit.year
    out = out or pipe.run.submission(generator)
    key = config_hash("submit", year, split, pipe.output_key(generator, split))
    if pipe.cached(out, key):
        pipe.record("submit", out, False)
        return Path(Manifest.read(out).info.get("upload", out))
    order = [ex.id for ex in pipe.split(split).examples]
    written = write_submission(pipe.captions(generator, split), out, year, order=order)
    problems = validate_submission(written, order, year)
    if problems:
        raise InputError(problems, f"{written}: the submission written fails the {year} rules")
    info = {"year": year, "split": split, "upload": str(written)}
    Manifest("submit", key, complete=True, count=len(order), info=info).write(out)
    pipe.record("submit", out, True)
    return written
