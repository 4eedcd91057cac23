"""Write the report folder from `ReportData`: CSV tables, PNG plots, report.md and report.html.

Shared by the report stage (a run directory) and `qup report --from-table` (per-stream numbers).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from qup_ray.report import plots
from qup_ray.report.analysis import (
    Y_MEASURE,
    BootstrapSettings,
    accuracy_table,
    correlations,
    differences_table,
    quality_table,
    style_shift,
    totals_table,
    with_total_avg_intervals,
)
from qup_ray.report.collect import OWN_STREAM, ReportData
from qup_ray.report.render import Document, format_cell
from qup_ray.report.verdict import verdicts
from qup_ray.rundir import write_text

logger = logging.getLogger(__name__)

MAX_MISSING_SHOWN = 40


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in parts)


CLAIM_TITLES = {
    "reward_inverts_utility": "Reward ranking vs utility ranking",
    "ppl_vs_accuracy": "PPL vs accuracy",
    "style_alignment": "Style alignment vs oracle refinement",
}


def _with_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """For display: `X ci_low` and `X ci_high` folded into X as "mean [low, high]"."""
    out = table.copy()
    for col in [c for c in table.columns if f"{c} ci_low" in table.columns]:
        out[col] = [
            format_cell(m) + ("" if pd.isna(lo) else f" [{format_cell(lo)}, {format_cell(hi)}]")
            for m, lo, hi in zip(
                table[col], table[f"{col} ci_low"], table[f"{col} ci_high"], strict=True
            )
        ]
        out = out.drop(columns=[f"{col} ci_low", f"{col} ci_high"])
    return out


def _seeds_sentence(data: ReportData) -> str:
    """How the training seeds are pooled, in words ("" for a per-stream table)."""
    counts = {len(by_seed) for by_seed in data.seeds.values()}
    if not counts:
        return ""
    seeds = sorted({s for by_seed in data.seeds.values() for s in by_seed})
    if counts == {1}:
        return (
            f"One training seed ({seeds[0]}): Total Avg intervals are over benchmark problems "
            "only, so they leave out seed-to-seed variation."
        )
    return (
        f"Training seeds {', '.join(map(str, seeds))}: each objective's Total Avg is the mean "
        "over the seeds evaluated on every benchmark (n_seeds), its interval resamples seeds "
        "and benchmark problems; per-seed values are in seeds.csv."
    )


def _write_csv(out_dir: Path, name: str, df: pd.DataFrame) -> Path:
    return write_text(out_dir / f"{name}.csv", df.to_csv(index=False))


def build_report(
    data: ReportData, out_dir: str | Path, settings: BootstrapSettings
) -> dict[str, int]:
    """Compute every table, plot and verdict of `data` into `out_dir`; returns row counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data.streams = with_total_avg_intervals(data, settings)
    corr = correlations(data, settings)
    verdict = verdicts(data, corr, settings)
    _write_csv(out_dir, "correlations", corr)
    _write_csv(out_dir, "verdict", verdict)
    _write_csv(out_dir, "streams", data.streams)
    seeds = pd.DataFrame(
        data.seed_totals, columns=["student", "objective", "stream", "seed", "cell", "total_avg"]
    )
    _write_csv(out_dir, "seeds", seeds)
    missing = pd.DataFrame(data.missing, columns=["what", "path", "reason"])
    _write_csv(out_dir, "missing", missing)

    doc = Document()
    doc.add("h1", "The Quality-Utility Paradox: report")
    doc.add(
        "p",
        f"Source: {data.source}. Students: {', '.join(data.students)}. Objectives: "
        f"{', '.join(data.objectives)}. Benchmarks: {', '.join(data.benchmarks) or 'none listed'}. "
        f"Intervals: {settings.level:.0%} percentile bootstrap, {settings.num_resamples} "
        f"resamples, seed {settings.seed}. A stream's reward, PPL and style values are means "
        "over its traces (as in scores/*/summary.json); Avg@k and its spread are in percent. "
        f"{_seeds_sentence(data)}",
    )
    doc.add("h2", "Verdict")
    for (student, objective), rows in verdict.groupby(["student", "objective"], sort=False):
        doc.add("h3", f"{student}, {objective}")
        for row in rows.itertuples():
            doc.add("verdict", f"{CLAIM_TITLES[row.claim]} ({row.evidence}): {row.text}")
        totals = totals_table(data, student, objective)
        if Y_MEASURE in totals.columns:
            doc.add("table", _with_intervals(totals))
    doc.add("h2", "What is missing")
    if missing.empty:
        doc.add("p", "Nothing: every expected score, training curve and evaluation is present.")
    else:
        doc.add(
            "p",
            f"{len(missing)} expected input(s) are absent; their rows stay in the tables "
            f"with empty cells (all listed in missing.csv).",
        )
        doc.add("table", missing.head(MAX_MISSING_SHOWN))

    for student in data.students:
        doc.add("h2", f"Student {student}")
        _student_tables(doc, data, student, corr, out_dir, settings)
        doc.add("h3", "Plots")
        _student_plots(doc, data, student, out_dir)

    write_text(out_dir / "report.md", doc.to_markdown())
    write_text(out_dir / "report.html", doc.to_html("qup_ray report"))
    logger.info(
        "report: %d correlations, %d verdicts, %d missing inputs -> %s",
        len(corr),
        len(verdict),
        len(missing),
        out_dir,
    )
    return {
        "correlations": len(corr),
        "verdict": len(verdict),
        "missing": len(missing),
        "figures": sum(1 for k, _ in doc.blocks if k == "image"),
    }


