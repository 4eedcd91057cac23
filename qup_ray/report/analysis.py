"""The report's tables: per-stream quality and utility, and the rank correlations across streams.

Two tables per student follow the paper's layout, so a reproduction reads side by side with it:
- quality (one row per stream): mean score of each reward model with its 95% interval, global
  PPL and Q1..Q4, semantic retention, token-category frequencies, and the Total Avg of every
  objective;
- accuracy (one per student and objective, one row per stream plus the base student): Avg@k of
  every benchmark with its spread across samples, and Total Avg with its interval; with several
  training seeds, values are means over the seeds (`n_seeds`) and the interval resamples seeds
  and problems.
Streams without a value keep their row, with the cell empty, so nothing disappears from view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from qup_ray.report.collect import (
    BASE,
    OWN_STREAM,
    QUARTERS,
    STYLE_MEASURES,
    ReportData,
    acc_col,
    spread_col,
)
from qup_ray.report.correlation import METHODS, bootstrap_correlation, rank_correlation
from qup_ray.stats import bootstrap_ci, bootstrap_mean

logger = logging.getLogger(__name__)

CORRELATION_COLUMNS = (
    *("student", "objective", "x", "y", "method"),
    *("value", "ci_low", "ci_high", "n_streams"),
)
Y_MEASURE = "total_avg"


@dataclass(frozen=True)
class BootstrapSettings:
    """How intervals are drawn: resamples, seed and level (from `ReportConfig`)."""

    num_resamples: int = 1000
    seed: int = 0
    level: float = 0.95


def x_measures(data: ReportData) -> list[str]:
    """The measures correlated with Total Avg, in the order of `correlations.csv`."""
    out = ["reward"]
    if len(data.reward_models) > 1:
        out += [f"reward-{rm}" for rm in data.reward_models]
    return [*out, "ppl", *QUARTERS]


def _problem_column(data: ReportData, measure: str) -> str:
    """Column of the per-problem tables that holds `measure` (`reward` is the first model's)."""
    if measure == "reward" and data.reward_models:
        return f"reward-{data.reward_models[0]}"
    return measure


def _x_groups(
    data: ReportData, student: str, streams: list[str], measure: str
) -> list[np.ndarray] | None:
    """(streams, problems) matrix of a measure over the problems every stream has, or None."""
    col = _problem_column(data, measure)
    frames = [data.problems.get((student, s)) for s in streams]
    if any(f is None or col not in f.columns for f in frames):
        return None
    shared = sorted(set.intersection(*(set(f.index) for f in frames)))
    if not shared:
        return None
    return [np.stack([f.loc[shared, col].to_numpy(np.float64) for f in frames])]


def accuracy_groups(
    data: ReportData, student: str, objective: str, streams: list[str]
) -> list[np.ndarray] | None:
    """One (streams, seeds, problems) accuracy array (percent) per benchmark, over the training
    seeds and problems every stream has, or None without per-problem rows."""
    frames = [[data.bench_problems.get((student, s, objective, b)) for s in streams]
              for b in data.benchmarks]  # fmt: skip
    if not frames or any(f is None for row in frames for f in row):
        return None
    seeds = sorted(set.intersection(*(set(f.columns) for row in frames for f in row)))
    if not seeds:
        return None
    groups = []
    for row in frames:
        shared = sorted(set.intersection(*(set(f[seeds].dropna().index) for f in row)))
        groups.append(np.stack([f.loc[shared, seeds].to_numpy(np.float64).T for f in row]) * 100)
    return groups


def total_avg_groups(
    data: ReportData, student: str, stream: str, objective: str
) -> list[np.ndarray] | None:
    """One (seeds, problems) accuracy array (percent) per benchmark of one stream's pooled
    seeds, problems in sorted id order, or None without every benchmark's per-problem rows."""
    frames = [data.bench_problems.get((student, stream, objective, b)) for b in data.benchmarks]
    if not frames or any(f is None for f in frames):
        return None
    return [f.dropna().sort_index().to_numpy(np.float64).T * 100 for f in frames]


def with_total_avg_intervals(data: ReportData, settings: BootstrapSettings) -> pd.DataFrame:
    """`data.streams` with `total_avg ci_low` and `total_avg ci_high`: the bootstrap interval of
    each Total Avg over its training seeds and each benchmark's problems
    (`qup_ray.stats.bootstrap_mean`; NaN without per-problem rows, e.g. from a table)."""
    out = data.streams.copy()
    lows, highs = [], []
    for row in out.itertuples():
        groups = total_avg_groups(data, row.student, row.stream, row.objective)
        lo = hi = np.nan
        if groups is not None and pd.notna(row.total_avg):
            lo, hi = bootstrap_mean(groups, settings.num_resamples, settings.seed, settings.level)
        lows.append(lo)
        highs.append(hi)
    out[f"{Y_MEASURE} ci_low"], out[f"{Y_MEASURE} ci_high"] = lows, highs
    return out


def difference_intervals(
    data: ReportData,
    student: str,
    objective: str,
    stream: str,
    other: str,
    settings: BootstrapSettings,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Bootstrap intervals of (stream - other) PPL (paired over problems) and Total Avg (paired
    over training seeds and each benchmark's problems both have); NaN without per-problem rows."""
    nan = (np.nan, np.nan)
    a, b = data.problems.get((student, stream)), data.problems.get((student, other))
    ppl_ci = nan
    if a is not None and b is not None and "ppl" in a.columns and "ppl" in b.columns:
        shared = a.index.intersection(b.index)
        diff = a.loc[shared, "ppl"] - b.loc[shared, "ppl"]
        ppl_ci = bootstrap_mean([diff], settings.num_resamples, settings.seed, settings.level)
    groups = accuracy_groups(data, student, objective, [stream, other])
    acc_ci = nan
    if groups:
        acc_ci = bootstrap_mean(
            [g[0] - g[1] for g in groups], settings.num_resamples, settings.seed, settings.level
        )
    return ppl_ci, acc_ci


def _base_difference(
    data: ReportData, student: str, stream: str, objective: str, settings: BootstrapSettings
) -> tuple[float, float, float]:
    """(stream - base student) Total Avg with its interval: every training seed of the stream
    against the one untrained model, paired over each benchmark's problems; NaN without rows."""
    groups = []
    for bench in data.benchmarks:
        trained = data.bench_problems.get((student, stream, objective, bench))
        base = data.bench_problems.get((student, BASE, BASE, bench))
        if trained is None or base is None:
            return np.nan, np.nan, np.nan
        trained, base = trained.dropna(), base.dropna()
        shared = sorted(set(trained.index) & set(base.index))
        base_acc = base.loc[shared].to_numpy(np.float64).mean(axis=1)  # one column: one model
        groups.append((trained.loc[shared].to_numpy(np.float64).T - base_acc) * 100)
    if not groups:
        return np.nan, np.nan, np.nan
    point = float(np.mean([g.mean() for g in groups]))
    return (point, *bootstrap_mean(groups, settings.num_resamples, settings.seed, settings.level))


def differences_table(
    data: ReportData, student: str, objective: str, settings: BootstrapSettings
) -> pd.DataFrame:
    """One row per trained stream: its Total Avg minus the student's own stream's (`slm_rft`)
    and minus the untrained base student's, and its PPL minus own, each with a paired bootstrap
    interval. Streams share problems and seeds, so these intervals are much narrower than the
    per-stream ones: the comparisons the paper makes (own vs refined vs synthesized)."""
    table = data.measures(student, objective)
    rows = []
    for stream in data.stream_names[student]:
        if stream not in table.index or stream in data.untrained:
            continue
        row: dict[str, object] = {"stream": stream}
        if OWN_STREAM in table.index and stream != OWN_STREAM:
            ppl_ci, acc_ci = difference_intervals(
                data, student, objective, stream, OWN_STREAM, settings
            )
            own = table.loc[OWN_STREAM]
            for col, ci in ((Y_MEASURE, acc_ci), ("ppl", ppl_ci)):
                if col in table.columns:
                    name = f"{col} - {OWN_STREAM}"
                    row[name] = table.at[stream, col] - own[col]
                    row[f"{name} ci_low"], row[f"{name} ci_high"] = ci
        name = f"{Y_MEASURE} - {BASE}"
        row[name], row[f"{name} ci_low"], row[f"{name} ci_high"] = _base_difference(
            data, student, stream, objective, settings
        )
        rows.append(row)
    return pd.DataFrame(rows).dropna(axis=1, how="all")


def totals_table(data: ReportData, student: str, objective: str) -> pd.DataFrame:
    """One row per stream of one student and objective: seeds pooled, Total Avg with its
    interval, reward and PPL: the numbers the verdict is drawn from."""
    table = data.measures(student, objective)
    cols = ["n_seeds", Y_MEASURE, f"{Y_MEASURE} ci_low", f"{Y_MEASURE} ci_high", "reward", "ppl"]
    rows = [
        {"stream": s, **{c: table.at[s, c] if c in table.columns else np.nan for c in cols}}
        for s in data.stream_names[student]
        if s in table.index and s not in data.untrained
    ]
    return pd.DataFrame(rows, columns=["stream", *cols]).dropna(axis=1, how="all")


def _correlation_rows(
    data: ReportData, student: str, objective: str, x: str, settings: BootstrapSettings
) -> list[dict]:
    """Spearman and Kendall of `x` against Total Avg over the streams that have both."""
    both = data.measures(student, objective)[[x, Y_MEASURE]].dropna()
    streams = list(both.index)
    enough = len(streams) >= 2
    x_groups = _x_groups(data, student, streams, x) if enough else None
    y_groups = accuracy_groups(data, student, objective, streams) if x_groups else None
    rows = []
    for method in METHODS:
        value = rank_correlation(both[x], both[Y_MEASURE], method) if enough else np.nan
        lo = hi = np.nan
        if x_groups and y_groups:
            lo, hi = bootstrap_correlation(
                x_groups, y_groups, method, settings.num_resamples, settings.seed, settings.level
            )
        values = (student, objective, x, Y_MEASURE, method, value, lo, hi, len(streams))
        rows.append(dict(zip(CORRELATION_COLUMNS, values, strict=True)))
    return rows


def correlations(data: ReportData, settings: BootstrapSettings) -> pd.DataFrame:
    """Spearman and Kendall of every x measure against Total Avg across streams, per student
    and objective, with bootstrap intervals where per-problem rows exist (NaN otherwise).
    Streams missing either value are left out of that correlation (see `n_streams`)."""
    rows = []
    for student in data.students:
        for objective in data.objectives:
            columns = data.measures(student, objective).columns
            for x in x_measures(data):
                if x in columns:
                    rows += _correlation_rows(data, student, objective, x, settings)
    return pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))


def _stream_value(data: ReportData, student: str, stream: str, col: str) -> float:
    """A stream-level measure (the same for every objective): the first value present."""
    s = data.streams
    if col not in s.columns:
        return np.nan
    values = s[(s.student == student) & (s.stream == stream)][col].dropna()
    return float(values.iloc[0]) if len(values) else np.nan


def quality_table(data: ReportData, student: str, settings: BootstrapSettings) -> pd.DataFrame:
    """One row per stream: reward means with intervals, PPL, Q1..Q4, retention, style, and the
    Total Avg of each objective (the paper's main table), after the base student's Total Avg.
    Columns no stream has are left out."""
    rows = []
    rewards = [f"reward-{rm}" for rm in data.reward_models] or ["reward"]
    for stream in data.stream_names[student]:
        problems = data.problems.get((student, stream))
        row: dict[str, object] = {"stream": stream}
        row["n_problems"] = len(problems) if problems is not None else np.nan
        for col in rewards:
            if problems is not None and col in problems.columns:
                values = problems[col].dropna().to_numpy()
                row[col] = values.mean()
                row[f"{col} ci_low"], row[f"{col} ci_high"] = bootstrap_ci(
                    values, settings.num_resamples, settings.seed, settings.level
                )
            else:
                row[col] = _stream_value(data, student, stream, col)
        for col in ("ppl", *QUARTERS, "retention", *STYLE_MEASURES):
            row[col] = _stream_value(data, student, stream, col)
        for objective in data.objectives:
            table = data.measures(student, objective)
            total = table[Y_MEASURE].get(stream, np.nan) if Y_MEASURE in table.columns else np.nan
            row[f"{objective} total_avg"] = total
            for end in ("ci_low", "ci_high"):
                col = f"{Y_MEASURE} {end}"
                bound = table[col].get(stream, np.nan) if col in table.columns else np.nan
                row[f"{objective} total_avg {end}"] = bound
        rows.append(row)
    base = data.base_row(student)
    if base is not None:  # the untrained student: the reference every stream should beat
        rows.insert(
            0, {"stream": BASE, **{f"{o} total_avg": base.get(Y_MEASURE) for o in data.objectives}}
        )
    return pd.DataFrame(rows).dropna(axis=1, how="all")


def accuracy_table(data: ReportData, student: str, objective: str) -> pd.DataFrame:
    """Base student and one row per stream: Avg@k and spread per benchmark, Total Avg, and what
    is missing (a stream not evaluated keeps its row)."""
    table = data.measures(student, objective)
    base = data.base_row(student)
    rows = []
    for stream, values in [
        (BASE, base),
        *((s, table.loc[s] if s in table.index else None) for s in data.stream_names[student]),
    ]:
        if stream == BASE and values is None:
            continue
        row: dict[str, object] = {"stream": stream}
        absent = []
        for bench in data.benchmarks:
            acc = values.get(acc_col(bench), np.nan) if values is not None else np.nan
            row[f"{bench} avg@k"] = acc
            row[f"{bench} spread"] = (
                values.get(spread_col(bench), np.nan) if values is not None else np.nan
            )
            if pd.isna(acc):
                absent.append(bench)
        for col in ("n_seeds", Y_MEASURE, f"{Y_MEASURE} ci_low", f"{Y_MEASURE} ci_high"):
            row[col] = values.get(col, np.nan) if values is not None else np.nan
        row["status"] = (
            "not trained (training.streams)"
            if stream in data.untrained
            else _status(absent, data.benchmarks, row["total_avg"])
        )
        rows.append(row)
    frame = pd.DataFrame(rows)
    unknown = [c for c in ("n_seeds", f"{Y_MEASURE} ci_low", f"{Y_MEASURE} ci_high")
               if c in frame.columns and frame[c].isna().all()]  # fmt: skip
    return frame.drop(columns=unknown)


def _status(absent: list[str], benchmarks: list[str], total_avg: float) -> str:
    if not benchmarks:  # a --from-table report: only Total Avg is known
        return "ok" if pd.notna(total_avg) else "missing"
    if not absent:
        return "ok"
    return "missing" if len(absent) == len(benchmarks) else f"missing {', '.join(absent)}"


def style_shift(data: ReportData, student: str, own: str) -> pd.DataFrame:
    """Token-category frequency of each stream minus that of the student's own traces
    (rows: streams other than `own`; columns: categories). Empty without style rows."""
    own_problems = data.problems.get((student, own))
    if own_problems is None or not set(STYLE_MEASURES) <= set(own_problems.columns):
        return pd.DataFrame()
    base = own_problems[list(STYLE_MEASURES)].mean()
    rows = {}
    for stream in data.stream_names[student]:
        problems = data.problems.get((student, stream))
        if stream != own and problems is not None and set(STYLE_MEASURES) <= set(problems.columns):
            rows[stream] = problems[list(STYLE_MEASURES)].mean() - base
    frame = pd.DataFrame(rows).T
    frame.columns = (
        [c.removesuffix("_freq") for c in frame.columns] if not frame.empty else frame.columns
    )
    return frame
