"""Ablation tables, their Markdown and plot, on constructed per-image scores with known answers."""

import math
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medcap.eval.ablation import (
    PLOT_DPI,
    VariantScores,
    ablation_table,
    forest_figure,
    plot_ablation,
    plot_size,
    write_ablation_md,
)
from medcap.eval.report import markdown_html
from medcap.eval.stats import bootstrap_ci

N_BOOT = 300


def _variant(name: str, values: dict[str, np.ndarray], start: int = 0) -> VariantScores:
    n = len(next(iter(values.values())))
    return VariantScores(name, pd.DataFrame(values, index=[f"img{i}" for i in range(start, start + n)]))


@pytest.fixture()
def variants() -> list[VariantScores]:
    rng = np.random.default_rng(1)
    base = rng.uniform(0.4, 0.8, 40)
    rouge = rng.uniform(0.1, 0.5, 40)
    return [
        _variant("base", {"bertscore": base, "rouge1": rouge}),
        # much better on 30 of the images (img0..img29), slightly noisy
        _variant("better", {"bertscore": base[:30] + 0.1 + rng.normal(0, 0.01, 30), "rouge1": rouge[:30] + 0.05}),
        # the same as base up to noise, and no rouge1 at all
        _variant("same", {"bertscore": base + rng.normal(0, 0.05, 40)}),
    ]


def test_means_intervals_and_deltas_match_hand_computed(variants):
    table = ablation_table(variants, "base", n_boot=N_BOOT, seed=3)
    assert list(table.index) == ["base", "better", "same"]
    assert table.attrs["reference"] == "base"
    base, better = variants[0].per_image, variants[1].per_image
    for metric in ("bertscore", "rouge1"):
        row = table.loc["better"]
        assert row[(metric, "mean")] == pytest.approx(better[metric].mean())
        assert row[(metric, "n")] == 30 and row[(metric, "n_paired")] == 30
        # delta: paired, on the 30 images both have
        assert row[(metric, "delta")] == pytest.approx((better[metric] - base[metric].iloc[:30]).mean())
        low, high = bootstrap_ci(better[metric].to_numpy(), n_boot=N_BOOT, seed=3)
        assert (row[(metric, "ci_low")], row[(metric, "ci_high")]) == pytest.approx((low, high))
        assert row[(metric, "ci_low")] <= row[(metric, "mean")] <= row[(metric, "ci_high")]
    assert table.loc["base", ("bertscore", "n")] == 40


def test_delta_interval_is_the_bootstrap_of_the_paired_differences(variants):
    table = ablation_table(variants, "base", n_boot=N_BOOT, seed=3)
    base, better = variants[0].per_image, variants[1].per_image
    for metric in ("bertscore", "rouge1"):
        diff = (better[metric] - base[metric].iloc[:30]).to_numpy()
        row = table.loc["better"]
        expected = bootstrap_ci(diff, n_boot=N_BOOT, seed=3)
        assert (row[(metric, "delta_low")], row[(metric, "delta_high")]) == pytest.approx(expected)
        assert 0 < row[(metric, "delta_low")] <= row[(metric, "delta")] <= row[(metric, "delta_high")]
    same = table.loc["same"]  # noise around base: its interval holds 0
    assert same[("bertscore", "delta_low")] < 0 < same[("bertscore", "delta_high")]
    assert math.isnan(same[("rouge1", "delta_low")])  # no rouge1, no interval


def test_reference_row_has_zero_delta_and_no_p(variants):
    table = ablation_table(variants, "base", n_boot=N_BOOT)
    for metric in ("bertscore", "rouge1"):
        assert table.loc["base", (metric, "delta")] == 0
        assert table.loc["base", (metric, "delta_low")] == table.loc["base", (metric, "delta_high")] == 0
        assert math.isnan(table.loc["base", (metric, "p_bootstrap")])
        assert math.isnan(table.loc["base", (metric, "p_randomisation")])


def test_a_real_difference_gets_a_small_p_and_noise_does_not(variants):
    table = ablation_table(variants, "base", n_boot=N_BOOT)
    assert table.loc["better", ("bertscore", "p_bootstrap")] < 0.01
    assert table.loc["better", ("bertscore", "p_randomisation")] < 0.01
    assert table.loc["same", ("bertscore", "p_randomisation")] > 0.05
    # a metric a variant lacks: no mean, n = 0
    assert math.isnan(table.loc["same", ("rouge1", "mean")]) and table.loc["same", ("rouge1", "n")] == 0


def test_bad_reference_and_duplicate_names_are_refused(variants):
    with pytest.raises(ValueError, match="'zzz'"):
        ablation_table(variants, "zzz")
    with pytest.raises(ValueError, match="unique"):
        ablation_table([variants[0], variants[0]], "base")


