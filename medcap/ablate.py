"""``medcap ablate``: run variants of one config through a shared cache and compare them.

Each variant is the run config plus ``--set``-style overrides, run in its own folder under
``runs/NAME/ablation/VARIANT``. Before a variant runs a stage it looks for an artifact made with
the same key in the main run and the variants before it, and links it instead of recomputing:
the embeddings and the index of a ``retrieval.k`` sweep are made once.

``--cv K`` (``medcap/cv.py``) is the honest way to choose: case-grouped K-fold cross-validation,
nested when asked (inner folds choose, outer folds report).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medcap.config import RunConfig, VariantConfig, check_config
from medcap.configio import ConfigError, apply_overrides, from_dict, to_dict
from medcap.files import read_json
from medcap.runs import safe_name

log = logging.getLogger(__name__)


@dataclass
class AblationResult:
    table_md: Path
    plot: Path
    table: object  # pandas.DataFrame: variants x metrics
    executions: Counter  # stage -> times it really ran (not taken from the cache)


def default_variants(cfg: RunConfig) -> list[VariantConfig]:
    """Each caption set alone (generators, synthesizers, fusers), and the submitted one with k in {1, 3, 5}."""
    names = [o.name for o in (*cfg.generators, *cfg.synthesizers, *cfg.fusers)]
    target = cfg.submit.caption_set or names[-1]
    variants = [VariantConfig(name=n, caption_set=n) for n in names]
    variants += [
        VariantConfig(name=f"{target}-k{k}", set=[f"retrieval.k={k}"], caption_set=target)
        for k in (1, 3, 5)
        if k != cfg.retrieval.k
    ]
    return variants


def _needed(pipe, name: str) -> set[str]:
    """``name`` and every caption set it is made from (fails, naming it, if the config lacks it)."""
    pipe.caption_set(name)
    return {name}.union(*(_needed(pipe, i) for i in pipe.inputs_of(name)))


def parse_variant(text: str) -> VariantConfig:
    """``NAME[@CAPTION_SET]:KEY=VALUE;KEY=VALUE`` (overrides optional), e.g. ``k1@consensus:retrieval.k=1``."""
    head, _, sets = text.partition(":")
    name, _, caption_set = head.partition("@")
    if not name.strip():
        raise ConfigError(f"variant {text!r}: expected NAME[@CAPTION_SET]:KEY=VALUE;KEY=VALUE")
    overrides = [s.strip() for s in sets.split(";") if s.strip()]
    return VariantConfig(name=name.strip(), set=overrides, caption_set=caption_set.strip() or None)


def variant_config(cfg: RunConfig, variant: VariantConfig, split: str) -> RunConfig:
    """The run config of one variant: overrides applied, its own folder, only the ablation split queried."""
    try:
        vcfg = from_dict(RunConfig, apply_overrides(to_dict(cfg), list(variant.set)))
    except ConfigError as e:
        raise ConfigError(f"ablation variant {variant.name!r}: {e}") from e
    check_config(vcfg)
    vcfg.runs_dir = str(Path(cfg.run_dir) / "ablation")
    vcfg.name = safe_name(variant.name)
    vcfg.data.query_splits = [split]
    return vcfg


def run_variant(pipe, variant: VariantConfig, split: str, metrics: list[str]):
    """Run what ``variant``'s caption set needs on ``split``; its per-image scores (a DataFrame) and captions."""
    import pandas as pd

    vcfg = pipe.cfg
    output = variant.caption_set or pipe.submitted
    needed = _needed(pipe, output)  # run only what the scored caption set is made from
    vcfg.generators = [g for g in vcfg.generators if g.name in needed]
    vcfg.synthesizers = [o for o in vcfg.synthesizers if o.name in needed]
    vcfg.fusers = [o for o in vcfg.fusers if o.name in needed]
    pipe.run_stages(skip=("submit",))
    scores_path = pipe.run.scores(output, split)
    if not scores_path.exists():
        raise ConfigError(f"ablation variant {variant.name!r}: split {split!r} has no reference captions to score")
    per_image = pd.DataFrame.from_dict(read_json(scores_path)["per_image"], orient="index").sort_index()
    first = [m for m in metrics if m in per_image]  # the configured metrics lead the table
    return per_image[first + [c for c in per_image if c not in first]], pipe.captions(output, split)


