"""Ablation tables and plots: per-image scores of several variants in, a table, Markdown and a PNG out.

A *variant* is one caption set of a run (a generator, the synthesis, the fused caption, or the
same pipeline with a stage dropped or swapped) scored image by image. :func:`ablation_table`
gives, per variant and metric, the mean with a 95% bootstrap confidence interval, and against
the reference variant the mean paired difference with the p-values of a paired bootstrap and of
a randomisation test, both on the images the two variants have in common. Every metric is taken
to be higher-is-better (true of all ImageCLEF caption metrics). The driver that runs the
variants lives elsewhere; this module only computes and renders.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medcap.runs import write_atomic

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

TWO_SIDED = "two-sided"  # Δ may go either way; both tests answer "is there any difference"
FIELDS = ("mean", "ci_low", "ci_high", "delta", "p_bootstrap", "p_randomisation", "n", "n_paired")


@dataclass(frozen=True)
class VariantScores:
    """One variant's per-image scores: index image ID, one column per metric (NaN where not scored)."""

    name: str
    per_image: pd.DataFrame

    @classmethod
    def from_scores(cls, scores: dict, name: str | None = None) -> VariantScores:
        """From a ``scores/VARIANT.SPLIT.json`` object (``{"variant", "per_image": {id: {metric: v}}}``)."""
        import pandas as pd

        frame = pd.DataFrame.from_dict(scores.get("per_image", {}), orient="index", dtype=float)
        frame.index = frame.index.astype(str)
        return cls(name or scores.get("caption_set") or scores["variant"], frame)


