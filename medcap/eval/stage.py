"""The evaluate and submit stages: suites with intervals and per-image Parquet; validated submission files.

Scores are artifacts like any other: ``scores/NAME.SPLIT.json`` is keyed on the scored caption set's
key, the eval settings and the split's references, so a caption set that is missing or changed is
never reported with an old score (:func:`current_scores` reads only fresh ones).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.files import read_json, write_json
from medcap.keys import key_settings
from medcap.pipeline import Stage
from medcap.runs import Manifest, is_fresh

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

SUITE_SETTINGS = (
    "metrics",
    "bootstrap",
    "bertscore_measure",
    "clip_encoder",
    "bleurt_checkpoint",
    "clinicalbleurt_checkpoint",
    "medbertscore_model",
    "medbertscore_num_layers",
)


def has_references(pipe: Pipeline, split: str) -> bool:
    return all(ex.caption is not None for ex in pipe.split(split).examples)


def produced(pipe: Pipeline, name: str, split: str) -> bool:
    """False for a caption set that never captions ``split`` (an LM-Fuser's training split)."""
    from medcap.fuser import fuser_kind

    cs = pipe.caption_set(name)
    return cs.stage != "fuse" or fuser_kind(cs.cfg.kind).covers(cs.cfg, split)


class Evaluate(Stage):
    name = "evaluate"
    command = "medcap evaluate RUN"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [
            (name, split)
            for split in pipe.cfg.data.query_splits
            if has_references(pipe, split)
            for name in pipe.caption_sets
            if produced(pipe, name, split)
        ]

    def path(self, pipe: Pipeline, name: str, split: str) -> Path:
        return pipe.run.scores(name, split)

    def needs(self, pipe: Pipeline, name: str, split: str) -> list[tuple]:
        return [pipe.caption_need(name, split)]

    def settings(self, pipe: Pipeline, name: str, split: str) -> Any:
        return key_settings(pipe.cfg.eval), pipe.cfg.seed, pipe.data_key(split)

    def make(self, pipe: Pipeline, out: Path, key: str, name: str, split: str) -> None:
        from medcap.eval.suites import run_suite, save_per_image

        e = pipe.cfg.eval
        examples = {ex.id: ex for ex in pipe.split(split).examples}
        refs = {i: ex.caption for i, ex in examples.items()}
        if any(c is None for c in refs.values()):
            raise ValueError(f"split {split!r} has no reference captions to score")
        overrides = {k: getattr(e, k) for k in SUITE_SETTINGS} | {"seed": pipe.cfg.seed}
        result = run_suite(
            e.suite, refs, pipe.captions(name, split), examples=examples, eval_cfg=e, overrides=overrides
        )
        save_per_image(result, out.with_suffix(".parquet"))
        per_image = {i: {m: float(v) for m, v in row.items()} for i, row in result.per_image.iterrows()}
        write_json(
            out,
            {
                "caption_set": name,
                "split": split,
                "suite": e.suite,
                "n": result.n,
                "metrics": result.metrics,
                "ci": {m: list(v) for m, v in result.ci.items()},
                "skipped": result.skipped,
                "not_comparable": result.not_comparable,
                "settings": result.settings,
                "per_image": per_image,
            },
        )
        Manifest("evaluate", key, complete=True, count=result.n).write(out)


def current_scores(pipe: Pipeline, splits: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per caption set and split whose scores are fresh for this config and whose captions are
    still there as scored (never a stale file, never the score of captions that were deleted)."""
    rows = []
    for split in splits or pipe.cfg.data.query_splits:
        for name in pipe.caption_sets:
            out = pipe.run.scores(name, split)
            if (
                out.is_file()
                and produced(pipe, name, split)
                and is_fresh(out, pipe.key("evaluate", name, split))
                and pipe.fresh(*pipe.caption_need(name, split))
            ):
                s = read_json(out)
                rows.append({"caption_set": name, "split": split, "n": s.get("n"), **s.get("metrics", {})})
    return rows


def evaluate_run(pipe: Pipeline, names: list[str], splits: list[str]) -> list[str]:
    """Score the caption sets whose captions are fresh; returns why each other one was skipped."""
    skipped = []
    for split in splits:
        if not has_references(pipe, split):
            skipped.append(f"{split}: no reference captions")
            continue
        for name in names:
            if not produced(pipe, name, split):
                skipped.append(f"{name}/{split}: {name} does not caption the split it trained on")
                continue
            need = pipe.caption_need(name, split)
            path = pipe.path(*need)
            if not path.exists():
                skipped.append(f"{name}/{split}: no captions ({path} is missing)")
            elif not pipe.fresh(*need):
                skipped.append(f"{name}/{split}: {path} is unfinished or was made with other settings")
            else:
                pipe.make("evaluate", name, split)
    return skipped


class Submit(Stage):
    name = "submit"
    command = "medcap submit RUN"

    def targets(self, pipe: Pipeline) -> list[tuple]:
        return [(pipe.submitted, pipe.submit_split)]

    def path(self, pipe: Pipeline, name: str, split: str) -> Path:
        return pipe.run.submission(name)

    def needs(self, pipe: Pipeline, name: str, split: str) -> list[tuple]:
        return [pipe.caption_need(name, split)]

    def settings(self, pipe: Pipeline, name: str, split: str) -> Any:
        # every ID the split's files name (skipped rows too), and the seed of the fallback caption
        return pipe.cfg.submit.year, split, pipe.data_key(split), pipe.split(split).ids, pipe.cfg.seed

    def make(self, pipe: Pipeline, out: Path, key: str, name: str, split: str) -> None:
        written, fallbacks = write_checked_submission(pipe, name, split, pipe.cfg.submit.year, out)
        info = {"year": pipe.cfg.submit.year, "split": split, "upload": str(written), "fallbacks": fallbacks}
        Manifest("submit", key, complete=True, count=len(pipe.split(split).ids), info=info).write(out)


def write_checked_submission(pipe: Pipeline, name: str, split: str, year: int, out: Path) -> tuple[Path, dict]:
    """Write ``name``'s captions for every ID of ``split`` and validate the file with ``year``'s rules.

    The file always covers the whole split as its files name it: an image that was skipped (unreadable)
    or has no caption gets a fallback (see :func:`fallback_captions`), listed in the returned
    ``{id: how}`` and in ``SUBMISSION.fallbacks.json``. Returns (file written, fallbacks).
    """
    from medcap.data.problems import InputError
    from medcap.eval.submission import validate_submission, write_submission

    order = pipe.split(split).ids
    captions = pipe.captions(name, split)
    missing = [i for i in order if not (captions.get(i) or "").strip()]
    fallbacks = fallback_captions(pipe, split, missing) if missing else {}
    captions = {**captions, **{i: caption for i, (caption, _) in fallbacks.items()}}
    written = write_submission(captions, out, year, order=order)
    problems = validate_submission(written, order, year)
    if problems:
        raise InputError(problems, f"{written}: the submission written fails the {year} rules")
    side = out.with_name(out.stem + ".fallbacks.json")
    if fallbacks:
        write_json(side, {i: {"caption": c, "from": how} for i, (c, how) in fallbacks.items()})
        log.warning("%s: %d of %d image(s) captioned by a fallback; see %s", written, len(fallbacks), len(order), side)
    else:
        side.unlink(missing_ok=True)
    return written, {i: how for i, (_, how) in fallbacks.items()}


def fallback_captions(pipe: Pipeline, split: str, ids: list[str]) -> dict[str, tuple[str, str]]:
    """A caption for each of ``ids``: its nearest neighbour's when it was retrieved, else the index split's
    constant caption (the training caption most similar to a sample of the others). ``{id: (caption, how)}``."""
    from medcap.files import read_jsonl
    from medcap.models.similarity import constant_caption, get_similarity
    from medcap.records import NeighbourList

    neighbours: dict[str, NeighbourList] = {}
    if pipe.fresh("retrieve", split):
        rows = read_jsonl(pipe.path("retrieve", split))
        neighbours = {r["id"]: NeighbourList.from_json(r) for r in rows}
    out: dict[str, tuple[str, str]] = {}
    constant = None
    for i in ids:
        hit = next((n for n in neighbours[i].neighbours if n.caption), None) if i in neighbours else None
        if hit is not None:
            out[i] = (hit.caption, f"nearest neighbour {hit.id}")
            continue
        if constant is None:
            index = [ex.caption for ex in pipe.split(pipe.cfg.data.index_split).examples if ex.caption]
            constant = constant_caption(index, get_similarity("rouge1"), seed=pipe.cfg.seed)
        out[i] = (constant, "constant caption of the index split (no image to retrieve with)")
    return out
