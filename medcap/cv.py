"""``medcap ablate --cv K [--nested J]``: case-grouped cross-validation of the variants, nested when asked.

The captioned splits (e.g. train + valid) are cut into K folds by case; each fold is captioned by
every variant with the other K-1 folds as the index and the training data, under
``runs/NAME/cv{K}/fold-F/VARIANT``; the per-image scores of all folds make one table whose intervals
and tests resample whole cases, beside each fold's mean.

``--nested J`` makes the choice among the variants part of what is measured: inside each outer fold's
training images, a J-fold CV (``cv{K}/fold-F/inner{J}``) scores every variant, the best one on the
primary metrics (the mean of BERTScore and ROUGE-1 where both are scored) is chosen, and the outer
fold reports the chosen variant. The ``nested choice`` row is the honest estimate of "pick by CV,
then ship"; the variant the plain K-fold table ranks first is what the protocol picks on all the data.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcap.ablate import (
    SHOWN_AS_MEDIAN,
    AblationResult,
    cv_splits,
    extra_columns,
    primary_metrics,
    run_variant,
    variant_config,
    variants_of,
)
from medcap.config import RunConfig, VariantConfig
from medcap.configio import ConfigError
from medcap.runs import safe_name

log = logging.getLogger(__name__)

NESTED = "nested choice"


@dataclass
class FoldScores:
    """Every variant's per-image scores and captions on every fold of one cross-validation."""

    folds: list[list[str]]  # image IDs of each fold
    frames: dict[str, list[Any]] = field(default_factory=dict)  # variant -> per-fold DataFrames
    captions: dict[str, dict[str, str]] = field(default_factory=dict)  # variant -> image -> caption
    executions: Counter = field(default_factory=Counter)

    def whole(self, variant: str) -> Any:
        import pandas as pd

        return pd.concat(self.frames[variant])


def cross_validate(
    cfg: RunConfig, examples: list, sources: list[str], k: int, variants: list[VariantConfig], root: Path, tag: str,
    peers: list[Path],
) -> FoldScores:  # fmt: skip
    """K folds by case over ``examples``; every variant captions each fold with the others as its index."""
    from medcap.data.folds import group_folds
    from medcap.pipeline import Pipeline

    folds = group_folds([(ex, None) for ex in examples], k, cfg.seed)
    out = FoldScores(folds, {v.name: [] for v in variants}, {v.name: {} for v in variants})
    for f, held in enumerate(folds):
        query, index = f"{tag}-{f}", f"{tag}-{f}-index"
        held_set = set(held)
        rest = [ex.id for ex in examples if ex.id not in held_set]
        for variant in variants:
            vcfg = variant_config(cfg, variant, query)
            vcfg.runs_dir, vcfg.name = str(root / f"fold-{f}"), safe_name(variant.name)
            vcfg.data.index_split = index
            pipe = Pipeline(vcfg, peers=list(peers))
            pipe.derive(index, sources, rest)
            pipe.derive(query, sources, held)
            per_image, written = run_variant(pipe, variant, query, cfg.eval.metrics or [])
            out.captions[variant.name].update(written)
            out.executions.update(s.stage for s in pipe.history if s.ran)
            out.frames[variant.name].append(per_image)
            peers.append(pipe.run.root)
            pipe.close()
            log.info("%s fold %d/%d: %s done", tag, f + 1, k, variant.name)
    return out


def selection_score(frame: Any, primary: list[str]) -> float:
    """What a choice maximises: the mean of the primary metrics' means."""
    return float(frame[primary].mean().mean())


