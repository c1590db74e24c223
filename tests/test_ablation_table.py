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


def test_reference_row_has_zero_delta_and_no_p(variants):
    table = ablation_table(variants, "base", n_boot=N_BOOT)
    for metric in ("bertscore", "rouge1"):
        assert table.loc["base", (metric, "delta")] == 0
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
    for name in ("base (reference)", "better", "same", "odd\\|name", "bertscore", "rouge1", "Δ bertscore", "- seed 0"):
        assert name in text, name
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 4  # header + one per variant
    assert all(line.count("|") - line.count("\\|") == rows[0].count("|") for line in rows)
    better = next(line for line in rows if line.startswith("| better"))
    mean = table.loc["better", ("bertscore", "mean")]
    assert f"**{mean:.4f} [" in better  # best bertscore in bold
    assert re.search(r"\| \*\*\d\.\d{4} \[\d\.\d{2}, \d\.\d{2}\]\*\* \| \+0\.\d{4} \| <?0\.\d{3} \|", better)

    page = markdown_html(text)  # what the report shows of it
    assert page.count("<tr>") == 5 and "odd|name" in page and "<b>" in page


def test_plot_writes_a_png_of_the_expected_size(variants, tmp_path):
    table = ablation_table(variants, "base", n_boot=N_BOOT)
    path = plot_ablation(table, tmp_path / "plots" / "ablation.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = plot_size(3, 2)
        assert im.size == (round(w * PLOT_DPI), round(h * PLOT_DPI))
        assert len(set(im.convert("L").getdata())) > 20  # something is drawn
    one = plot_ablation(table, tmp_path / "one.png", metrics=["rouge1"])
    with Image.open(one) as im:
        assert im.size[1] == round(plot_size(3, 1)[1] * PLOT_DPI)
    with pytest.raises(ValueError, match="bleu"):
        plot_ablation(table, tmp_path / "x.png", metrics=["bleu"])
