"""The ImageCLEFmedical Caption metric suites of 2023 to 2026, with per-image scores, intervals and specificity.

``run_suite(name, refs, hyps, ...)`` scores every metric of a suite, keeps per-image values in a
DataFrame (saved as Parquet by :func:`save_per_image`), adds a percentile-bootstrap interval of
each mean and the year's means (:mod:`medcap.eval.suite_specs` says what each year follows). A
metric whose model, package or input is missing lands in ``skipped`` with the reason, never as a
number; a mean with a skipped part is skipped too. A metric scored with another model than the
organisers' is listed in ``not_comparable`` with the reason, and so is every mean that includes it.

Beside the metrics every run reports the specificity figures (:mod:`medcap.eval.specificity`),
computed with the suite's own BERTScore (the loaded model is reused, not loaded again):
``specificity`` (corpus mean; per image too), ``median_rank`` of the own reference (per image:
``own_rank``, 1 = best, lower is better) and ``distinct`` captions (corpus only).

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
from medcap.eval.specificity import SpecificityConfig, distinct_captions, specificity
from medcap.eval.stats import bootstrap_ci
from medcap.eval.suite_specs import SUITES, SuiteSpec, not_comparable
from medcap.models.hub import ModelNotFoundError
from medcap.records import Example

if TYPE_CHECKING:
    import pandas as pd

    from medcap.eval.bertscore import BertScorer

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
    alignscore_checkpoint: str | None = None  # AlignScore-base.ckpt (huggingface.co/yzha/AlignScore); None: skipped
    alignscore_model: str = "roberta-base"  # its backbone: hub id or local folder (see medcap.eval.factuality)
    medcat_model_pack: str | None = None  # MedCAT model pack, zip or folder (the organisers': UMLS); None: skipped
    specificity: bool = True  # specificity and own-reference rank beside BERTScore (needs it to run)
    specificity_exact_max: int = 2000  # every caption x every reference up to this many images
    specificity_sample: int = 1000  # beyond: references sampled per caption (see medcap.eval.specificity)


# SuiteConfig fields read from EvalConfig when it has them (the stage passes the older ones itself)
_FROM_EVAL = (
    "alignscore_checkpoint",
    "alignscore_model",
    "medcat_model_pack",
    "specificity",
    "specificity_exact_max",
    "specificity_sample",
)


@dataclass
class SuiteResult:
    """Scores of one suite run: corpus values, per-image table, skipped metrics and intervals."""

    metrics: dict[str, float]
    per_image: pd.DataFrame  # index "id", one column per scored metric (means included)
    skipped: dict[str, str]
    ci: dict[str, tuple[float, float]]
    n: int
    suite: str = ""
    not_comparable: dict[str, str] = field(default_factory=dict)  # metric or mean -> why it differs from official
    settings: dict[str, Any] = field(default_factory=dict)  # what the metrics ran with

    def summary(self) -> dict[str, Any]:
        """Everything of a scores file but the per-image values: corpus figures, intervals, flags, settings."""
        return {
            "suite": self.suite,
            "n": self.n,
            "metrics": self.metrics,
            "ci": {m: list(v) for m, v in self.ci.items()},
            "skipped": self.skipped,
            "not_comparable": self.not_comparable,
            "settings": self.settings,
        }


@dataclass
class _Context:
    gts: dict[str, list[str]]
    res: dict[str, list[str]]
    eval_cfg: EvalConfig
    cfg: SuiteConfig
    spec: SuiteSpec
    examples: dict[str, Example] | None
    cache: dict[str, Any] = field(default_factory=dict)


def _scorer(c: _Context) -> BertScorer:
    """The suite's BERTScore model, loaded once for the metric and the specificity figures."""
    if "bertscorer" not in c.cache:
        e = c.eval_cfg
        c.cache["bertscorer"] = base.load_bertscorer(
            e.bertscore_model, e.bertscore_num_layers, batch_size=e.batch_size, device=e.device
        )
    return c.cache["bertscorer"]


def _bertscore(c: _Context) -> Score:
    measure = c.cfg.bertscore_measure or c.spec.bertscore_measure
    return base.bertscore(c.gts, c.res, idf=c.spec.bertscore_idf, measure=measure, scorer=_scorer(c))


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


def _alignscore(c: _Context) -> Score:
    from medcap.eval import factuality

    if not c.cfg.alignscore_checkpoint:
        raise MetricSkipped(
            f"no AlignScore checkpoint configured (alignscore_checkpoint=PATH/{factuality.ALIGNSCORE_CHECKPOINT})"
        )
    e = c.eval_cfg
    scorer = factuality.load_alignscore(
        c.cfg.alignscore_checkpoint, c.cfg.alignscore_model, batch_size=e.batch_size, device=e.device
    )
    return factuality.alignscore(c.gts, c.res, scorer=scorer)


def _medcat(c: _Context) -> Score:
    from medcap.eval import factuality

    if not c.cfg.medcat_model_pack:
        raise MetricSkipped(
            f"no MedCAT model pack configured (medcat_model_pack=PATH; the organisers' is {factuality.MEDCAT_PACK})"
        )
    return factuality.medcat_score(c.gts, c.res, cat=factuality.load_medcat(c.cfg.medcat_model_pack))


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
    "alignscore": _alignscore,
    "medcat": _medcat,
}


