"""The ImageCLEFmedical Caption metric suites of 2023, 2024 and 2025, with per-image scores and intervals.

``run_suite(name, refs, hyps, ...)`` scores every metric of a suite, keeps per-image values in a
DataFrame (saved as Parquet by :func:`save_per_image`), adds a percentile-bootstrap interval of
each mean and the year's primary/secondary means. A metric whose model, package or input is
missing lands in ``skipped`` with the reason, never as a number; a mean with a skipped part is
skipped too.

Suite choices (from the organisers' evaluators, see ``docs`` / IMAGECLEF.md):

- ``imageclef2023``: BERTScore F1 (no idf) and ROUGE-1.
- ``imageclef2024`` (no public evaluator; the metric set of the papers): BERTScore, ROUGE-1,
  ROUGE-L, BLEU-1, BLEU-4, METEOR, CIDEr, BLEURT, CLIPScore, RefCLIPScore, ClinicalBLEURT,
  MedBERTScore. BLEU and METEOR are reported as per-image means (organisers' habit), not corpus.
- ``imageclef2025``: BERTScore F1 with idf over the references (the 2026 code's form; one 2025
  evaluator version took recall: ``bertscore_measure="recall"``), ROUGE-1, BLEURT, similarity
  (CLIPScore), AlignScore, MedCAT; primary = mean(BERTScore, ROUGE-1, similarity), secondary =
  mean(MedCAT, AlignScore). AlignScore and MedCAT are not implemented: always skipped.

The BERTScore model, layer, batch size and device come from ``EvalConfig``; its ``bertscore_idf``
is overridden by the suite.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import EncoderConfig, EvalConfig
from medcap.eval import metrics as base
from medcap.eval import text_metrics as tm
from medcap.eval.stats import bootstrap_ci
from medcap.models.hub import ModelNotFoundError
from medcap.records import Example

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

Score = tuple[float, dict[str, float]]


class MetricSkipped(Exception):
    """A metric cannot run with what is configured or given (the message says why)."""


@dataclass
class SuiteConfig:
    """Settings of a suite run beyond ``EvalConfig`` (candidates for new ``EvalConfig`` fields)."""

    metrics: list[str] | None = None  # run only these metrics of the suite (None: all)
    bootstrap: int = 1000  # bootstrap resamples for the intervals (0: no intervals)
    alpha: float = 0.05  # intervals at level 1 - alpha
    seed: int = 0
    bertscore_measure: str | None = None  # f1 | recall | precision; None: the suite's
    clip_encoder: EncoderConfig = field(default_factory=EncoderConfig)  # CLIPScore/similarity encoder (BiomedCLIP)
    bleurt_checkpoint: str = tm.BLEURT_DEFAULT  # hub id or local folder
    clinicalbleurt_checkpoint: str | None = None  # a ClinicalBLEURT checkpoint (none is public as a hub id)
    medbertscore_model: str | None = None  # BERTScore model for MedBERTScore (hub id or local folder)
    medbertscore_num_layers: int | None = None  # its layer (needed unless bert-score knows the model)


@dataclass(frozen=True)
class SuiteSpec:
    """One year's metric set and how to combine it."""

    name: str
    metrics: tuple[str, ...]
    bertscore_idf: bool = False
    bertscore_measure: str = "f1"
    means: dict[str, tuple[str, ...]] = field(default_factory=dict)  # e.g. {"primary": ("bertscore", ...)}


SUITES: dict[str, SuiteSpec] = {
    "imageclef2023": SuiteSpec("imageclef2023", ("bertscore", "rouge1")),
    "imageclef2024": SuiteSpec(
        "imageclef2024",
        (
            "bertscore",
            "rouge1",
            "rougeL",
            "bleu1",
            "bleu4",
            "meteor",
            "cider",
            "bleurt",
            "clipscore",
            "refclipscore",
            "clinicalbleurt",
            "medbertscore",
        ),
    ),
    "imageclef2025": SuiteSpec(
        "imageclef2025",
        ("bertscore", "rouge1", "bleurt", "similarity", "alignscore", "medcat"),
        bertscore_idf=True,
        means={"primary": ("bertscore", "rouge1", "similarity"), "secondary": ("medcat", "alignscore")},
    ),
}