def test_from_scores_reads_a_scores_file_object():
    v = VariantScores.from_scores({"variant": "x", "per_image": {"a": {"rouge1": 0.5}, "b": {"rouge1": 0.25}}})
    assert v.name == "x" and v.per_image.loc["b", "rouge1"] == 0.25


def test_markdown_has_every_variant_and_metric_and_bolds_the_best(variants, tmp_path):
    variants.append(_variant("odd|name", {"bertscore": np.full(10, 0.1)}))
    table = ablation_table(variants, "base", n_boot=N_BOOT)
    path = write_ablation_md(
        table, tmp_path / "ablation.md", title="Ablation of test", reference="base", notes=["seed 0"]
    )
    text = path.read_text()
    assert text.startswith("# Ablation of test\n")
    for name in (
        "base (reference)",
        "better",
        "same",
        "odd\\|name",
        "bertscore",
        "rouge1",
        "Δ bertscore [95% CI]",
        "- seed 0",
    ):
        assert name in text, name
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 4  # header + one per variant
    assert all(line.count("|") - line.count("\\|") == rows[0].count("|") for line in rows)
    better = next(line for line in rows if line.startswith("| better"))
    mean = table.loc["better", ("bertscore", "mean")]
    assert f"**{mean:.4f} [" in better  # best bertscore in bold
    row = table.loc["better"]
    delta = f"{row[('bertscore', 'delta')]:+.4f} [{row[('bertscore', 'delta_low')]:+.3f}, {row[('bertscore', 'delta_high')]:+.3f}]"
    assert re.search(
        r"\| \*\*\d\.\d{4} \[\d\.\d{2}, \d\.\d{2}\]\*\* \| " + re.escape(delta) + r" \| <?0\.\d{3} / <?0\.\d{3} \|",
        better,
    )

    page = markdown_html(text)  # what the report shows of it: each interval on a line of its own
    assert page.count("<tr>") == 5 and "odd|name" in page
    assert f'<b>{mean:.4f}<br /><span class="ci">[' in page
    assert f'{row[("bertscore", "delta")]:+.4f}<br /><span class="ci">[{row[("bertscore", "delta_low")]:+.3f}, ' in page


def test_plot_writes_a_png_of_the_expected_size(variants, tmp_path):
    table = ablation_table(variants, "base", n_boot=N_BOOT)
    path = plot_ablation(table, tmp_path / "plots" / "ablation.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = plot_size(3, 2)
        assert im.size == pytest.approx((w * PLOT_DPI, h * PLOT_DPI), abs=1)  # matplotlib truncates
        assert len(set(im.convert("L").getdata())) > 20  # something is drawn
    one = plot_ablation(table, tmp_path / "one.png", metrics=["rouge1"])
    with Image.open(one) as im:
        assert im.size[1] == pytest.approx(plot_size(3, 1)[1] * PLOT_DPI, abs=1)
    with pytest.raises(ValueError, match="bleu"):
        plot_ablation(table, tmp_path / "x.png", metrics=["bleu"])
    assert plot_size(7, 5)[1] > plot_size(7, 3)[1]  # more than three metrics: a second row of panels


def test_forest_plot_draws_each_delta_with_its_interval_zero_line_and_p(variants):
    table = ablation_table(variants, "base", n_boot=N_BOOT)
    fig = forest_figure(table)
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["bertscore", "rouge1"]
    for ax, metric in zip(panels, ("bertscore", "rouge1"), strict=True):
        assert any(list(line.get_xdata()) == [0, 0] for line in ax.get_lines())  # the line at Δ = 0
        shown = [v for v in ("better", "same") if not math.isnan(table.loc[v, (metric, "delta")])]
        segments = ax.containers[0].lines[2][0].get_segments()  # the interval bars, first variant first
        for v, seg in zip(shown, segments, strict=True):
            assert (seg[0][0], seg[1][0]) == pytest.approx((table.loc[v, (metric, "delta_low")],
                                                            table.loc[v, (metric, "delta_high")]))  # fmt: skip
        low, high = ax.get_xlim()
        assert low < min(0, table[(metric, "delta_low")].min()) and high > table[(metric, "delta_high")].max()
        (right,) = ax.child_axes  # the p-values at the right of each row, top row first
        p = table.loc["better", (metric, "p_randomisation")]
        expected = ["reference", f"p={p:.3f}" if p >= 0.001 else "p<0.001"]
        expected.append("n/a" if metric == "rouge1" else f"p={table.loc['same', (metric, 'p_randomisation')]:.3f}")
        labels = [t.get_text() for t in right.get_yticklabels()]
        assert labels[::-1] == expected or labels == expected
    ticks = [t.get_text() for t in panels[0].get_yticklabels()]
    assert "base (reference)" in ticks
