"""What the HTML report shows of a run, read from its run directory (see docs/report.md).

The caption sets come from the run's ``config.yaml`` in pipeline order (generators, then
synthesizers, then fusers) at the paths the run-directory contract gives them, so every set of
the run appears and a set whose file is missing is shown as missing rather than dropped. Without
a readable config the sets are found by globbing those folders, and no set is marked submitted.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medcap.files import read_json, read_jsonl
from medcap.records import Example
from medcap.runs import RunDir

log = logging.getLogger(__name__)

# config list -> (kind shown in the report, run-directory folder of its caption sets)
CAPTION_SET_KINDS = (("generators", "generator", "candidates"), ("synthesizers", "synthesizer", "synthesis"),
                     ("fusers", "fuser", "fused"))  # fmt: skip
CUI_MAPPING = "cui_mapping.csv"  # ROCO/ImageCLEF: CUI,Canonical name


@dataclass
class CaptionSet:
    """The captions one generator, synthesizer or fuser wrote for the split."""

    name: str
    kind: str  # generator | synthesizer | fuser
    path: Path  # relative to the run directory
    exists: bool
    captions: dict[str, str | None] = field(default_factory=dict)
    fallback: set[str] = field(default_factory=set)  # IDs whose caption came from a fallback
    submitted: bool = False


@dataclass
class RunView:
    """What the report shows of one split of a run."""

    name: str
    split: str
    ids: list[str]
    examples: dict[str, Example] = field(default_factory=dict)
    index_examples: dict[str, Example] = field(default_factory=dict)
    neighbours: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    caption_sets: list[CaptionSet] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)  # every scores/*.json of the run
    cui_names: dict[str, str] = field(default_factory=dict)
    encoder: str | None = None
    summary: list[str] = field(default_factory=list)

    @property
    def submitted(self) -> CaptionSet | None:
        return next((cs for cs in self.caption_sets if cs.submitted), None)


def submitted_caption_set(cfg) -> str | None:
    """The caption set the run submits: ``submit.caption_set``, else the last caption set of the run."""
    names = [o.name for o in (*cfg.generators, *cfg.synthesizers, *cfg.fusers)]
    return cfg.submit.caption_set or (names[-1] if names else None)


def read_run(run: RunDir, split: str | None = None) -> RunView:
    """Read one split of a run; without a usable config or data the view has no images or references."""
    cfg = load_run_config(run)
    split = split or default_split(run, cfg)
    view = RunView(name=run.root.name, split=split, ids=[])
    if cfg is not None:
        view.name = cfg.name
        view.encoder = cfg.retrieval.encoder.name
        view.summary = [f"encoder {cfg.retrieval.encoder.name}", f"k={cfg.retrieval.k}"]
        view.examples = _examples(cfg, split)
        view.cui_names = read_cui_names(cui_mapping_path(cfg))
    view.neighbours = {r["id"]: r.get("neighbours", []) for r in read_jsonl(run.neighbours(split))}
    if cfg is not None and view.neighbours:
        view.index_examples = _examples(cfg, cfg.data.index_split)
    view.caption_sets = read_caption_sets(run, split, cfg)
    view.scores = read_scores(run, cfg)
    ids = list(view.examples)
    for source in (view.neighbours, *(cs.captions for cs in view.caption_sets)):
        ids += [i for i in source if i not in view.examples]
    view.ids = list(dict.fromkeys(ids))
    if not view.ids:
        log.warning("report: split %r of %s has no images, neighbours or captions", split, run.root)
    return view


def load_run_config(run: RunDir):
    """The run's resolved config, or None (with a warning) when it is missing or unreadable."""
    from medcap.config import load_config

    if not run.config().exists():
        log.warning("report: %s is missing; the report has no images or references", run.config())
        return None
    try:
        return load_config(run.config())
    except Exception as e:  # a config of another medcap version: still report what the files hold
        log.warning("report: cannot read %s (%s); the report has no images or references", run.config(), e)
        return None


def default_split(run: RunDir, cfg) -> str:
    """The first query split of the config that has artifacts, else the first split that has any."""
    patterns = ("neighbours/*.jsonl", *(f"{folder}/*/*.jsonl" for _, _, folder in CAPTION_SET_KINDS))
    found = sorted({p.stem for pattern in patterns for p in run.root.glob(pattern)})
    preferred = list(cfg.data.query_splits) if cfg is not None else []
    for split in preferred + found:
        if split in found:
            return split
    if preferred:
        return preferred[0]
    raise FileNotFoundError(f"{run.root}: no neighbours or captions to report, and no config.yaml to name a split")


