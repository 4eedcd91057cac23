"""Summary statistics shared by the score stage and the report: written once, tested once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