def run_cv(
    cfg: RunConfig,
    k: int,
    variants: list[VariantConfig] | None = None,
    reference: str | None = None,
    nested: int | None = None,
) -> AblationResult:
    """Case-grouped K-fold CV of the variants over the captioned splits (nested with ``nested`` inner folds):
    cv{K}.md and cv{K}.png in the run folder."""
    import pandas as pd

    from medcap.eval.ablation import VariantScores, ablation_table, plot_ablation, write_ablation_md
    from medcap.pipeline import Pipeline

    if k < 2 or (nested is not None and nested < 2):
        raise ConfigError(f"--cv/--nested: at least 2 folds, got {k}/{nested}")
    variants, reference = variants_of(cfg, variants, reference)
    sources = cv_splits(cfg)
    if not sources:
        raise ConfigError("--cv: no captioned split to cross-validate on")
    probe = Pipeline(cfg)
    examples = [ex for s in sources for ex in probe.split(s).examples]
    groups = pd.Series({ex.id: ex.group or ex.id for ex in examples})
    root = Path(cfg.run_dir) / f"cv{k}"
    peers = [Path(cfg.run_dir)]
    outer = cross_validate(cfg, examples, sources, k, variants, root, f"cv{k}", peers)
    scored = [VariantScores(v.name, outer.whole(v.name)) for v in variants]
    primary = primary_metrics(scored)
    captions = dict(outer.captions)
    notes_nested: list[str] = []
    if nested:
        chosen_frames, captions[NESTED] = [], {}
        for f, held in enumerate(outer.folds):
            held_set = set(held)
            inner = cross_validate(
                cfg, [ex for ex in examples if ex.id not in held_set], sources, nested, variants,
                root / f"fold-{f}" / f"inner{nested}", f"cv{k}-{f}-in{nested}", peers,
            )  # fmt: skip
            outer.executions.update(inner.executions)
            means = {v.name: selection_score(inner.whole(v.name), primary) for v in variants}
            best = max(means, key=means.get)
            chosen_frames.append(outer.frames[best][f])
            captions[NESTED].update({i: outer.captions[best][i] for i in held})
            shown = ", ".join(f"{n} {m:.4f}" for n, m in sorted(means.items(), key=lambda x: -x[1]))
            notes_nested.append(f"outer fold {f}: the inner {nested}-fold CV chose `{best}` ({shown})")
        scored.append(VariantScores(NESTED, pd.concat(chosen_frames)))
    table = ablation_table(scored, reference, n_boot=cfg.ablation.n_boot, seed=cfg.seed, groups=groups)
    notes = _notes(cfg, k, nested, sources, examples, groups, outer, variants, reference, scored, primary)
    notes += notes_nested
    out = Path(cfg.run_dir)
    md = write_ablation_md(
        table, out / f"cv{k}.md", title=f"{k}-fold CV of {cfg.name}" + (f", nested {nested}" if nested else ""),
        reference=reference, notes=notes, primary=primary, extra=extra_columns(scored, captions),
        skip=SHOWN_AS_MEDIAN,
    )  # fmt: skip
    png = plot_ablation(table, out / f"cv{k}.png")
    return AblationResult(md, png, table, outer.executions)


def _notes(cfg, k, nested, sources, examples, groups, outer, variants, reference, scored, primary) -> list[str]:
    import pandas as pd

    metrics = list(scored[0].per_image.columns)
    lines = [f"| variant | {' | '.join(metrics)} |", "|---|" + "---|" * len(metrics)]
    for v in variants:
        means = pd.DataFrame([fr.mean() for fr in outer.frames[v.name]])
        cells = [f"{means[m].min():.4f} – {means[m].max():.4f} (sd {means[m].std():.4f})" for m in metrics]
        lines.append(f"| {v.name} | {' | '.join(cells)} |")
    ran = ", ".join(f"{stage} x{n}" for stage, n in sorted(outer.executions.items())) or "nothing (all cached)"
    plain = {s.name: selection_score(s.per_image, primary) for s in scored if s.name != NESTED}
    notes = [
        f"case-grouped {k}-fold cross-validation over {'+'.join(sources)}: {len(examples)} images, "
        f"{groups.nunique()} cases, folds of {', '.join(str(len(h)) for h in outer.folds)} images (seed {cfg.seed}); "
        "each fold captioned with the other folds as index and training data",
        f"intervals and tests resample whole cases; reference: {reference}",
        f"stages executed: {ran}",
        f"the protocol's pick on all the data (best mean of {' and '.join(primary)}): `{max(plain, key=plain.get)}`",
        "range of the fold means:\n\n" + "\n".join(lines) + "\n",
    ]
    if nested:
        notes.append(
            f"`{NESTED}`: in each outer fold, the variant an inner {nested}-fold CV of its training images ranks "
            "first; scored on the outer fold (the estimate of choosing by CV, then shipping)"
        )
    return notes + [
        f"`{v.name}`: {'; '.join(v.set) or 'the run config'} -> {v.caption_set or 'submit.caption_set'}"
        for v in variants
    ]