def suite_config(overrides: dict | None, eval_cfg: EvalConfig | None = None) -> SuiteConfig:
    """A :class:`SuiteConfig`: fields of ``_FROM_EVAL`` that ``eval_cfg`` has, then ``overrides``.

    ``clip_encoder`` may be a dict of EncoderConfig fields.
    """
    known = {f.name for f in dataclasses.fields(SuiteConfig)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ValueError(f"unknown suite setting(s) {unknown}; known: {sorted(known)}")
    values = {k: getattr(eval_cfg, k) for k in _FROM_EVAL if hasattr(eval_cfg, k)} | dict(overrides or {})
    if isinstance(values.get("clip_encoder"), dict):
        values["clip_encoder"] = EncoderConfig(**values["clip_encoder"])
    return SuiteConfig(**values)


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
    spec, cfg = SUITES[suite], suite_config(overrides, eval_cfg)
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
    _figures(ctx, ids, scores, columns, skipped)
    table = pd.DataFrame(columns, index=pd.Index(ids, name="id"))
    ci = _intervals(cfg, scores, columns)
    settings = _settings(ctx)
    flags = not_comparable(spec, list(scores), settings)
    return SuiteResult(scores, table, skipped, ci, len(ids), suite, flags, settings)


def _figures(
    c: _Context, ids: list[str], scores: dict[str, float], columns: dict[str, list[float]], skipped: dict[str, str]
) -> None:
    """Add ``distinct`` and, with the suite's BERTScore, ``specificity`` and ``median_rank`` (``own_rank`` per image)."""
    from medcap.eval.bertscore import idf_weights
    from medcap.eval.imageclef import preprocess

    scores["distinct"] = float(distinct_captions([c.res[i][0] for i in ids]))
    if not c.cfg.specificity:
        return
    why = None
    if "bertscore" not in columns:
        why = "needs the suite's BERTScore, which did not run"
    elif len(ids) < 2:
        why = "needs at least two images"
    if why:
        skipped["specificity"] = skipped["median_rank"] = why
        return
    cfg = SpecificityConfig(exact_max=c.cfg.specificity_exact_max, sample=c.cfg.specificity_sample, seed=c.cfg.seed)
    scorer, refs = _scorer(c), [preprocess(c.gts[i][0]) for i in ids]
    scorer.idf = idf_weights(scorer.tokenizer, refs) if c.spec.bertscore_idf else None  # as the metric weighs
    measure = c.cfg.bertscore_measure or c.spec.bertscore_measure
    result = specificity(scorer, [preprocess(c.res[i][0]) for i in ids], refs, measure=measure, cfg=cfg)
    columns["specificity"] = result.specificity.tolist()
    columns["own_rank"] = result.own_rank.tolist()
    scores["specificity"] = float(result.specificity.mean())
    scores["median_rank"] = result.median_rank
    c.cache["specificity"] = {"exact": result.exact, "compared": result.compared}


def _intervals(cfg: SuiteConfig, scores: dict[str, float], columns: dict[str, list[float]]) -> dict:
    """Bootstrap intervals of every corpus mean, and of the median own-reference rank."""
    ci: dict[str, tuple[float, float]] = {}
    if cfg.bootstrap <= 0:
        return ci
    targets = [(name, name, "mean") for name in columns if name in scores]
    if "own_rank" in columns:
        targets.append(("median_rank", "own_rank", "median"))
    for name, column, statistic in targets:
        values = np.asarray(columns[column], dtype=np.float64)
        if np.all(np.isfinite(values)) and not math.isnan(scores[name]):
            ci[name] = bootstrap_ci(values, n_boot=cfg.bootstrap, alpha=cfg.alpha, seed=cfg.seed, statistic=statistic)
    return ci


def _settings(c: _Context) -> dict[str, Any]:
    """What the metrics ran with (the scores file keeps it; :func:`not_comparable` reads it)."""
    e, cfg = c.eval_cfg, c.cfg
    out: dict[str, Any] = {
        "preprocessing": "imageclef",
        "bertscore_model": e.bertscore_model,
        "bertscore_num_layers": e.bertscore_num_layers,
        "bertscore_idf": c.spec.bertscore_idf,
        "bertscore_measure": cfg.bertscore_measure or c.spec.bertscore_measure,
        "similarity_encoder": cfg.clip_encoder.name,
        "bleurt_checkpoint": cfg.bleurt_checkpoint,
        "alignscore_checkpoint": cfg.alignscore_checkpoint,
        "alignscore_model": cfg.alignscore_model,
        "medcat_model_pack": cfg.medcat_model_pack,
    }
    if "specificity" in c.cache:
        out["specificity"] = c.cache["specificity"] | {
            "exact_max": cfg.specificity_exact_max,
            "sample": cfg.specificity_sample,
        }
    return out


def save_per_image(result: SuiteResult, path: Path) -> None:
    """Write the per-image table to ``path`` as Parquet (pyarrow), atomically."""
    from medcap.files import write_atomic

    buffer = io.BytesIO()
    result.per_image.to_parquet(buffer, engine="pyarrow", index=True)
    write_atomic(path, buffer.getvalue())
