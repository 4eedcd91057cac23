"""Rank correlations across streams and their bootstrap intervals: the report's math, written once.

The paper's claims are rank statements over a handful of streams ("the higher the reward, the
lower the accuracy"), so the report measures them with Spearman's rho and Kendall's tau-b. A point
value is scipy's, on the streams' mean values. Its interval comes from a two-part bootstrap:

- the x measure (reward, PPL, ...) is a mean over the *shared problem set*, which every stream of
  a student covers with the same problem ids: one resample of problem indices is applied to all
  streams at once (paired), and every stream's mean is recomputed;
- the y measure (Total Avg) is a mean over training seeds and benchmarks of a mean over each
  benchmark's problems: the seeds are resampled (the same draw for every benchmark and every
  stream: a seed's model answers every benchmark), and every benchmark's problems are resampled
  independently of the x problems and of each other, again the same indices for all streams;
- the correlation of the resampled stream values is computed; the interval is the percentile
  interval of those correlations.

Draw order, so the interval is reproducible from a seed (and re-computable by hand):
`rng = numpy.random.default_rng(seed)`; the x groups' draws, then the y groups' draws, each as
`qup_ray.stats.resampled_means` documents (with one seed: for each group in order,
`rng.integers(0, n_items, size=(num_resamples, n_items))`, row b holding resample b's indices).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import stats

from qup_ray.stats import percentile_interval, resampled_means

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


def bootstrap_correlation(
    x_groups: Sequence[np.ndarray],
    y_groups: Sequence[np.ndarray],
    method: Method,
    num_resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the rank correlation between two grouped measures.

    `x_groups` and `y_groups` are lists of (streams, items) or (streams, seeds, items) arrays,
    rows in the same stream order; seeds and items are resampled within each group (draw
    order: see the module docstring).
    Resamples where the correlation is undefined (a side all tied) are left out; NaN when more
    than half are."""
    rng = np.random.default_rng(seed)
    xs = resampled_means(x_groups, num_resamples, rng)
    ys = resampled_means(y_groups, num_resamples, rng)
    return percentile_interval(rank_correlation_rows(xs, ys, method), num_resamples, level)
