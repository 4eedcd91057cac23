"""What the report is computed from, read from a run directory or from a table of stream numbers.

A run directory gives per-problem rows (reward, PPL, style, retention of every trace; the
correctness of every benchmark sample), so the report can bootstrap. A `--from-table` CSV gives
only per-stream numbers (e.g. a published table): the same analysis, without intervals.

Nothing is dropped silently: every expected input that is absent (a stream never scored, a cell
never trained or evaluated, a benchmark file not written yet) is listed in `ReportData.missing`
and shown in the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qup_ray import metrics
from qup_ray.config import ExperimentConfig
from qup_ray.rundir import MANIFEST, read_parquet, seed_cells, train_streams

logger = logging.getLogger(__name__)

QUARTERS = tuple(f"q{q}_ppl" for q in range(1, 5))
PPL_MEASURES = ("ppl", *QUARTERS)
STYLE_MEASURES = ("symbol_freq", "scaffolding_freq", "digit_freq", "whitespace_freq", "word_freq")
OWN_STREAM = "slm_rft"
REFINED_STREAM = "oracle_refined"
STYLE_PREFIX = "style_aligned"
BASE = "base"
TABLE_COLUMNS = ("student", "objective", "stream", "reward", "total_avg", "ppl")


def acc_col(benchmark: str) -> str:
    """Stream-table column of a benchmark's Avg@k (percent)."""
    return f"acc:{benchmark}"


def spread_col(benchmark: str) -> str:
    """Stream-table column of the std over the k samples' accuracies (percent)."""
    return f"spread:{benchmark}"


@dataclass
class ReportData:
    """Everything the report is computed from.

    `streams` has one row per (student, objective, stream) with the stream's point values:
    reward (the first reward model), reward-<rm> for each model, ppl, q1_ppl..q4_ppl,
    retention, style frequencies, acc:<benchmark> and spread:<benchmark> (percent), total_avg
    and n_seeds. With several training seeds an objective's values pool its seeds: the mean
    over the seeds evaluated on every benchmark (`n_seeds` of them). A value that is missing is
    NaN; the row is still there. Base students are rows with stream and objective `base`.
    """

    source: str
    streams: pd.DataFrame
    students: list[str]
    objectives: list[str]
    """Objectives and robustness variants (`dft`, `dft-lr2e-05-bs128`), seeds pooled."""
    stream_names: dict[str, list[str]]
    reward_models: list[str] = field(default_factory=list)
    benchmarks: list[str] = field(default_factory=list)
    seeds: dict[str, dict[int, str]] = field(default_factory=dict)
    """Objective -> training seed -> its cell folder (`dft`, `dft-seed1`); empty for a table."""
    problems: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    """(student, stream) -> per-problem values (index problem_id): reward*, ppl, q*_ppl,
    style frequencies."""
    bench_problems: dict[tuple[str, str, str, str], pd.DataFrame] = field(default_factory=dict)
    """(student, stream, objective, benchmark) -> per-problem accuracy (mean over samples, 0-1),
    index problem_id, one column per pooled training seed."""
    seed_totals: list[dict] = field(default_factory=list)
    """One row per trained cell: student, objective, stream, seed, cell, total_avg (NaN until
    every benchmark is evaluated)."""
    curves: dict[tuple[str, str, str], pd.DataFrame] = field(default_factory=dict)
    """(student, stream, objective) -> training metrics (seed, step, ce, ...) of every seed."""
    untrained: set[str] = field(default_factory=set)
    """Streams the config leaves out of training and evaluation (`training.streams`)."""
    missing: list[dict[str, str]] = field(default_factory=list)
    """What the report expected and did not find: what, path, reason."""

    def measures(self, student: str, objective: str) -> pd.DataFrame:
        """Stream rows of one student and objective (no base row), indexed by stream."""
        s = self.streams
        rows = s[(s.student == student) & (s.objective == objective) & (s.stream != BASE)]
        return rows.set_index("stream")

    def base_row(self, student: str) -> pd.Series | None:
        s = self.streams
        rows = s[(s.student == student) & (s.stream == BASE)]
        return None if rows.empty else rows.iloc[0]


# --------------------------------------------------------------------------------------------
# From a table of per-stream numbers
# --------------------------------------------------------------------------------------------


