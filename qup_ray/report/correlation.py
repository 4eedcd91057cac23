"""Rank correlations across streams and their bootstrap intervals: the report's math, written once.

The paper's claims are rank statements over a handful of streams ("the higher the reward, the
lower the accuracy"), so the report measures them with Spearman's rho and Kendall's tau-b. A point
value is scipy's, on the streams' mean values. Its interval comes from a two-part bootstrap:

- the x measure (reward, PPL, ...) is a mean over the *shared problem set*, which every stream of
  a student covers with the same problem ids: one resample of problem indices is applied to all
  streams at once (paired), and every stream's mean is recomputed;
- the y measure (Total Avg) is a mean over benchmarks of a mean over each benchmark's problems:
  every benchmark's problems are resampled independently of the x problems and of each other,
  again the same indices for all streams;
- the correlation of the resampled stream values is computed; the interval is the percentile
  interval of those correlations.

Draw order, so the interval is reproducible from a seed (and re-computable by hand):
`rng = numpy.random.default_rng(seed)`; for each group of x and then each group of y, in order,
`rng.integers(0, n_items, size=(num_resamples, n_items))`: row b holds resample b's indices.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import stats

CHUNK_ELEMENTS = 1 << 22
"""Values gathered at once while resampling (32 MiB of float64), whatever the problem count."""
Method = Literal["spearman", "kendall"]
METHODS: tuple[Method, ...] = ("spearman", "kendall")


def rank_correlation(x: Sequence[float], y: Sequence[float], method: Method) -> float:
    """scipy's Spearman rho or Kendall tau-b of two equally long sequences (NaN below 2 points
    or when one side is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    if method == "spearman":
        return float(stats.spearmanr(x, y).statistic)
    if method == "kendall":
        return float(stats.kendalltau(x, y).statistic)
    raise ValueError(f"unknown method {method!r}")


def rank_correlation_rows(x: np.ndarray, y: np.ndarray, method: Method) -> np.ndarray:
    """The same correlation for each row of two (resamples, streams) arrays, vectorized: many
    thousands of scipy calls would dominate the report's run time. Rows where a side is constant
    give NaN, as scipy does. Tested against `rank_correlation`."""
    x, y = np.atleast_2d(np.asarray(x, np.float64)), np.atleast_2d(np.asarray(y, np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "spearman":
            rx = stats.rankdata(x, axis=1)
            ry = stats.rankdata(y, axis=1)
            rx -= rx.mean(axis=1, keepdims=True)
            ry -= ry.mean(axis=1, keepdims=True)
            num = (rx * ry).sum(axis=1)
            den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
            return np.where(den > 0, num / den, np.nan)
        if method == "kendall":
            i, j = np.triu_indices(x.shape[1], k=1)
            sx = np.sign(x[:, i] - x[:, j])
            sy = np.sign(y[:, i] - y[:, j])
            # tau-b = (P - Q) / sqrt((pairs untied in x) * (pairs untied in y))
            den = np.sqrt((sx != 0).sum(axis=1) * (sy != 0).sum(axis=1))
            return np.where(den > 0, (sx * sy).sum(axis=1) / den, np.nan)
    raise ValueError(f"unknown method {method!r}")


def _resampled_means(
    groups: Sequence[np.ndarray], num_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """(resamples, streams) grouped means with each group's items resampled. A group's draws
    are one (resamples, items) index matrix, drawn in row chunks to bound memory (a Generator
    gives the same numbers either way)."""
    out = np.zeros((num_resamples, groups[0].shape[0]))
    for g in groups:
        num_items = g.shape[1]
        rows_per_chunk = max(1, CHUNK_ELEMENTS // max(num_items * g.shape[0], 1))
        for start in range(0, num_resamples, rows_per_chunk):
            stop = min(num_resamples, start + rows_per_chunk)
            idx = rng.integers(0, num_items, size=(stop - start, num_items))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN resample is NaN
                out[start:stop] += np.nanmean(g[:, idx], axis=2).T
    return out / len(groups)


def _percentile_interval(
    values: np.ndarray, num_resamples: int, level: float
) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size * 2 < num_resamples:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def bootstrap_correlation(
    x_groups: Sequence[np.ndarray],
    y_groups: Sequence[np.ndarray],
    method: Method,
    num_resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the rank correlation between two grouped measures.

    `x_groups` and `y_groups` are lists of (streams, items) arrays, rows in the same stream
    order; items are resampled within each group (draw order: see the module docstring).
    Resamples where the correlation is undefined (a side all tied) are left out; NaN when more
    than half are."""
    x_groups = [np.asarray(g, np.float64) for g in x_groups]
    y_groups = [np.asarray(g, np.float64) for g in y_groups]
    rng = np.random.default_rng(seed)
    xs = _resampled_means(x_groups, num_resamples, rng)
    ys = _resampled_means(y_groups, num_resamples, rng)
    return _percentile_interval(rank_correlation_rows(xs, ys, method), num_resamples, level)


def bootstrap_mean(
    groups: Sequence[np.ndarray], num_resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of one grouped mean (groups of 1-D item arrays), e.g. of a
    paired per-problem difference between two streams, or of a Total Avg difference with one
    group per benchmark. Same draw order as `bootstrap_correlation`."""
    groups = [np.asarray(g, np.float64).reshape(1, -1) for g in groups]
    rng = np.random.default_rng(seed)
    means = _resampled_means(groups, num_resamples, rng)[:, 0]
    return _percentile_interval(means, num_resamples, level)