@dataclass
class SuiteResult:
    """Scores of one suite run: corpus values, per-image table, skipped metrics and intervals."""

    metrics: dict[str, float]
    per_image: pd.DataFrame  # index "id", one column per scored metric (means included)
    skipped: dict[str, str]
    ci: dict[str, tuple[float, float]]
    n: int
    suite: str = ""


@dataclass
class _Context:
    gts: dict[str, list[str]]
    res: dict[str, list[str]]
    eval_cfg: EvalConfig
    cfg: SuiteConfig
    spec: SuiteSpec
    examples: dict[str, Example] | None
    cache: dict[str, Any] = field(default_factory=dict)


def _bertscore(c: _Context) -> Score:
    e = c.eval_cfg
    measure = c.cfg.bertscore_measure or c.spec.bertscore_measure
    return base.bertscore(
        c.gts,
        c.res,
        model=e.bertscore_model,
        num_layers=e.bertscore_num_layers,
        idf=c.spec.bertscore_idf,
        batch_size=e.batch_size,
        device=e.device,
        measure=measure,
    )


def _medbertscore(c: _Context) -> Score:
    model = c.cfg.medbertscore_model
    if not model:
        raise MetricSkipped("no MedBERTScore model configured (suite medbertscore_model=HUB_ID_OR_FOLDER)")
    layers = c.cfg.medbertscore_num_layers
    if layers is None:
        from bert_score.utils import model2layers

        if model not in model2layers:
            raise MetricSkipped(
                f"MedBERTScore model {model!r}: set medbertscore_num_layers (bert-score has no default)"
            )
    e = c.eval_cfg
    return base.bertscore(
        c.gts, c.res, model=model, num_layers=layers, batch_size=e.batch_size, device=e.device, idf=False
    )


def _bleurt(c: _Context, checkpoint: str | None, what: str) -> Score:
    if not checkpoint:
        raise MetricSkipped(f"no {what} checkpoint configured (suite {what.lower()}_checkpoint=HUB_ID_OR_FOLDER)")
    return tm.bleurt(c.gts, c.res, checkpoint=checkpoint, batch_size=c.eval_cfg.batch_size, device=c.eval_cfg.device)


def _clip(c: _Context, key: str) -> Score:
    if c.examples is None:
        raise MetricSkipped("needs the images: pass examples to run_suite")
    if "clip" not in c.cache:
        from medcap.eval.clip_metrics import clip_scores

        absent = [i for i in c.gts if i not in c.examples]
        if absent:
            raise MetricSkipped(f"no example (image) for {len(absent)} scored IDs, e.g. {absent[:5]}")
        examples = [c.examples[i] for i in c.gts]
        hyps = {i: c.res[i][0] for i in c.gts}
        c.cache["clip"] = clip_scores(examples, hyps, c.cfg.clip_encoder, refs=c.gts)
    return c.cache["clip"][key]


def _not_implemented(what: str) -> Callable[[_Context], Score]:
    def run(c: _Context) -> Score:
        raise MetricSkipped(f"{what} is not implemented in medcap")

    return run


_METRICS: dict[str, Callable[[_Context], Score]] = {
    "bertscore": _bertscore,
    "rouge1": lambda c: base.rouge1(c.gts, c.res),
    "rougeL": lambda c: tm.rouge_l(c.gts, c.res),
    "bleu1": lambda c: tm.bleu(c.gts, c.res, n=1, aggregate="mean"),
    "bleu4": lambda c: tm.bleu(c.gts, c.res, n=4, aggregate="mean"),
    "meteor": lambda c: tm.meteor(c.gts, c.res, aggregate="mean"),
    "cider": lambda c: tm.cider(c.gts, c.res),
    "bleurt": lambda c: _bleurt(c, c.cfg.bleurt_checkpoint, "BLEURT"),
    "clinicalbleurt": lambda c: _bleurt(c, c.cfg.clinicalbleurt_checkpoint, "ClinicalBLEURT"),
    "medbertscore": _medbertscore,
    "clipscore": lambda c: _clip(c, "clipscore"),
    "similarity": lambda c: _clip(c, "clipscore"),
    "refclipscore": lambda c: _clip(c, "refclipscore"),
    "alignscore": _not_implemented("AlignScore (alignscore package + AlignScore-base.ckpt, roberta-large, nli_sp)"),
    "medcat": _not_implemented("the MedCAT concept score (needs a MedCAT model pack with UMLS)"),
}