def ablation_table(
    variants: Sequence[VariantScores], reference: str, *, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Rows: variants (in the given order); columns: ``(metric, field)`` for each field of :data:`FIELDS`.

    ``delta`` is the mean of (variant - reference) over the images both have a score for, and
    the p-values test that difference (two-sided); the reference row has delta 0 and no p-value.
    ``table.attrs`` carries ``reference``, ``n_boot`` and ``seed``.
    """
    import numpy as np
    import pandas as pd

    from medcap.eval.stats import bootstrap_ci, paired_bootstrap, randomisation_test

    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    if reference not in names:
        raise ValueError(f"reference variant {reference!r} is not among the variants {names}")
    ref = variants[names.index(reference)].per_image
    metrics = list(dict.fromkeys(m for v in variants for m in v.per_image.columns))

    rows: dict[str, dict[tuple[str, str], float]] = {}
    for v in variants:
        row: dict[tuple[str, str], float] = {}
        for metric in metrics:
            values = _column(v.per_image, metric)
            stats = dict.fromkeys(FIELDS, math.nan)
            stats["n"] = float(len(values))
            if len(values):
                stats["mean"] = float(values.mean())
                low, high = bootstrap_ci(values.to_numpy(), n_boot=n_boot, seed=seed)
                stats["ci_low"], stats["ci_high"] = float(low), float(high)
            paired = pd.concat([values, _column(ref, metric)], axis=1, join="inner").dropna()
            stats["n_paired"] = float(len(paired))
            if len(paired):
                a, b = paired.iloc[:, 0].to_numpy(), paired.iloc[:, 1].to_numpy()
                stats["delta"] = float(np.mean(a - b))
                if v.name == reference:
                    stats["delta"] = 0.0
                else:
                    stats["p_bootstrap"] = float(
                        paired_bootstrap(a, b, n_boot=n_boot, seed=seed, alternative=TWO_SIDED)
                    )
                    stats["p_randomisation"] = float(
                        randomisation_test(a, b, n_perm=n_boot, seed=seed, alternative=TWO_SIDED)
                    )
            row.update({(metric, f): stats[f] for f in FIELDS})
        rows[v.name] = row

    columns = pd.MultiIndex.from_tuples([(m, f) for m in metrics for f in FIELDS], names=["metric", "field"])
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns).astype(float)
    table.index.name = "variant"
    table.attrs.update(reference=reference, n_boot=n_boot, seed=seed)
    return table


def _column(frame: pd.DataFrame, metric: str) -> pd.Series:
    import pandas as pd

    if metric not in frame.columns:
        return pd.Series(dtype=float, name=metric)
    col = pd.to_numeric(frame[metric], errors="coerce").dropna()
    col.index = col.index.astype(str)
    return col


def table_metrics(table: pd.DataFrame) -> list[str]:
    """The metrics of an ablation table, in column order."""
    return list(dict.fromkeys(table.columns.get_level_values(0)))


# --------------------------------------------------------------------------- Markdown


def write_ablation_md(
    table: pd.DataFrame,
    path: Path,
    *,
    title: str,
    reference: str,
    notes: Sequence[str] = (),
    primary: Sequence[str] | None = None,
) -> Path:
    """Write the table as Markdown: ``mean [CI]`` per metric, Δ and p for the ``primary`` metrics
    (default: the first), the best mean of each metric in bold. Written atomically."""
    metrics = table_metrics(table)
    primary = [m for m in (metrics[:1] if primary is None else primary) if m in metrics]
    n_boot = table.attrs.get("n_boot")
    head = ["variant", "n"]
    for m in metrics:
        head.append(m)
        if m in primary:
            head += [f"Δ {m}", "p (bootstrap)", "p (randomisation)"]
    best = {m: table[(m, "mean")].max(skipna=True) for m in metrics}

    lines = [f"# {title}", ""]
    lines.append(
        f"Mean per image with a 95% bootstrap confidence interval"
        f"{f' ({n_boot} resamples)' if n_boot else ''}; Δ is the mean paired difference from the "
        f"reference `{reference}` on the images both have, with two-sided p-values; best mean in bold."
    )
    lines += [
        "",
        "| " + " | ".join(_md(h) for h in head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for name, row in table.iterrows():
        label = f"{_md(str(name))} (reference)" if name == reference else _md(str(name))
        n = max((row[(m, "n")] for m in metrics if not math.isnan(row[(m, "n")])), default=0)
        cells = [label, f"{int(n)}"]
        for m in metrics:
            cell = _mean_ci(row[(m, "mean")], row[(m, "ci_low")], row[(m, "ci_high")])
            if not math.isnan(row[(m, "mean")]) and row[(m, "mean")] == best[m]:
                cell = f"**{cell}**"
            cells.append(cell)
            if m in primary:
                if name == reference:
                    cells += ["—", "—", "—"]
                else:
                    cells += [_signed(row[(m, "delta")]), _p(row[(m, "p_bootstrap")]), _p(row[(m, "p_randomisation")])]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    return write_atomic(path, "\n".join(lines) + "\n")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _mean_ci(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(low) or math.isnan(high):
        return f"{mean:.4f}"
    return f"{mean:.4f} [{low:.2f}, {high:.2f}]"


def _signed(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:+.4f}"


def _p(value: float) -> str:
    if math.isnan(value):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


# --------------------------------------------------------------------------- plot

PLOT_WIDTH_IN = 9.0
PLOT_DPI = 150


def plot_size(n_variants: int, n_metrics: int) -> tuple[float, float]:
    """The figure size in inches of :func:`plot_ablation`: one panel per metric, side by side."""
    return max(PLOT_WIDTH_IN, 2.6 * n_metrics + 1.6), max(3.0, 1.4 + 0.42 * n_variants)


def plot_ablation(table: pd.DataFrame, path: Path, *, metrics: Sequence[str] | None = None) -> Path:
    """One panel per metric (each on its own scale), a horizontal bar per variant with its 95% CI.

    The reference variant (``table.attrs["reference"]``) is shaded and labelled in bold, and a
    dashed line marks its mean in every panel. The PNG is ``plot_size(...)`` inches at
    :data:`PLOT_DPI` and is written atomically.
    """
    import io

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(metrics) if metrics is not None else table_metrics(table)
    missing = [m for m in metrics if m not in table_metrics(table)]
    if missing:
        raise ValueError(f"metrics {missing} are not in the table; it has {table_metrics(table)}")
    reference = table.attrs.get("reference")
    variants = [str(v) for v in table.index]
    fig = Figure(figsize=plot_size(len(variants), len(metrics)), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    y = np.arange(len(variants))[::-1].astype(float)  # first variant on top
    for i, (ax, metric) in enumerate(zip(axes, metrics, strict=True)):
        mean = table[(metric, "mean")].to_numpy(dtype=float)
        low = table[(metric, "ci_low")].to_numpy(dtype=float)
        high = table[(metric, "ci_high")].to_numpy(dtype=float)
        err = np.vstack([np.nan_to_num(mean - low), np.nan_to_num(high - mean)]).clip(min=0)
        colours = ["#b8860b" if v == reference else f"C{i % 10}" for v in variants]
        ax.barh(y, np.nan_to_num(mean), height=0.7, color=colours,
                xerr=err, error_kw={"ecolor": "0.25", "capsize": 3, "elinewidth": 1})  # fmt: skip
        top = float(np.nanmax(np.concatenate([high, mean]), initial=0.0))
        for p, m, h in zip(y, mean, high, strict=True):
            if not math.isnan(m):
                ax.text((h if not math.isnan(h) else m) + 0.02 * max(top, 1e-9), p, f"{m:.3f}", va="center",
                        fontsize=7)  # fmt: skip
        if reference in variants and not math.isnan(mean[variants.index(reference)]):
            ax.axvline(mean[variants.index(reference)], color="0.35", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, max(top * 1.25, 0.05))
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="x", labelsize=7)
    axes[0].set_yticks(y, [f"{v}\n(reference)" if v == reference else v for v in variants])
    for label, v in zip(axes[0].get_yticklabels(), variants, strict=True):
        if v == reference:
            label.set_fontweight("bold")
    axes[0].set_ylim(y.min() - 0.6, y.max() + 0.6)
    fig.supxlabel("mean per image (95% bootstrap CI); dashed: the reference", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return write_atomic(path, buf.getvalue())