def from_table(path: str | Path) -> ReportData:
    """Read a CSV with columns student, objective, stream, reward, total_avg, ppl (optional:
    q1_ppl..q4_ppl, retention, reward-<rm>, style frequencies, acc:<benchmark>). Empty cells
    are missing values."""
    df = pd.read_csv(path)
    absent = [c for c in TABLE_COLUMNS if c not in df.columns]
    if absent:
        raise ValueError(f"{path}: missing columns {absent} (has {list(df.columns)})")
    for col in ("student", "objective", "stream"):
        df[col] = df[col].astype(str)
    duplicated = df.duplicated(["student", "objective", "stream"])
    if duplicated.any():
        raise ValueError(
            f"{path}: duplicate rows {df[duplicated][['student', 'objective', 'stream']].values.tolist()}"
        )
    reward_models = [c.removeprefix("reward-") for c in df.columns if c.startswith("reward-")]
    benchmarks = [c.removeprefix("acc:") for c in df.columns if c.startswith("acc:")]
    students = list(dict.fromkeys(df.student))
    stream_names = {
        s: [x for x in dict.fromkeys(df[df.student == s].stream) if x != BASE] for s in students
    }
    objectives = [o for o in dict.fromkeys(df.objective) if o != BASE]
    missing = [
        {
            "what": f"{r.student}/{r.stream}/{r.objective}: {col}",
            "path": str(path),
            "reason": "empty in the table",
        }
        for r in df.itertuples()
        for col in TABLE_COLUMNS[3:]
        if pd.isna(getattr(r, col))
    ]
    return ReportData(
        source=f"table {Path(path).name}",
        streams=df,
        students=students,
        objectives=objectives,
        stream_names=stream_names,
        reward_models=reward_models,
        benchmarks=benchmarks,
        missing=missing,
    )


# --------------------------------------------------------------------------------------------
# From a run directory
# --------------------------------------------------------------------------------------------


