"""Preflight: everything a run will need, checked in seconds before its first embedding.

``preflight(pipe, stages)`` lists every problem at once: a model, adapter, tokenizer or metric
model that cannot be found (hub cache or folder), a split that does not load, a test ID that
cannot go into a submission, a fuser the leakage guard will refuse, an engine that is not
installed, too little free disk for the planned artifacts. ``medcap run`` stops on problems;
``medcap run --dry-run`` and ``medcap env CONFIG`` show them. Metric models that are missing are
warnings: the suite skips those metrics and says why.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from medcap.data.problems import InputError
from medcap.models.hub import ModelNotFoundError, hub_offline

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

# Rough sizes of what a run writes, for the free-disk check (generous upper ends).
BYTES_PER_EMBEDDING = 2 * 1024  # float16 rows of up to 1,024 dimensions
BYTES_PER_CAPTION_ROW = 2048  # a JSONL row of a caption set or a neighbour list (k captions)
BYTES_PER_TRAINED_MODEL = 600 << 20  # an LM-Fuser's full fine-tune of a small LM; adapters are far smaller
MIN_FREE = 256 << 20


class PreflightError(RuntimeError):
    """What a run would fail on, every problem at once."""


@dataclass
class Check:
    what: str  # the setting or item checked
    ok: bool
    detail: str
    fatal: bool = True  # False: a warning (e.g. a metric the suite will skip)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, what: str, ok: bool, detail: str, fatal: bool = True) -> None:
        self.checks.append(Check(what, ok, detail, fatal))

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.fatal]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and not c.fatal]

    def raise_if_failed(self) -> None:
        if self.problems:
            lines = "\n".join(f"  {c.what}: {c.detail}" for c in self.problems)
            raise PreflightError(f"preflight found {len(self.problems)} problem(s); nothing was run:\n{lines}")

    def echo(self, warnings_only: bool = False) -> None:
        for c in self.checks:
            if c.ok and warnings_only:
                continue
            mark = "ok  " if c.ok else ("FAIL" if c.fatal else "warn")
            click.echo(f"  {mark} {c.what}: {c.detail}", err=warnings_only)


def preflight(pipe: Pipeline, stages: list[str]) -> Report:
    """Check what running ``stages`` of ``pipe`` will need; see the module docstring."""
    report = Report()
    check_data(pipe, report)
    check_models(pipe, stages, report)
    if "evaluate" in stages:
        check_metrics(pipe, report)
    if "submit" in stages:
        check_submission_ids(pipe, report)
    check_leakage(pipe, stages, report)
    check_disk(pipe, report)
    return report


# --------------------------------------------------------------------------- data


def _splits(pipe: Pipeline) -> list[str]:
    from medcap.fuser import fuser_kind

    trained_on = [fuser_kind(f.kind).train_split(pipe, f) for f in pipe.cfg.fusers if fuser_kind(f.kind).trains(f)]
    return list(dict.fromkeys([*pipe.splits, *trained_on]))


def check_data(pipe: Pipeline, report: Report) -> None:
    for split in _splits(pipe):
        try:
            n = len(pipe.split(split).examples)
        except (InputError, FileNotFoundError, ValueError) as e:
            report.add(f"data split {split!r}", False, str(e).replace("\n", "\n    "))
            continue
        report.add(f"data split {split!r}", n > 0, f"{n} images" if n else "no usable images")
    from medcap.data import unreferenced_images

    for warning in unreferenced_images(pipe.cfg.data, _splits(pipe)):
        report.add("data", False, warning, fatal=False)


# --------------------------------------------------------------------------- models


def lm_location(name: str) -> str:
    """Where a causal LM named in a config comes from; ModelNotFoundError if nowhere."""
    from medcap.models.lms import GGUF_LMS, package_file

    if name == "scratch":
        return "built from the training captions"
    if name in GGUF_LMS:
        spec = GGUF_LMS[name]
        file = package_file(spec)  # raises ModelNotFoundError with the pip command
        if importlib.util.find_spec("gguf") is None:
            raise ModelNotFoundError(f"{name}: reading {file.name} needs the gguf package: pip install gguf")
        return f"packaged GGUF {file}"
    return hub_or_folder(name)


def hub_or_folder(name: str, marker: str = "config.json") -> str:
    """A local model folder, or a hub id found in the cache (or downloadable when online)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / marker).is_file():
            raise ModelNotFoundError(f"{path} has no {marker}: not a saved model folder")
        return f"folder {path}"
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model folder {name!r} does not exist")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, marker), str):
        return f"hub cache ({name})"
    if hub_offline():
        raise ModelNotFoundError(
            f"{name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it on a connected "
            f"machine (`huggingface-cli download {name}`) and copy the cache here, or give a local folder"
        )
    return f"not cached: {name} is downloaded from the hub on first use"