def variants_of(cfg: RunConfig, variants: list[VariantConfig] | None, reference: str | None):
    variants = variants or cfg.ablation.variants or default_variants(cfg)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"ablation: variant names must be unique, got {names}")
    reference = reference or cfg.ablation.reference or names[0]
    if reference not in names:
        raise ConfigError(f"ablation: reference {reference!r} is not a variant; variants: {names}")
    return variants, reference


def cv_splits(cfg: RunConfig) -> list[str]:
    """The splits a cross-validation cuts into folds: the index split's and the captioned query splits."""
    from medcap.data import load_split

    names = list(dict.fromkeys([*cfg.data.index_split.split("+"), *cfg.data.query_splits]))
    return [s for s in names if all((ex.caption or "").strip() for ex in load_split(cfg.data, s).examples)]


SHOWN_AS_MEDIAN = ("own_rank",)  # its median is an extra column; its mean says little


def primary_metrics(scored: list) -> list[str]:
    """The metrics whose Δ and tests the table shows: BERTScore and ROUGE-1 (the 2024 pair), else the first."""
    metrics = list(scored[0].per_image.columns)
    return [m for m in ("bertscore", "rouge1") if m in metrics] or metrics[:1]


def extra_columns(scored: list, captions: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Beside the means: distinct captions (BERTScore rewards one generic caption) and the median own rank."""
    from medcap.eval.imageclef import preprocess

    extra = {"distinct captions": {v: str(len({preprocess(c) for c in caps.values()})) for v, caps in captions.items()}}
    if all("own_rank" in v.per_image for v in scored):
        extra["median rank"] = {v.name: f"{v.per_image['own_rank'].median():g}" for v in scored}
    return extra


def run_ablation(
    cfg: RunConfig, variants: list[VariantConfig] | None = None, reference: str | None = None, split: str | None = None
) -> AblationResult:
    """Run every variant (sharing cached stages), score it, and write ablation.md and ablation.png."""
    import pandas as pd

    from medcap.eval.ablation import VariantScores, ablation_table, plot_ablation, write_ablation_md
    from medcap.pipeline import Pipeline

    variants, reference = variants_of(cfg, variants, reference)
    split = split or cfg.ablation.split or cfg.data.query_splits[0]

    peers = [Path(cfg.run_dir)]
    executions: Counter = Counter()
    scored, captions = [], {}
    for variant in variants:
        vcfg = variant_config(cfg, variant, split)
        pipe = Pipeline(vcfg, peers=list(peers))
        per_image, captions[variant.name] = run_variant(pipe, variant, split, cfg.eval.metrics or [])
        executions.update(s.stage for s in pipe.history if s.ran)
        scored.append(VariantScores(variant.name, per_image))
        peers.append(pipe.run.root)
        log.info("ablation: %s done (%s)", variant.name, ", ".join(f"{k}={v:.4f}" for k, v in per_image.mean().items()))

    groups = pd.Series(
        {ex.id: ex.group or ex.id for ex in pipe.split(split).examples}
    )  # images of a case move together
    table = ablation_table(scored, reference, n_boot=cfg.ablation.n_boot, seed=cfg.seed, groups=groups)
    root = Path(cfg.run_dir)
    ran = ", ".join(f"{stage} x{n}" for stage, n in sorted(executions.items())) or "nothing (all cached)"
    notes = [
        f"split: {split}; {len(scored[0].per_image)} images; reference: {reference}",
        f"stages executed across variants: {ran}",
    ]
    notes += [
        f"`{v.name}`: {'; '.join(v.set) or 'the run config'} -> {v.caption_set or 'submit.caption_set'}"
        for v in variants
    ]
    md = write_ablation_md(
        table, root / "ablation.md", title=f"Ablation of {cfg.name}", reference=reference, notes=notes,
        extra=extra_columns(scored, captions), primary=primary_metrics(scored), skip=SHOWN_AS_MEDIAN,
    )  # fmt: skip
    png = plot_ablation(table, root / "ablation.png")
    return AblationResult(md, png, table, executions)