def suite_config(overrides: dict | None) -> SuiteConfig:
    """A :class:`SuiteConfig` with ``overrides`` applied (``clip_encoder`` may be a dict of EncoderConfig fields)."""
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(SuiteConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown suite setting(s) {unknown}; known: {sorted(known)}")
    if isinstance(overrides.get("clip_encoder"), dict):
        overrides["clip_encoder"] = EncoderConfig(**overrides["clip_encoder"])
    return SuiteConfig(**overrides)


def run_suite(
    suite: str,
    refs: dict[str, str],
    hyps: dict[str, str],
    *,
    examples: dict[str, Example] | None = None,
    eval_cfg: EvalConfig,
    overrides: dict | None = None,
) -> SuiteResult:
    """Score ``hyps`` against ``refs`` (one reference per ID, None: not scored) with every metric of ``suite``.

    Every reference ID needs a hypothesis (ValueError naming them otherwise). ``examples`` (by
    ID) give the images for CLIPScore/similarity. ``overrides`` set :class:`SuiteConfig` fields.
    """
    import pandas as pd

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {sorted(SUITES)}")
    spec, cfg = SUITES[suite], suite_config(overrides)
    names = list(spec.metrics) if cfg.metrics is None else list(cfg.metrics)
    outside = [m for m in names if m not in spec.metrics]
    if outside:
        raise ValueError(f"metric(s) {outside} are not in suite {suite!r}: {list(spec.metrics)}")
    ids = base.scored_ids(refs, hyps)
    ctx = _Context({i: [refs[i]] for i in ids}, {i: [hyps[i]] for i in ids}, eval_cfg, cfg, spec, examples)
    scores: dict[str, float] = {}
    columns: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            corpus, per_image = _METRICS[name](ctx)
        except (MetricSkipped, ModelNotFoundError, ImportError) as e:
            log.warning("%s: %s skipped: %s", suite, name, e)
            skipped[name] = str(e) if isinstance(e, MetricSkipped) else f"{type(e).__name__}: {e}"
            continue
        scores[name] = float(corpus)
        columns[name] = [float(per_image[i]) for i in ids]
    for mean_name, parts in spec.means.items():
        absent = [p for p in parts if p not in columns]
        if absent:
            skipped[mean_name] = f"needs {', '.join(absent)}, which did not run"
            continue
        columns[mean_name] = list(np.mean([columns[p] for p in parts], axis=0))
        scores[mean_name] = float(np.mean(columns[mean_name]))
    table = pd.DataFrame(columns, index=pd.Index(ids, name="id"))
    ci = {}
    if cfg.bootstrap > 0:
        for name, col in columns.items():
            values = np.asarray(col, dtype=np.float64)
            if np.all(np.isfinite(values)) and not math.isnan(scores[name]):
                ci[name] = bootstrap_ci(values, n_boot=cfg.bootstrap, alpha=cfg.alpha, seed=cfg.seed)
    return SuiteResult(scores, table, skipped, ci, len(ids), suite)


def save_per_image(result: SuiteResult, path: Path) -> None:
    """Write the per-image table to ``path`` as Parquet (pyarrow), atomically."""
    from medcap.runs import write_atomic

    buffer = io.BytesIO()
    result.per_image.to_parquet(buffer, engine="pyarrow", index=True)
    write_atomic(path, buffer.getvalue())