def _check(report: Report, what: str, find, fatal: bool = True) -> None:
    try:
        report.add(what, True, find())
    except (ModelNotFoundError, FileNotFoundError, ValueError, ImportError) as e:
        report.add(what, False, str(e), fatal)


def _engine(report: Report, what: str, kind: str) -> None:
    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        report.add(what, False, "engine kind vllm, but vLLM is not installed: pip install 'medcap[vllm]'")


def check_models(pipe: Pipeline, stages: list[str], report: Report) -> None:
    from medcap.eval.metrics import resolve_bertscore_model
    from medcap.fuser import fuser_kind
    from medcap.generators import MLLM_KINDS
    from medcap.models.families import get_family
    from medcap.retrieval.encoders import locate_encoder

    cfg = pipe.cfg
    _check(report, "retrieval.encoder", lambda: locate_encoder(cfg.retrieval.encoder))
    for g in cfg.generators:
        where = f"generators.{g.name}"
        if g.kind in MLLM_KINDS:
            _check(report, f"{where}.model", lambda g=g: hub_or_folder(g.model or get_family(g.kind).default_model))
            if g.adapter:
                _check(report, f"{where}.adapter", lambda g=g: hub_or_folder(g.adapter, "adapter_config.json"))
            _engine(report, f"{where}.engine", g.engine.kind)
        elif g.kind == "prefix":
            _check(report, f"{where}.prefix.lm", lambda g=g: lm_location(g.prefix.lm))
    for s in cfg.synthesizers:
        if s.multimodal and s.family:
            _check(report, f"synthesizers.{s.name}.model", lambda s=s: hub_or_folder(s.model))
        else:
            _check(report, f"synthesizers.{s.name}.model", lambda s=s: lm_location(s.model))
        _engine(report, f"synthesizers.{s.name}.engine", s.engine.kind)
    for f in cfg.fusers:
        _check(report, f"fusers.{f.name}.kind", lambda f=f: fuser_kind(f.kind) and f.kind)
        if getattr(f, "utility_model", None):  # pool-mbr and the ranker score with a BERTScore model
            _check(
                report, f"fusers.{f.name}.utility_model", lambda f=f: resolve_bertscore_model(f.utility_model, None)[0]
            )
            if f.image_text and cfg.retrieval.index.space != "caption":
                report.add(
                    f"fusers.{f.name}.image_text", False, "needs retrieval.index.space: caption (or image_text: 0)"
                )
        if f.kind == "lm":
            _check(report, f"fusers.{f.name}.model", lambda f=f: lm_location(f.model))
            _engine(report, f"fusers.{f.name}.engine", f.engine.kind)
        if f.kind == "rerank":
            report.add(f"fusers.{f.name}", True, "reranks with the retrieval encoder")


def metrics_to_run(pipe: Pipeline) -> list[str]:
    from medcap.eval.suites import SUITES

    e = pipe.cfg.eval
    suite = SUITES[e.suite].metrics
    return [m for m in suite if e.metrics is None or m in e.metrics]


def check_metrics(pipe: Pipeline, report: Report) -> None:
    """Metric models: a missing one is a warning (the suite skips the metric and says why)."""
    from medcap.eval.metrics import resolve_bertscore_model
    from medcap.retrieval.encoders import locate_encoder

    e = pipe.cfg.eval
    for metric in metrics_to_run(pipe):
        what = f"metric {metric}"
        if metric == "bertscore":
            _check(
                report, what, lambda: str(resolve_bertscore_model(e.bertscore_model, e.bertscore_num_layers)[0]), False
            )
        elif metric in ("clipscore", "refclipscore", "similarity"):
            _check(report, what, lambda: locate_encoder(e.clip_encoder), False)
        elif metric == "bleurt":
            _check(report, what, lambda: hub_or_folder(e.bleurt_checkpoint), False)
        elif metric == "meteor":
            java = shutil.which("java")
            report.add(what, java is not None, f"java at {java}" if java else "needs Java on PATH (skipped)", False)
        else:
            report.add(what, True, "no model needed")