def _student_tables(
    doc: Document,
    data: ReportData,
    student: str,
    corr: pd.DataFrame,
    out_dir: Path,
    settings: BootstrapSettings,
) -> None:
    quality = quality_table(data, student, settings)
    _write_csv(out_dir, _slug("quality", student), quality)
    doc.add("h3", "Perceived quality and adaptation cost per stream")
    doc.add("table", _with_intervals(quality))
    for objective in data.objectives:
        acc = accuracy_table(data, student, objective)
        _write_csv(out_dir, _slug("accuracy", student, objective), acc)
        doc.add("h3", f"Accuracy, {objective}")
        doc.add("table", _with_intervals(acc))
        diffs = differences_table(data, student, objective, settings)
        if len(diffs.columns) > 1:
            _write_csv(out_dir, _slug("differences", student, objective), diffs)
            doc.add("h3", f"Paired differences, {objective}")
            doc.add(
                "p",
                f"Each stream's Total Avg minus {OWN_STREAM}'s and minus the base student's, "
                f"and its PPL minus {OWN_STREAM}'s, with paired bootstrap intervals (same "
                "training seeds and benchmark problems; same traced problems for PPL).",
            )
            doc.add("table", _with_intervals(diffs))
    shift = style_shift(data, student, OWN_STREAM)
    if not shift.empty:
        _write_csv(out_dir, _slug("style_shift", student), shift.reset_index(names="stream"))
    doc.add("h3", "Correlations across streams")
    doc.add("table", corr[corr.student == student].drop(columns="student"))


def _student_plots(doc: Document, data: ReportData, student: str, out_dir: Path) -> None:
    def png(name: str) -> Path:
        return out_dir / f"{_slug(student)}_{name}.png"

    figures = [
        (
            plots.ppl_vs_accuracy(data, student, png("ppl_vs_accuracy")),
            "Global PPL against Total Avg, labelled by stream (error bars: Total Avg interval)",
            "PPL vs Total Avg",
        ),
        (
            plots.quarter_ppl(data, student, png("quarter_ppl")),
            "PPL per quarter Q1..Q4 of the traces, per stream",
            "Q1..Q4 PPL",
        ),
        (
            plots.total_avg_bars(data, student, png("total_avg")),
            "Total Avg per stream; error bars: the bootstrap interval over training seeds and "
            "benchmark problems; dots: single seeds",
            "Total Avg with intervals",
        ),
        (
            plots.reward_rank_vs_accuracy_rank(data, student, png("reward_rank")),
            "Rank by reward against rank by Total Avg (dashed: agreement)",
            "Reward rank vs accuracy rank",
        ),
        (
            plots.style_shift_bars(
                style_shift(data, student, OWN_STREAM),
                data.stream_names[student],
                student,
                OWN_STREAM,
                png("style_shift"),
            ),
            f"Token-category frequency of each stream minus {OWN_STREAM}",
            "Token-category shift",
        ),
        (
            plots.training_curves(data, student, png("training_curves")),
            "Cross-entropy against optimizer step, per stream",
            "Training curves",
        ),
    ]
    for objective in data.objectives:
        path = plots.benchmark_bars(data, student, objective, png(f"{_slug(objective)}_benchmarks"))
        figures.append(
            (
                path,
                f"Avg@k per benchmark, {objective} (error bars: std across samples)",
                f"Per-benchmark accuracy, {objective}",
            )
        )
    for path, caption, what in figures:
        if path is None:
            doc.add("p", f"{what}: no data yet.")
        else:
            doc.add("image", (path, caption))
