"""Ablation tables and plots: per-image scores of several variants in, a table, Markdown and a PNG out.

A *variant* is one caption set of a run (a generator, the synthesis, the fused caption, or the
same pipeline with a stage dropped or swapped) scored image by image. :func:`ablation_table`
gives, per variant and metric, the mean with a 95% bootstrap confidence interval, and against
the reference variant the mean paired difference with its own 95% interval (a bootstrap of the
per-image differences) and the p-values of a paired bootstrap and of a randomisation test, all on
the images the two variants have in common. :func:`plot_ablation` draws those differences as a
forest plot. Every metric is taken
to be higher-is-better (true of all ImageCLEF caption metrics). The driver that runs the
variants lives elsewhere; this module only computes and renders.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medcap.files import write_atomic

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset({"own_rank"})  # the rank of the image's own reference (1 = best)

TWO_SIDED = "two-sided"  # Δ may go either way; both tests answer "is there any difference"
FIELDS = (
    "mean", "ci_low", "ci_high", "delta", "delta_low", "delta_high", "p_bootstrap", "p_randomisation", "n", "n_paired"
)  # fmt: skip


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
    variants: Sequence[VariantScores],
    reference: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    groups: pd.Series | None = None,
) -> pd.DataFrame:
    """Rows: variants (in the given order); columns: ``(metric, field)`` for each field of :data:`FIELDS`.

    ``delta`` is the mean of (variant - reference) over the images both have a score for,
    ``delta_low``/``delta_high`` its 95% percentile interval from the same paired resamples as
    ``p_bootstrap``, and the p-values test that difference (two-sided); the reference row has
    delta 0 with a zero-width interval and no p-value.
    ``groups`` (image ID -> case) makes every interval and test resample and flip whole cases.
    ``table.attrs`` carries ``reference``, ``n_boot``, ``seed`` and ``grouped``.
    """
    import numpy as np
    import pandas as pd

    from medcap.eval import stats as st

    def ci(x: pd.Series) -> tuple[float, float]:
        if groups is None:
            return st.bootstrap_ci(x.to_numpy(), n_boot=n_boot, seed=seed)
        return st.cluster_bootstrap_ci(x.to_numpy(), groups.loc[x.index].to_numpy(), n_boot=n_boot, seed=seed)

    def tests(a: np.ndarray, b: np.ndarray, index: pd.Index) -> tuple[float, float]:
        if groups is None:
            return (
                st.paired_bootstrap(a, b, n_boot=n_boot, seed=seed, alternative=TWO_SIDED),
                st.randomisation_test(a, b, n_perm=n_boot, seed=seed, alternative=TWO_SIDED),
            )
        g = groups.loc[index].to_numpy()
        return (
            st.cluster_paired_bootstrap(a, b, g, n_boot=n_boot, seed=seed),
            st.cluster_randomisation_test(a, b, g, n_perm=n_boot, seed=seed),
        )

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
                low, high = ci(values)
                stats["ci_low"], stats["ci_high"] = float(low), float(high)
            paired = pd.concat([values, _column(ref, metric)], axis=1, join="inner").dropna()
            stats["n_paired"] = float(len(paired))
            if len(paired):
                a, b = paired.iloc[:, 0].to_numpy(), paired.iloc[:, 1].to_numpy()
                stats["delta"] = float(np.mean(a - b))
                if v.name == reference:
                    stats["delta"] = stats["delta_low"] = stats["delta_high"] = 0.0
                else:
                    low, high = ci(paired.iloc[:, 0] - paired.iloc[:, 1])
                    stats["delta_low"], stats["delta_high"] = float(low), float(high)
                    p_boot, p_rand = tests(a, b, paired.index)
                    stats["p_bootstrap"], stats["p_randomisation"] = float(p_boot), float(p_rand)
            row.update({(metric, f): stats[f] for f in FIELDS})
        rows[v.name] = row

    columns = pd.MultiIndex.from_tuples([(m, f) for m in metrics for f in FIELDS], names=["metric", "field"])
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns).astype(float)
    table.index.name = "variant"
    table.attrs.update(reference=reference, n_boot=n_boot, seed=seed, grouped=groups is not None)
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
    extra: dict[str, dict[str, str]] | None = None,
    skip: Sequence[str] = (),
) -> Path:
    """Write the table as Markdown: ``mean [CI]`` per metric, ``Δ [CI]`` and both p-values for the
    ``primary`` metrics (default: the first), the best mean of each metric in bold, then the ``extra``
    columns (column -> variant -> cell); ``skip`` leaves metrics out of the Markdown (not the table). Written atomically."""
    extra = extra or {}
    metrics = [m for m in table_metrics(table) if m not in skip]
    primary = [m for m in (metrics[:1] if primary is None else primary) if m in metrics]
    n_boot = table.attrs.get("n_boot")
    head = ["variant", "n"]
    for m in metrics:
        head.append(m)
        if m in primary:
            head += [f"Δ {m} [95% CI]", "p (bootstrap / randomisation)"]
    head += list(extra)
    best = {
        m: table[(m, "mean")].min(skipna=True) if m in LOWER_IS_BETTER else table[(m, "mean")].max(skipna=True)
        for m in metrics
    }

    unit = "whole cases" if table.attrs.get("grouped") else "images"
    lines = [f"# {title}", ""]
    lines.append(
        f"Mean per image with a 95% bootstrap confidence interval"
        f"{f' ({n_boot} resamples of {unit})' if n_boot else ''}; Δ is the mean paired difference from the "
        f"reference `{reference}` on the images both have, with its 95% interval (bootstrap of the "
        f"paired differences, resampling {unit}) and two-sided p-values; best mean in bold."
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
                    cells += ["—", "—"]
                else:
                    delta = _delta_ci(row[(m, "delta")], row[(m, "delta_low")], row[(m, "delta_high")])
                    cells += [delta, f"{_p(row[(m, 'p_bootstrap')])} / {_p(row[(m, 'p_randomisation')])}"]
        cells += [_md(column.get(str(name), "–")) for column in extra.values()]
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


def _delta_ci(delta: float, low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return _signed(delta)
    return f"{_signed(delta)} [{low:+.3f}, {high:+.3f}]"


def _p(value: float) -> str:
    if math.isnan(value):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


# --------------------------------------------------------------------------- forest plot

PLOT_DPI = 150
PANEL_COLUMNS = 3  # panels per row, so that the PNG stays legible at a page's width
PANEL_WIDTH_IN = 3.2
LABEL_WIDTH_IN = 1.7  # the variant names left of the first column
ROW_HEIGHT_IN = 0.3  # per variant
REFERENCE_COLOUR = "#b8860b"
POINT_COLOUR = "#1f4e9c"
P_FIELDS = ("p_randomisation", "p_bootstrap")  # the p printed: the sign-flip test, exact for small n


def plot_size(n_variants: int, n_metrics: int) -> tuple[float, float]:
    """The figure size in inches of :func:`plot_ablation`: a grid of panels, :data:`PANEL_COLUMNS` wide."""
    cols = max(1, min(n_metrics, PANEL_COLUMNS))
    rows = max(1, math.ceil(n_metrics / cols))
    return max(6.0, LABEL_WIDTH_IN + cols * PANEL_WIDTH_IN), rows * (1.1 + ROW_HEIGHT_IN * n_variants) + 0.45


def plot_ablation(table: pd.DataFrame, path: Path, *, metrics: Sequence[str] | None = None) -> Path:
    """Write :func:`forest_figure` as a PNG of ``plot_size(...)`` inches at :data:`PLOT_DPI`, atomically."""
    import io

    fig = forest_figure(table, metrics=metrics)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return write_atomic(path, buf.getvalue())


def forest_figure(table: pd.DataFrame, *, metrics: Sequence[str] | None = None):
    """A forest plot of the table: one panel per metric, each variant's Δ against the reference.

    Each variant is a point at its mean paired difference with a bar over its 95% interval
    (filled where the interval excludes 0), a vertical line marks Δ = 0, the p-value of the
    randomisation test is printed at the right of each row, and the reference (Δ = 0 by
    definition) is a labelled diamond. Returns a matplotlib ``Figure`` (Agg canvas, no pyplot).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(metrics) if metrics is not None else table_metrics(table)
    missing = [m for m in metrics if m not in table_metrics(table)]
    if missing or not metrics:
        raise ValueError(f"metrics {missing or metrics} are not in the table; it has {table_metrics(table)}")
    reference = table.attrs.get("reference")
    variants = [str(v) for v in table.index]
    cols = min(len(metrics), PANEL_COLUMNS)
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=plot_size(len(variants), len(metrics)), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, cols, sharey=True, squeeze=False)
    y = np.arange(len(variants))[::-1].astype(float)  # first variant on top
    for ax, metric in zip(grid.flat, metrics, strict=False):
        _forest_panel(ax, table, metric, variants, reference, y)
    for ax in grid.flat[len(metrics) :]:
        ax.set_visible(False)
    labels = [f"{v} (reference)" if v == reference else v for v in variants]
    for ax in grid[:, 0]:
        ax.set_yticks(y, labels, fontsize=8)
        for label, v in zip(ax.get_yticklabels(), variants, strict=True):
            if v == reference:
                label.set_fontweight("bold")
        ax.set_ylim(y.min() - 0.7, y.max() + 0.7)
    n_boot = table.attrs.get("n_boot")
    unit = " of whole cases" if table.attrs.get("grouped") else ""
    note = (
        f"Δ: mean per-image difference from the reference {reference!r} (point) with its 95% paired bootstrap "
        f"interval{f' ({n_boot} resamples{unit})' if n_boot else ''} (bar); filled: the interval excludes 0; "
        f"p: two-sided sign-flip randomisation test{' (cases flipped together)' if unit else ''}"
    )
    width_chars = int(fig.get_figwidth() * 17)  # ~17 characters of 7 pt type per inch
    fig.supxlabel(textwrap.fill(note, width_chars), fontsize=7, color="0.3")
    return fig


