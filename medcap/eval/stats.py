"""Confidence intervals and paired significance tests over per-image scores (vectorised numpy).

- :func:`bootstrap_ci`: percentile bootstrap interval of the mean (or the median).
- :func:`paired_bootstrap`: paired bootstrap test of the mean difference ``a - b``, with the
  resampled differences re-centred on the null (Berg-Kirkpatrick et al., 2012):
  ``p = (1 + #{mean(d*) - mean(d) >= mean(d)}) / (n_boot + 1)`` for H0 ``mean(a) <= mean(b)``
  (``alternative="greater"``, the default) and with absolute values for ``"two-sided"``.
- :func:`randomisation_test`: paired sign-flip (approximate randomisation) test of the mean
  difference; exact (every sign pattern) when ``2**n <= n_perm``.

``a`` and ``b`` are the per-image scores of two systems on the same images, in the same order.
"""

from __future__ import annotations

import itertools

import numpy as np

ALTERNATIVES = ("greater", "two-sided")
_CHUNK = 4_000_000  # resampled values held in memory at once
_TOL = 1e-12  # ties within float error count as "at least as extreme"


def _vector(values: np.ndarray, name: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


STATISTICS = ("mean", "median")


def _resampled_means(x: np.ndarray, n_boot: int, rng: np.random.Generator, statistic: str = "mean") -> np.ndarray:
    """Means (or medians) of ``n_boot`` resamples of ``x`` with replacement, drawn in chunks to bound memory."""
    n = x.size
    rows = max(1, _CHUNK // n)
    out = np.empty(n_boot)
    reduce = np.mean if statistic == "mean" else np.median
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        out[start:stop] = reduce(x[rng.integers(0, n, size=(stop - start, n))], axis=1)
    return out


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, statistic: str = "mean"
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` interval at level ``1 - alpha`` of the mean (or median) of ``values``."""
    x = _vector(values)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    means = _resampled_means(x, n_boot, np.random.default_rng(seed), statistic)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = _vector(a, "a"), _vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired tests need scores of the same images: {a.size} vs {b.size} values")
    return a - b


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, alternative: str = "greater"
) -> float:
    """p-value of the paired bootstrap test; ``"greater"``: H0 mean(a) <= mean(b) (see the module docstring)."""
    _check_alternative(alternative)
    d = _differences(a, b)
    observed = d.mean()
    shifted = _resampled_means(d, n_boot, np.random.default_rng(seed)) - observed
    if alternative == "greater":
        hits = np.count_nonzero(shifted >= observed - _TOL)
    else:
        hits = np.count_nonzero(np.abs(shifted) >= abs(observed) - _TOL)
    return float((1 + hits) / (n_boot + 1))


def randomisation_test(
    a: np.ndarray, b: np.ndarray, n_perm: int = 10_000, seed: int = 0, alternative: str = "two-sided"
) -> float:
    """p-value of the paired sign-flip test of ``mean(a - b)``; ``"greater"``: H0 mean(a) <= mean(b).

    Under H0 each difference is as likely positive as negative, so the sign of every pair is
    flipped at random. With ``2**n <= n_perm`` all ``2**n`` sign patterns are enumerated and the
    p-value is exact (the share of patterns at least as extreme, the observed one included);
    otherwise ``n_perm`` random patterns give ``(1 + hits) / (n_perm + 1)``.
    """
    _check_alternative(alternative)
    d = _differences(a, b)
    n = d.size
    observed = d.mean()
    exact = n < 63 and 2**n <= n_perm
    if exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        stats = signs @ d / n
    else:
        rng = np.random.default_rng(seed)
        rows = max(1, _CHUNK // n)
        stats = np.empty(n_perm)
        for start in range(0, n_perm, rows):
            stop = min(n_perm, start + rows)
            flips = rng.integers(0, 2, size=(stop - start, n)) * 2.0 - 1.0
            stats[start:stop] = flips @ d / n
    if alternative == "greater":
        hits = np.count_nonzero(stats >= observed - _TOL)
    else:
        hits = np.count_nonzero(np.abs(stats) >= abs(observed) - _TOL)
    if exact:
        return float(hits / stats.size)
    return float((1 + hits) / (n_perm + 1))


# --------------------------------------------------------------------------- by case (cluster) resampling
# Images of one case share a caption and look alike: they are not independent. These versions
# resample and flip whole cases (``groups``: one label per value), as a case-grouped CV needs.


def _clusters(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-case sums and image counts of ``values``."""
    x = _vector(values)
    g = np.asarray(groups).ravel()
    if g.shape != x.shape:
        raise ValueError(f"one group per value: {g.size} groups for {x.size} values")
    _, inverse = np.unique(g, return_inverse=True)
    return np.bincount(inverse, weights=x), np.bincount(inverse).astype(np.float64)


def _cluster_means(sums: np.ndarray, counts: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Image means of ``n_boot`` resamples of whole cases with replacement."""
    m = sums.size
    rows = max(1, _CHUNK // m)
    out = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        pick = rng.integers(0, m, size=(stop - start, m))
        out[start:stop] = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    return out


def cluster_bootstrap_ci(
    values: np.ndarray, groups: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the image mean, resampling cases (not images) with replacement."""
    sums, counts = _clusters(values, groups)
    means = _cluster_means(sums, counts, n_boot, np.random.default_rng(seed))
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def cluster_paired_bootstrap(
    a: np.ndarray, b: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> float:
    """Two-sided p of the paired bootstrap test of mean(a - b), resampling cases."""
    sums, counts = _clusters(_differences(a, b), groups)
    observed = sums.sum() / counts.sum()
    shifted = _cluster_means(sums, counts, n_boot, np.random.default_rng(seed)) - observed
    return float((1 + np.count_nonzero(np.abs(shifted) >= abs(observed) - _TOL)) / (n_boot + 1))


def cluster_randomisation_test(
    a: np.ndarray, b: np.ndarray, groups: np.ndarray, n_perm: int = 10_000, seed: int = 0
) -> float:
    """Two-sided p of the sign-flip test of mean(a - b), one random sign per case (its summed differences)."""
    sums, counts = _clusters(_differences(a, b), groups)
    n, m = counts.sum(), sums.size
    observed = sums.sum() / n
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK // m)
    stats = np.empty(n_perm)
    for start in range(0, n_perm, rows):
        stop = min(n_perm, start + rows)
        stats[start:stop] = (rng.integers(0, 2, size=(stop - start, m)) * 2.0 - 1.0) @ sums / n
    return float((1 + np.count_nonzero(np.abs(stats) >= abs(observed) - _TOL)) / (n_perm + 1))
