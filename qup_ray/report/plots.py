"""The report's figures (matplotlib, Agg backend, PNG). Each function draws one figure for one
student and returns the file it wrote, or None when there is nothing to draw yet (the report
then says so instead of showing an empty figure)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from qup_ray.report.collect import BASE, QUARTERS, ReportData, acc_col, spread_col

DPI = 100


def _colors(streams: list[str]) -> dict[str, tuple]:
    """One colour per stream, the same in every figure of a student; the base student grey."""
    cmap = plt.get_cmap("tab10")
    return {BASE: (0.55, 0.55, 0.55, 1.0)} | {s: cmap(i % 10) for i, s in enumerate(streams)}


def _grid(
    n: int, width_in: float = 5.0, height_in: float = 4.0
) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width_in * cols, height_in * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _log_if_wide(ax: plt.Axes, values: np.ndarray, axis: str) -> None:
    """Log scale when values span more than 20x: a few huge PPLs would flatten the rest."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size and values.max() / values.min() > 20:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _scatter_labelled(ax: plt.Axes, x: pd.Series, y: pd.Series, colors: dict) -> None:
    """One point per stream (index of x and y), labelled; labels that would overlap are stacked
    downwards, and labels of points in the right half point left so they stay inside."""
    for stream in x.index:
        ax.scatter(x[stream], y[stream], color=colors.get(stream), s=60)
    ax.autoscale_view()
    pixels = ax.transData.transform(np.column_stack([x.to_numpy(float), y.to_numpy(float)]))
    middle = ax.transAxes.transform((0.5, 0.5))[0]
    placed: list[tuple[float, float, float]] = []  # label start x, end x, y in pixels
    order = sorted(range(len(x)), key=lambda i: (-pixels[i][1], pixels[i][0]))
    for i in order:
        stream, (px, py) = x.index[i], pixels[i]
        width = 5.5 * len(stream) + 8
        left, right = (px - width, px) if px > middle else (px, px + width)
        offset = 4.0
        while any(a < right and left < b and abs(py + offset - h) < 11 for a, b, h in placed):
            offset -= 11
        placed.append((left, right, py + offset))
        ax.annotate(
            stream,
            (x.iloc[i], y.iloc[i]),
            textcoords="offset pixels",
            xytext=(-5 if px > middle else 5, offset),
            ha="right" if px > middle else "left",
            fontsize=8,
        )


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def ppl_vs_accuracy(data: ReportData, student: str, path: Path) -> Path | None:
    """Global PPL (x) against Total Avg (y), one panel per objective, points labelled by stream."""
    panels = [
        (o, data.measures(student, o)[["ppl", "total_avg"]].dropna()) for o in data.objectives
    ]
    panels = [(o, t) for o, t in panels if not t.empty]
    if not panels:
        return None
    colors = _colors(data.stream_names[student])
    fig, axes = _grid(len(panels))
    for ax, (objective, table) in zip(axes, panels, strict=True):
        _log_if_wide(ax, table.ppl.to_numpy(), "x")
        low, high = _interval_errors(data.measures(student, objective).loc[table.index])
        ax.errorbar(table.ppl, table.total_avg, yerr=[low, high], fmt="none", ecolor="grey",
                    elinewidth=1, capsize=3)  # fmt: skip
        _scatter_labelled(ax, table.ppl, table.total_avg, colors)
        ax.set(
            title=f"{student} {objective}",
            xlabel="global PPL of the stream",
            ylabel="Total Avg (%)",
        )
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _interval_errors(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each Total Avg to its interval's ends (0 where there is no interval), as
    matplotlib's asymmetric `yerr` wants them."""
    total = table["total_avg"].to_numpy(float)
    ends = [f"total_avg {e}" for e in ("ci_low", "ci_high")]
    if not set(ends) <= set(table.columns):
        return np.zeros_like(total), np.zeros_like(total)
    low, high = (table[c].to_numpy(float) for c in ends)
    return np.nan_to_num(total - low), np.nan_to_num(high - total)


def total_avg_bars(data: ReportData, student: str, path: Path) -> Path | None:
    """Total Avg of each stream, one panel per objective, with the interval over training seeds
    and benchmark problems as error bars and each seed's own Total Avg as a dot."""
    panels = [(o, data.measures(student, o)[["total_avg"]].dropna()) for o in data.objectives]
    panels = [(o, t) for o, t in panels if not t.empty]
    if not panels:
        return None
    colors = _colors(data.stream_names[student])
    seeds = pd.DataFrame(data.seed_totals, columns=["student", "objective", "stream", "total_avg"])
    fig, axes = _grid(len(panels), width_in=max(5.0, 0.9 * len(data.stream_names[student]) + 2))
    for ax, (objective, table) in zip(axes, panels, strict=True):
        x = np.arange(len(table))
        low, high = _interval_errors(data.measures(student, objective).loc[table.index])
        ax.bar(x, table.total_avg, yerr=[low, high], capsize=4,
               color=[colors.get(s) for s in table.index])  # fmt: skip
        mine = seeds[(seeds.student == student) & (seeds.objective == objective)]
        for i, stream in enumerate(table.index):
            values = mine[mine.stream == stream].total_avg.dropna().to_numpy(float)
            ax.scatter(np.full(values.size, i), values, color="black", s=12, zorder=3)
        base = data.base_row(student)
        if base is not None and pd.notna(base.get("total_avg")):
            ax.axhline(base["total_avg"], color=_colors([])[BASE], ls="--", lw=1, label=BASE)
            ax.legend(fontsize=8)
        ax.set(title=f"{student} {objective}", ylabel="Total Avg (%)", xticks=x)
        ax.set_xticklabels(table.index, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def quarter_ppl(data: ReportData, student: str, path: Path) -> Path | None:
    """PPL of each quarter Q1..Q4 of the traces, one line per stream."""
    rows = data.streams[(data.streams.student == student) & (data.streams.stream != BASE)]
    if not set(QUARTERS) <= set(rows.columns):
        return None
    table = rows.drop_duplicates("stream").set_index("stream")[list(QUARTERS)].dropna()
    if table.empty:
        return None
    colors = _colors(data.stream_names[student])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for stream, values in table.iterrows():
        ax.plot(range(1, 5), values.to_numpy(), marker="o", label=stream, color=colors.get(stream))
    _log_if_wide(ax, table.to_numpy().ravel(), "y")
    ax.set(
        title=f"{student}: PPL per quarter of the trace",
        xlabel="quarter",
        ylabel="PPL",
        xticks=range(1, 5),
        xticklabels=["Q1", "Q2", "Q3", "Q4"],
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def reward_rank_vs_accuracy_rank(data: ReportData, student: str, path: Path) -> Path | None:
    """Rank by reward (1 = highest) against rank by Total Avg (1 = most accurate), per objective.
    Points on the diagonal: the reward ranking agrees with utility; on the anti-diagonal: inverted."""
    panels = [
        (o, data.measures(student, o)[["reward", "total_avg"]].dropna()) for o in data.objectives
    ]
    panels = [(o, t) for o, t in panels if len(t) >= 2]
    if not panels:
        return None
    colors = _colors(data.stream_names[student])
    fig, axes = _grid(len(panels))
    for ax, (objective, table) in zip(axes, panels, strict=True):
        reward_rank = table.reward.rank(ascending=False)
        acc_rank = table.total_avg.rank(ascending=False)
        n = len(table)
        ax.plot([1, n], [1, n], ls="--", color="grey", lw=1, label="agreement")
        ax.set(
            title=f"{student} {objective}",
            xlabel="rank by reward (1 = highest)",
            ylabel="rank by Total Avg (1 = best)",
            xlim=(0.5, n + 0.5),
            ylim=(n + 0.5, 0.5),
        )
        _scatter_labelled(ax, reward_rank, acc_rank, colors)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def style_shift_bars(
    shift: pd.DataFrame, streams: list[str], student: str, own: str, path: Path
) -> Path | None:
    """Token-category frequency of each stream minus the student's own traces (percentage points)."""
    if shift.empty:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(shift)
    x = np.arange(len(shift.columns))
    colors = _colors(streams)
    for i, (stream, values) in enumerate(shift.iterrows()):
        ax.bar(
            x + i * width - 0.4 + width / 2,
            values.to_numpy() * 100,
            width,
            label=stream,
            color=colors[stream],
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set(
        title=f"{student}: token categories vs its own traces ({own})",
        xticks=x,
        xticklabels=list(shift.columns),
        ylabel="frequency shift (percentage points)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def training_curves(data: ReportData, student: str, path: Path) -> Path | None:
    """Cross-entropy against optimizer step, one panel per objective, one line per stream (the
    DFT loss itself can rise while the model improves, so CE is what is tracked)."""
    panels = [
        o
        for o in data.objectives
        if any((student, s, o) in data.curves for s in data.stream_names[student])
    ]
    if not panels:
        return None
    colors = _colors(data.stream_names[student])
    fig, axes = _grid(len(panels))
    for ax, objective in zip(axes, panels, strict=True):
        for stream in data.stream_names[student]:
            curve = data.curves.get((student, stream, objective))
            if curve is None or not {"step", "ce"} <= set(curve.columns):
                continue
            by_seed = curve.groupby("seed") if "seed" in curve.columns else [(None, curve)]
            for i, (_, one) in enumerate(by_seed):  # every seed, one colour per stream
                ax.plot(one.step, one.ce, label=None if i else stream, color=colors.get(stream),
                        lw=1.2, alpha=1.0 if i == 0 else 0.5)  # fmt: skip
        ax.set(title=f"{student} {objective}", xlabel="optimizer step", ylabel="cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def benchmark_bars(data: ReportData, student: str, objective: str, path: Path) -> Path | None:
    """Avg@k per benchmark for the base student and each stream; error bars: std across samples."""
    table = data.measures(student, objective)
    base = data.base_row(student)
    rows = ([(BASE, base)] if base is not None else []) + [(s, table.loc[s]) for s in table.index]
    rows = [(s, r) for s, r in rows if any(pd.notna(r.get(acc_col(b))) for b in data.benchmarks)]
    if not rows or not data.benchmarks:
        return None
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(data.benchmarks) + 3), 4.4))
    width = 0.8 / len(rows)
    x = np.arange(len(data.benchmarks))
    colors = _colors(data.stream_names[student])
    for i, (stream, row) in enumerate(rows):
        acc = [row.get(acc_col(b), np.nan) for b in data.benchmarks]
        err = [row.get(spread_col(b), np.nan) for b in data.benchmarks]
        ax.bar(
            x + i * width - 0.4 + width / 2,
            acc,
            width,
            yerr=err,
            capsize=2,
            label=stream,
            color=colors[stream],
        )
    ax.set(
        title=f"{student} {objective}: Avg@k per benchmark (error bars: spread across samples)",
        xticks=x,
        xticklabels=data.benchmarks,
        ylabel="Avg@k (%)",
    )
    ax.legend(fontsize=7, ncols=2)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