def _forest_panel(ax, table: pd.DataFrame, metric: str, variants: list[str], reference, y) -> None:
    """One metric: intervals and points of every variant but the reference, its diamond at 0, p at the right."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    delta = table[(metric, "delta")].to_numpy(dtype=float)
    low = table[(metric, "delta_low")].to_numpy(dtype=float)
    high = table[(metric, "delta_high")].to_numpy(dtype=float)
    shown = np.array([v != reference and not math.isnan(d) for v, d in zip(variants, delta, strict=True)])
    ax.axvline(0.0, color="0.3", linewidth=0.9, zorder=1)
    if shown.any():
        d = delta[shown]
        lo, hi = np.where(np.isnan(low), delta, low)[shown], np.where(np.isnan(high), delta, high)[shown]
        ax.errorbar(d, y[shown], xerr=np.vstack([d - lo, hi - d]).clip(min=0), fmt="none",
                    ecolor=POINT_COLOUR, elinewidth=1.4, capsize=3, zorder=2)  # fmt: skip
        excludes = (lo > 0) | (hi < 0)
        ax.scatter(d, y[shown], s=30, zorder=3, edgecolors=POINT_COLOUR, linewidths=1.2,
                   facecolors=[POINT_COLOUR if e else "white" for e in excludes])  # fmt: skip
    if reference in variants:
        ax.scatter([0.0], [y[variants.index(reference)]], marker="D", s=36, color=REFERENCE_COLOUR, zorder=3)
    ends = np.concatenate([[0.0], low[shown], high[shown], delta[shown]])
    ends = ends[~np.isnan(ends)]
    span = max(float(ends.max() - ends.min()), 1e-3)
    ax.set_xlim(float(ends.min()) - 0.08 * span, float(ends.max()) + 0.08 * span)
    ax.set_title(metric, fontsize=10)
    ax.set_xlabel(f"Δ {metric}", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(axis="x", labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # the default crowds a narrow panel's labels
    right = ax.secondary_yaxis("right")
    right.set_yticks(y, [_p_label(table, v, metric, reference) for v in variants], fontsize=7)
    right.tick_params(length=0)
    right.spines["right"].set_visible(False)


def _p_label(table: pd.DataFrame, variant: str, metric: str, reference) -> str:
    if variant == reference:
        return "reference"
    p = next((table.loc[variant, (metric, f)] for f in P_FIELDS if not math.isnan(table.loc[variant, (metric, f)])),
             math.nan)  # fmt: skip
    return "n/a" if math.isnan(p) else f"p{_p(p)}" if p < 0.001 else f"p={_p(p)}"
