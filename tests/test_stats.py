"""Bootstrap intervals and paired tests on constructed data with known answers."""

import itertools

import numpy as np
import pytest

from medcap.eval.stats import bootstrap_ci, paired_bootstrap, randomisation_test


def test_bootstrap_ci_covers_true_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 500, 5000):
        x = rng.normal(0.6, 0.2, size=n)
        low, high = bootstrap_ci(x, n_boot=1000, seed=0)
        assert low < 0.6 < high
        assert low < x.mean() < high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # width close to the normal-theory interval 2 * 1.96 * sd / sqrt(n)
    assert widths[2] == pytest.approx(2 * 1.96 * 0.2 / np.sqrt(5000), rel=0.15)


def test_bootstrap_ci_is_seeded_and_constant_data_is_a_point():
    x = np.linspace(0, 1, 30)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(np.full(10, 0.4)) == pytest.approx((0.4, 0.4))
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci(np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci(np.array([1.0, np.nan]))


def test_paired_tests_detect_a_real_difference():
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 1, 200)
    a = b + 0.05 + rng.normal(0, 0.05, 200)
    assert paired_bootstrap(a, b, n_boot=2000) < 0.01
    assert paired_bootstrap(a, b, n_boot=2000, alternative="two-sided") < 0.01
    assert randomisation_test(a, b, n_perm=2000) < 0.01
    assert randomisation_test(a, b, n_perm=2000, alternative="greater") < 0.01
    # the wrong direction is not significant
    assert paired_bootstrap(b, a, n_boot=2000) > 0.9
    assert randomisation_test(b, a, n_perm=2000, alternative="greater") > 0.9


def test_paired_tests_give_large_p_for_identical_and_noise_only_pairs():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 1, 300)
    assert paired_bootstrap(a, a.copy(), n_boot=500) == 1.0
    assert randomisation_test(a, a.copy(), n_perm=500) == 1.0
    noise = a + rng.normal(0, 0.1, 300) * np.where(np.arange(300) % 2, 1, -1)
    noise = a + (noise - a) - (noise - a).mean()  # differences with mean exactly 0
    assert randomisation_test(noise, a, n_perm=2000) > 0.5
    assert paired_bootstrap(noise, a, n_boot=2000, alternative="two-sided") > 0.5


def test_sign_flip_is_exact_on_four_pairs():
    a = np.array([0.5, 0.7, 0.2, 0.9])
    b = np.array([0.4, 0.5, 0.3, 0.6])  # differences 0.1, 0.2, -0.1, 0.3 ; mean 0.125
    d = a - b
    patterns = list(itertools.product((1, -1), repeat=4))
    means = [np.dot(s, d) / 4 for s in patterns]
    two_sided = sum(abs(m) >= abs(d.mean()) - 1e-12 for m in means) / 16
    greater = sum(m >= d.mean() - 1e-12 for m in means) / 16
    # by hand: magnitudes 0.1, 0.2, 0.1, 0.3 sum to 0.7; a pattern's sum is 0.7 - 2 * (magnitudes made
    # negative), >= 0.5 when at most one 0.1 is negative: 3 patterns, and 3 mirrored ones <= -0.5
    assert two_sided == 6 / 16 and greater == 3 / 16
    assert randomisation_test(a, b, n_perm=16) == pytest.approx(6 / 16)
    assert randomisation_test(a, b, n_perm=16, alternative="greater") == pytest.approx(3 / 16)


def test_paired_inputs_are_checked():
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="alternative"):
        randomisation_test(np.ones(3), np.ones(3), alternative="less")


def test_bootstrap_ci_of_the_median():
    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0, 5.0, 6.0, 2.0, 3.0])
    low, high = bootstrap_ci(values, n_boot=500, statistic="median", seed=1)
    assert low <= np.median(values) <= high and high < 50  # the outlier moves a mean, not a median
    mean_low, mean_high = bootstrap_ci(values, n_boot=500, seed=1)
    assert mean_high > high
    with pytest.raises(ValueError, match="statistic"):
        bootstrap_ci(values, statistic="mode")


def test_case_resampling_equals_image_resampling_for_one_image_per_case():
    from medcap.eval.stats import cluster_bootstrap_ci, cluster_paired_bootstrap, cluster_randomisation_test

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=80), rng.normal(size=80) + 0.1
    ids = np.arange(80)  # sorted, one image per case: the same draws as the image-level functions
    assert cluster_bootstrap_ci(a, ids, n_boot=500, seed=3) == bootstrap_ci(a, n_boot=500, seed=3)
    assert cluster_paired_bootstrap(a, b, ids, n_boot=500, seed=3) == paired_bootstrap(
        a, b, n_boot=500, seed=3, alternative="two-sided"
    )
    assert cluster_randomisation_test(a, b, ids, n_perm=500, seed=3) == randomisation_test(
        a, b, n_perm=500, seed=3, alternative="two-sided"
    )


def test_case_resampling_widens_the_interval_of_correlated_images():
    from medcap.eval.stats import cluster_bootstrap_ci, cluster_randomisation_test

    rng = np.random.default_rng(0)
    case_effect = rng.normal(size=20)
    values = np.repeat(case_effect, 10) + 0.05 * rng.normal(size=200)  # 10 near-identical images per case
    groups = np.repeat(np.arange(20), 10)
    lo_i, hi_i = bootstrap_ci(values, n_boot=1000, seed=0)
    lo_c, hi_c = cluster_bootstrap_ci(values, groups, n_boot=1000, seed=0)
    assert (hi_c - lo_c) > 2.5 * (hi_i - lo_i)  # ~sqrt(10) wider: 20 cases, not 200 images
    # a shift carried by two cases only is not significant when cases are flipped, though 20 images carry it
    d = np.zeros(200)
    d[:20] = 1.0
    assert cluster_randomisation_test(d, np.zeros(200), groups, n_perm=2000, seed=0) > 0.2
    assert randomisation_test(d, np.zeros(200), n_perm=2000, seed=0, alternative="two-sided") < 0.01
    with pytest.raises(ValueError, match="one group per value"):
        cluster_bootstrap_ci(values, groups[:10])