def read_caption_sets(run: RunDir, split: str, cfg) -> list[CaptionSet]:
    """Every caption set of the run for ``split``: the config's, in pipeline order, or those on disk."""
    if cfg is not None:
        submitted = submitted_caption_set(cfg)
        listed = [
            (o.name, kind, Path(folder) / o.name / f"{split}.jsonl")
            for attr, kind, folder in CAPTION_SET_KINDS
            for o in getattr(cfg, attr)
        ]
    else:
        submitted = None
        listed = [
            (p.parent.name, kind, p.relative_to(run.root))
            for _, kind, folder in CAPTION_SET_KINDS
            for p in sorted((run.root / folder).glob(f"*/{split}.jsonl"))
        ]
    sets = []
    for name, kind, rel in listed:
        path = run.root / rel
        cs = CaptionSet(name, kind, rel, path.is_file(), submitted=name == submitted)
        for row in read_jsonl(path):
            cs.captions[row["id"]] = row.get("caption")
            if row.get("fallback") is True:
                cs.fallback.add(row["id"])
        if cs.submitted:  # the submission's fallbacks (eval/stage.py): images no caption set could caption
            side = run.submission(name)
            side = side.with_name(side.stem + ".fallbacks.json")
            for image, fb in (read_json(side) if side.is_file() else {}).items():
                cs.fallback.add(image)
                cs.captions.setdefault(image, fb.get("caption"))
        if not cs.exists:
            log.warning("report: caption set %r has no captions for split %r (%s is missing)", name, split, path)
        sets.append(cs)
    return sets


def read_scores(run: RunDir, cfg=None) -> list[dict[str, Any]]:
    """The run's ``scores/NAME.SPLIT.json`` (unreadable ones skipped with a warning). With the run's config,
    only scores that are current: made for this config, of captions that are still there as scored."""
    current = None
    if cfg is not None:
        try:
            current = _current(run, cfg)
        except Exception as e:  # data moved or unreadable: show the files, say so
            log.warning("report: cannot tell which scores are current (%s); showing every scores file", e)
    scores = []
    for path in sorted((run.root / "scores").glob("*.json")):
        if path.name.endswith(".manifest.json"):
            continue
        try:
            s = read_json(path)
        except (json.JSONDecodeError, OSError) as e:
            log.warning("report: skipping unreadable %s (%s)", path, e)
            continue
        s.setdefault("caption_set", s.get("variant", path.name.split(".")[0]))
        s.setdefault("split", path.name.split(".")[-2] if path.name.count(".") >= 2 else "")
        if current is None or (s["caption_set"], s["split"]) in current:
            scores.append(s)
    return scores


def _current(run: RunDir, cfg) -> set[tuple[str, str]]:
    from copy import deepcopy

    from medcap.eval.stage import current_scores
    from medcap.pipeline import Pipeline

    cfg = deepcopy(cfg)
    cfg.runs_dir, cfg.name = str(run.root.parent), run.root.name
    return {(r["caption_set"], r["split"]) for r in current_scores(Pipeline(cfg))}


def cui_mapping_path(cfg) -> Path:
    """``DATA_ROOT/cui_mapping.csv`` (beside the manifest file when the data root is a file)."""
    root = Path(cfg.data.root)
    return (root if root.is_dir() else root.parent) / CUI_MAPPING


def read_cui_names(path: Path) -> dict[str, str]:
    """CUI -> name from a ``cui_mapping.csv`` (``CUI,Canonical name``; a header row is optional).

    An absent file gives {}; rows without a name are skipped with a warning naming file and line,
    since the report only decorates concept IDs with these names.
    """
    if not path.is_file():
        return {}
    names: dict[str, str] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if line == 1 and row and row[0].strip().lower() == "cui":
                    continue
                if len(row) < 2 or not row[0].strip() or not row[1].strip():
                    if any(c.strip() for c in row):
                        log.warning("report: %s:%d: expected CUI,name; skipped", path, line)
                    continue
                names[row[0].strip()] = row[1].strip()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        log.warning("report: cannot read %s (%s); concepts shown without names", path, e)
        return {}
    return names


def _examples(cfg, split: str) -> dict[str, Example]:
    """The split's examples by ID, or {} (with a warning) when the data cannot be read."""
    from medcap.data import load_split

    data_cfg = replace(cfg.data, verify_images=False, on_error="skip")  # the report only needs paths
    try:
        return {ex.id: ex for ex in load_split(data_cfg, split).examples}
    except Exception as e:  # data moved or deleted since the run: the report still shows the captions
        log.warning("report: cannot read split %r of %s (%s); shown without images", split, cfg.data.root, e)
        return {}