def _finished(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def _problem_values(
    root: Path, student: str, stream: str, reward_models: list[str]
) -> pd.DataFrame | None:
    """Per-problem reward, PPL, style and retention of one stream, or None before scoring."""
    folder = root / "scores" / student / stream
    if not _finished(folder):
        return None
    ppl = read_parquet(folder / "ppl.parquet").to_pandas().set_index("problem_id")
    df = ppl[[c for c in PPL_MEASURES if c in ppl.columns]].astype(float)
    for rm in reward_models:
        path = folder / f"reward-{rm}.parquet"
        if path.is_file():
            df[f"reward-{rm}"] = read_parquet(path).to_pandas().set_index("problem_id")["reward"]
    style_path = folder / "style.parquet"
    if style_path.is_file():
        style = read_parquet(style_path).to_pandas().set_index("problem_id")
        for col in STYLE_MEASURES:
            if col in style.columns:
                df[col] = style[col].astype(float)
    final = root / "streams" / student / "final" / f"{stream}.parquet"
    if final.is_file():
        table = read_parquet(final).to_pandas().set_index("problem_id")
        if "retention" in table.columns:
            df["retention"] = pd.to_numeric(table["retention"], errors="coerce")
    return df


def benchmark_accuracy(samples: pd.DataFrame) -> tuple[pd.Series, float, float]:
    """Per-problem accuracy (fraction of its samples verified correct; the bootstrap's unit),
    Avg@k and its spread over the k sample sets (percent), with the eval stage's formulas
    (`qup_ray.metrics`): an unverifiable sample counts as wrong."""
    ids, table = metrics.correctness_table(samples.to_dict("records"))
    per_problem = pd.Series([sum(row) / len(row) for row in table], index=ids, dtype=float)
    spread = metrics.avg_at_k_std(table)
    return per_problem, metrics.avg_at_k(table) * 100, np.nan if spread is None else spread * 100


def _eval_folder(
    data: ReportData, root: Path, student: str, stream: str, folder: str
) -> dict[str, tuple[pd.Series, float, float]]:
    """Benchmark -> (per-problem accuracy, Avg@k, spread) of one evaluated model, for the
    benchmarks evaluated so far; the others are recorded in `data.missing`."""
    cell = f"{student}/{stream}/{folder}"
    found = {}
    for bench in data.benchmarks:
        path = root / "eval" / cell / f"{bench}.parquet"
        # The eval stage finishes a (model, benchmark) unit with `<bench>/_manifest.json` just
        # after writing its rows; a unit folder without one is still being evaluated.
        running = path.with_suffix("").is_dir() and not _finished(path.with_suffix(""))
        if running or not path.is_file():
            data.missing.append(
                {
                    "what": f"eval {cell} {bench}",
                    "path": f"eval/{cell}/{bench}.parquet",
                    "reason": "being evaluated" if running else "not evaluated yet",
                }
            )
            continue
        found[bench] = benchmark_accuracy(read_parquet(path).to_pandas())
    if found and not _finished(root / "eval" / cell):
        logger.info("eval/%s has benchmark files but no manifest: still running", cell)
    return found


def _eval_cells(
    data: ReportData, root: Path, student: str, stream: str, objective: str, by_seed: dict
) -> dict[str, float]:
    """Avg@k and spread per benchmark (percent), Total Avg and n_seeds of one objective's
    models (one per training seed), pooled: means over the seeds evaluated on every benchmark,
    or, while no seed is, over the seeds that have each benchmark."""
    per_seed = {seed: _eval_folder(data, root, student, stream, f) for seed, f in by_seed.items()}
    every = len(data.benchmarks)
    complete = [s for s, found in per_seed.items() if every and len(found) == every]
    pooled = {s: per_seed[s] for s in complete} if complete else per_seed
    row: dict[str, float] = {"n_seeds": len(complete)}
    for bench in data.benchmarks:
        found = {s: r[bench] for s, r in pooled.items() if bench in r}
        if found:
            data.bench_problems[(student, stream, objective, bench)] = pd.DataFrame(
                {s: acc for s, (acc, _, _) in found.items()}
            )
            row[acc_col(bench)] = float(np.mean([avg for _, avg, _ in found.values()]))
            row[spread_col(bench)] = float(np.nanmean([sp for _, _, sp in found.values()]))
    totals = {
        s: metrics.total_avg({b: r[b][1] for b in data.benchmarks}) if s in complete else np.nan
        for s, r in per_seed.items()
    }
    if complete:
        row["total_avg"] = float(np.mean([totals[s] for s in complete]))
    if stream != BASE:
        data.seed_totals += [
            {"student": student, "objective": objective, "stream": stream, "seed": s,
             "cell": f"{student}/{stream}/{by_seed[s]}", "total_avg": t}
            for s, t in totals.items()
        ]  # fmt: skip
    return row


def _curves(
    data: ReportData, root: Path, student: str, stream: str, objective: str
) -> dict[tuple[str, str, str], pd.DataFrame]:
    """The training metrics of an objective's cells, one `seed` column telling them apart."""
    frames = []
    for seed, folder in data.seeds[objective].items():
        path = root / "train" / student / stream / folder / "metrics.parquet"
        if path.is_file():
            frames.append(read_parquet(path).to_pandas().assign(seed=seed))
        else:
            data.missing.append(
                {
                    "what": f"training curve {student}/{stream}/{folder}",
                    "path": f"train/{student}/{stream}/{folder}/metrics.parquet",
                    "reason": "not trained yet",
                }
            )
    return {(student, stream, objective): pd.concat(frames, ignore_index=True)} if frames else {}


def from_run_dir(cfg: ExperimentConfig, root: str | Path | None = None) -> ReportData:
    """Everything the report needs from the run directory of `cfg`, whatever stages finished."""
    root = Path(root) if root is not None else cfg.run_dir
    students = list(cfg.students)
    streams = cfg.stream_names()
    data = ReportData(
        source=f"run directory {root.name}",
        streams=pd.DataFrame(),
        students=students,
        objectives=list(seed_cells(cfg)),
        stream_names={s: list(streams) for s in students},
        reward_models=list(cfg.scoring.reward_models),
        benchmarks=list(cfg.evaluation.benchmarks),
        seeds=seed_cells(cfg),
        untrained=set(streams) - set(train_streams(cfg)),
    )
    rows = []
    for student in students:
        for stream in streams:
            problems = _problem_values(root, student, stream, data.reward_models)
            means: dict[str, float] = {}
            if problems is None:
                data.missing.append(
                    {
                        "what": f"scores {student}/{stream}",
                        "path": f"scores/{student}/{stream}",
                        "reason": "not scored yet",
                    }
                )
            else:
                data.problems[(student, stream)] = problems
                means = {c: float(problems[c].mean()) for c in problems.columns}
                if data.reward_models and f"reward-{data.reward_models[0]}" in means:
                    means["reward"] = means[f"reward-{data.reward_models[0]}"]
            for objective in data.objectives:
                row = {"student": student, "objective": objective, "stream": stream, **means}
                if stream in data.untrained:
                    rows.append(row)
                    continue
                data.curves.update(_curves(data, root, student, stream, objective))
                by_seed = data.seeds[objective]
                rows.append({**row, **_eval_cells(data, root, student, stream, objective, by_seed)})
        if cfg.evaluation.evaluate_base:
            base = _eval_cells(data, root, student, BASE, BASE, {cfg.training.seed: BASE})
            base["n_seeds"] = np.nan  # not trained: no training seed
            rows.append({"student": student, "objective": BASE, "stream": BASE, **base})
    frame = pd.DataFrame(rows)
    for col in ("reward", "total_avg", "ppl"):
        if col not in frame.columns:
            frame[col] = np.nan
    data.streams = frame
    return data