# --------------------------------------------------------------------------- submission, leakage, disk


def id_problems(ids: list[str]) -> list[str]:
    """Why some IDs cannot go into a submission CSV of any year (each problem once, with an example)."""
    rules = (
        ("empty ID", lambda i: not i.strip()),
        ("whitespace around the ID", lambda i: i != i.strip()),
        ("a comma in the ID (it would split the row)", lambda i: "," in i),
        ("a quote or line break in the ID", lambda i: any(c in i for c in '"\r\n')),
    )
    out = []
    for label, bad in rules:
        hits = [i for i in ids if bad(i)]
        if hits:
            out.append(f"{len(hits)} ID(s) with {label}, e.g. {hits[0]!r}")
    return out


def check_submission_ids(pipe: Pipeline, report: Report) -> None:
    split = pipe.submit_split
    try:
        ids = [ex.id for ex in pipe.split(split).examples]
    except (InputError, FileNotFoundError, ValueError):
        return  # reported by check_data
    problems = id_problems(ids)
    detail = "; ".join(problems) or f"{len(ids)} IDs fit the {pipe.cfg.submit.year} rules"
    report.add(f"submission IDs ({split})", not problems, detail)


def check_leakage(pipe: Pipeline, stages: list[str], report: Report) -> None:
    """The leakage guard's verdict, known from the config before anything is trained."""
    from medcap.fuser import fuser_kind
    from medcap.fuser.leakage import learned_generators

    index_split = pipe.cfg.data.index_split
    for f in pipe.cfg.fusers:
        kind = fuser_kind(f.kind)
        if not kind.trains(f) or not {"train-fuser", "fuse"} & set(stages):
            continue
        train_split = kind.train_split(pipe, f)
        for name in learned_generators(pipe, f.name):
            g = pipe.generator_cfg(name)
            if g.adapter:
                ids = [Path(g.adapter) / "train_ids.json", Path(g.adapter).parent / "train_ids.json"]
                ok = any(p.is_file() for p in ids)
                detail = "lists its training IDs" if ok else f"{g.adapter} lists no training IDs (train_ids.json)"
                report.add(f"leakage fusers.{f.name} <- {name}", ok, detail)
            elif train_split == index_split and g.folds < 2:
                report.add(
                    f"leakage fusers.{f.name} <- {name}",
                    False,
                    f"generator {name!r} trains on {index_split!r}, the split fuser {f.name!r} would learn from. "
                    f"Cross-fit it (`medcap train generator {name} -c CONFIG --folds 5`, then "
                    f"--set generators.{name}.folds=5 on every command, or folds: 5 in CONFIG) "
                    f"or set fusers.{f.name}.train_split to a split it does not train on",
                )


def check_disk(pipe: Pipeline, report: Report) -> None:
    cfg = pipe.cfg
    try:
        images = sum(len(pipe.split(s).examples) for s in _splits(pipe))
    except (InputError, FileNotFoundError, ValueError):
        return
    caption_sets = len(cfg.generators) + len(cfg.synthesizers) + len(cfg.fusers)
    from medcap.fuser import fuser_kind
    from medcap.generators import needs_training

    trained = sum(1 for g in cfg.generators if needs_training(g))
    trained = trained * (1 + max(0, max((getattr(g, "folds", 0) for g in cfg.generators), default=0)))
    trained += sum(1 for f in cfg.fusers if fuser_kind(f.kind).trains(f))
    need = (
        images * (BYTES_PER_EMBEDDING + BYTES_PER_CAPTION_ROW * (2 + caption_sets)) + trained * BYTES_PER_TRAINED_MODEL
    )
    need = max(need, MIN_FREE)
    root = Path(cfg.runs_dir).resolve()
    while not root.exists():
        root = root.parent
    free = shutil.disk_usage(root).free
    detail = f"{free / 2**30:.1f} GiB free at {root}, the run needs up to ~{need / 2**30:.2f} GiB"
    report.add("free disk", free >= need, detail)
