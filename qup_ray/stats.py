"""Summary statistics shared by the score stage and the report: written once, tested once.

The report's intervals are percentile bootstraps over the units a result was measured on:
the problems of the shared problem set (reward, PPL), the problems of each benchmark (Avg@k),
and the training seeds (each seed is a separately trained model). `resampled_means` is the one
resampling routine behind all of them.

Draw order of one `resampled_means` call, so an interval is reproducible from a seed and can be
recomputed by hand: when the groups have more than one seed, first
`rng.integers(0, n_seeds, size=(num_resamples, n_seeds))` (row b: resample b's seeds, the same
for every group, since a seed's model is evaluated on every benchmark); then for each group in
order `rng.integers(0, n_items, size=(num_resamples, n_items))` (row b: resample b's items,
the same for every row of the group, so rows stay paired).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

CHUNK_ELEMENTS = 1 << 22
"""Values gathered at once while resampling (32 MiB of float64), whatever the problem count."""


def bootstrap_ci(
    values: Sequence[float], num_resamples: int, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def summarize(
    values: Sequence[float | None], num_resamples: int, seed: int = 0
) -> dict[str, float | int]:
    """count, mean, std, median and a 95% bootstrap interval of the mean; None values are
    counted as missing, never silently treated as zero."""
    present = [float(v) for v in values if v is not None and not np.isnan(v)]
    out: dict[str, float | int] = {"count": len(present), "missing": len(values) - len(present)}
    if not present:
        return out
    x = np.asarray(present)
    lo, hi = bootstrap_ci(x, num_resamples, seed)
    out.update(mean=float(x.mean()), std=float(x.std(ddof=1)) if x.size > 1 else 0.0,
               median=float(np.median(x)), ci95_low=lo, ci95_high=hi)  # fmt: skip
    return out


def _as_3d(group: np.ndarray) -> np.ndarray:
    """A (rows, items) group as (rows, 1 seed, items); a (rows, seeds, items) group as is."""
    g = np.asarray(group, np.float64)
    if g.ndim == 2:
        return g[:, None, :]
    if g.ndim != 3:
        raise ValueError(f"a group is (rows, items) or (rows, seeds, items), got shape {g.shape}")
    return g


def resampled_means(
    groups: Sequence[np.ndarray], num_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """(resamples, rows): for each resample, the mean over groups of each group's mean over
    its seeds and items, with seeds and items drawn with replacement (draw order: module
    docstring).

    A group is a (rows, items) array, e.g. streams x problems of one benchmark, or a
    (rows, seeds, items) array, e.g. streams x training seeds x problems; every group with a
    seed axis has the same seeds. NaN items are left out of a mean (a resample whose items are
    all NaN gives NaN). Item draws are made in row chunks to bound memory; a Generator gives
    the same numbers either way."""
    cubes = [_as_3d(g) for g in groups]
    num_seeds = {g.shape[1] for g in cubes if g.shape[1] > 1}
    if len(num_seeds) > 1:
        raise ValueError(f"groups disagree on the number of seeds: {sorted(num_seeds)}")
    seeds = num_seeds.pop() if num_seeds else 1
    weights = np.ones((num_resamples, 1))
    if seeds > 1:  # how often each seed was drawn, as a fraction: the mean over drawn seeds
        draws = rng.integers(0, seeds, size=(num_resamples, seeds))
        weights = np.zeros((num_resamples, seeds))
        np.add.at(weights, (np.arange(num_resamples)[:, None], draws), 1.0 / seeds)
    out = np.zeros((num_resamples, cubes[0].shape[0]))
    for g in cubes:
        rows, group_seeds, num_items = g.shape
        w = weights if group_seeds == seeds else np.ones((num_resamples, 1))
        rows_per_chunk = max(1, CHUNK_ELEMENTS // max(num_items * rows * group_seeds, 1))
        for start in range(0, num_resamples, rows_per_chunk):
            stop = min(num_resamples, start + rows_per_chunk)
            idx = rng.integers(0, num_items, size=(stop - start, num_items))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN resample is NaN
                per_seed = np.nanmean(g[:, :, idx], axis=3)  # (rows, seeds, chunk)
            out[start:stop] += np.einsum("rsc,cs->cr", per_seed, w[start:stop])
    return out / len(cubes)


def percentile_interval(
    values: np.ndarray, num_resamples: int, level: float
) -> tuple[float, float]:
    """The percentile interval of bootstrap values; NaN values (an undefined statistic) are
    left out, and the interval is NaN when more than half of the resamples are."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if values.size * 2 < num_resamples:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def bootstrap_mean(
    groups: Sequence[np.ndarray], num_resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of one grouped mean: the mean over groups of each group's
    mean, each group a 1-D array of items or a (seeds, items) array. E.g. a Total Avg over
    training seeds and benchmark problems (one (seeds, problems) group per benchmark), or a
    paired per-problem difference between two streams. Draw order: module docstring."""
    rows = [np.asarray(g, np.float64)[None] for g in groups]
    means = resampled_means(rows, num_resamples, np.random.default_rng(seed))[:, 0]
    return percentile_interval(means, num_resamples, level)
