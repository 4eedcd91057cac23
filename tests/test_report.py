"""The report: correlations against scipy, bootstrap intervals against an independent loop, the
verdict on the paper's own numbers, every table and plot of a hand-made run directory, partial
runs, and the page rendered by a real headless chromium."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import assert_page_and_plots_render, needs_chromium
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from qup_ray.cli import app
from qup_ray.config import CONFIGS_DIR, load_config
from qup_ray.report import BootstrapSettings, from_run_dir, from_table
from qup_ray.report.analysis import accuracy_table, correlations, with_total_avg_intervals
from qup_ray.report.correlation import rank_correlation, rank_correlation_rows
from qup_ray.report.verdict import verdicts
from qup_ray.rundir import (
    MANIFEST,
    RunDir,
    StageError,
    read_json,
    seed_cells,
    write_json,
    write_parquet,
)
from qup_ray.stages import report as report_stage
from qup_ray.stats import bootstrap_mean, resampled_means

PAPER_TABLE = Path(__file__).parent / "data" / "paper_qwen2.5_math_1.5b.csv"
CORRELATION_COLUMNS = [
    "student",
    "objective",
    "x",
    "y",
    "method",
    "value",
    "ci_low",
    "ci_high",
    "n_streams",
]
NUM_PROBLEMS = 50
NUM_BENCH_PROBLEMS = 30
NUM_SAMPLES = 4
# Hand-made streams: (reward mean, ppl mean, accuracy). Higher reward goes with lower accuracy,
# lower PPL with higher accuracy; style_aligned_rule beats oracle_refined on both.
STREAM_SHAPE = {
    "slm_rft": (1.4, 1.5, 0.60),
    "oracle_refined": (1.7, 1.9, 0.45),
    "oracle_synthesized": (1.9, 2.7, 0.25),
    "numina_subset": (1.8, 2.3, 0.35),
    "style_aligned_rule": (1.3, 1.6, 0.65),
}


# --------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spearman", "kendall"])
def test_vectorized_rank_correlation_equals_scipy_with_ties(method: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, size=(200, 6)).astype(float)  # many ties, some constant rows
    y = rng.integers(0, 5, size=(200, 6)).astype(float)
    got = rank_correlation_rows(x, y, method)
    scipy_fn = stats.spearmanr if method == "spearman" else stats.kendalltau
    for row in range(len(x)):
        if np.all(x[row] == x[row, 0]) or np.all(y[row] == y[row, 0]):
            assert np.isnan(got[row])
            continue
        expected = scipy_fn(x[row], y[row]).statistic
        assert got[row] == pytest.approx(expected, abs=1e-12)
        assert rank_correlation(x[row], y[row], method) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_mean_interval_matches_a_hand_loop() -> None:
    rng = np.random.default_rng(5)
    groups = [rng.normal(size=17), rng.normal(1.0, size=9)]
    lo, hi = bootstrap_mean(groups, num_resamples=300, seed=11)
    draws = np.random.default_rng(11)
    # The documented draw order: every resample of the first group, then of the second.
    per_group = [
        [g[draws.integers(0, len(g), size=len(g))].mean() for _ in range(300)] for g in groups
    ]
    means = [(a + b) / 2 for a, b in zip(*per_group, strict=True)]
    assert (lo, hi) == pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)))


def hand_bootstrap(groups: list[np.ndarray], num_resamples: int, seed: int) -> list[float]:
    """The documented draw order, one resample at a time: the seeds (shared by every group),
    then each (seeds, items) group's items; the mean over groups of the drawn cells' mean."""
    rng = np.random.default_rng(seed)
    num_seeds = groups[0].shape[0]
    seed_draws = (
        rng.integers(0, num_seeds, size=(num_resamples, num_seeds))
        if num_seeds > 1
        else np.zeros((num_resamples, 1), int)
    )
    item_draws = [rng.integers(0, g.shape[1], size=(num_resamples, g.shape[1])) for g in groups]
    return [
        np.mean([g[seed_draws[b]][:, d[b]].mean() for g, d in zip(groups, item_draws, strict=True)])
        for b in range(num_resamples)
    ]


def test_bootstrap_over_seeds_and_problems_matches_a_hand_loop() -> None:
    rng = np.random.default_rng(7)
    groups = [rng.normal(size=(3, 17)), rng.normal(2.0, size=(3, 9))]  # (seeds, problems)
    means = hand_bootstrap(groups, 300, seed=11)
    got = bootstrap_mean(groups, num_resamples=300, seed=11)
    assert got == pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)))


def test_bootstrap_spread_over_seeds_and_problems_matches_the_closed_form() -> None:
    # cell (s, p) = a_s + b_p: a resample's mean is mean(a*) + mean(b*), two independent
    # draws, so its variance is var(a)/S + var(b)/P (population variances).
    a, b = np.array([0.0, 3.0, 5.0]), np.linspace(-4.0, 4.0, 40)
    cells = a[:, None] + b[None, :]
    means = resampled_means([cells[None]], 40_000, np.random.default_rng(0))[:, 0]
    expected = np.sqrt(a.var() / a.size + b.var() / b.size)
    assert means.std() == pytest.approx(expected, rel=0.02)
    assert means.mean() == pytest.approx(cells.mean(), abs=0.02)


# --------------------------------------------------------------------------------------------
# --from-table with the paper's numbers
# --------------------------------------------------------------------------------------------


def test_paper_table_correlations_equal_scipy_and_verdict_states_the_paradox(
    tmp_path: Path,
) -> None:
    result = CliRunner().invoke(
        app, ["report", "--from-table", str(PAPER_TABLE), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    corr = pd.read_csv(tmp_path / "correlations.csv")
    assert list(corr.columns) == CORRELATION_COLUMNS
    paper = pd.read_csv(PAPER_TABLE)
    assert len(corr) == 2 * 2 * 2  # objectives x (reward, ppl) x (spearman, kendall)
    for row in corr.itertuples():
        cell = paper[paper.objective == row.objective][[row.x, row.y]].dropna()
        fn = stats.spearmanr if row.method == "spearman" else stats.kendalltau
        assert row.value == pytest.approx(fn(cell[row.x], cell[row.y]).statistic, abs=1e-12)
        assert row.n_streams == len(cell)
        assert np.isnan(row.ci_low) and np.isnan(row.ci_high)  # no per-problem rows
    dft = corr[(corr.objective == "dft") & (corr.method == "spearman")].set_index("x")
    assert (
        dft.loc["reward", "n_streams"] == 6 and dft.loc["ppl", "n_streams"] == 5
    )  # Numina: no PPL
    verdict = pd.read_csv(tmp_path / "verdict.csv").set_index(["objective", "claim"])
    paradox = verdict.loc[("dft", "reward_inverts_utility")]
    assert paradox.holds and paradox.evidence == "no intervals" and paradox.outcome == "holds"
    assert "inverts the utility ranking" in paradox.text and "paradox" in paradox.text
    assert verdict.loc[("dft", "ppl_vs_accuracy")].holds
    assert verdict.loc[("dft", "style_alignment")].holds
    # The paper's SFT column has four streams and no inversion: the verdict must not invent one.
    assert not verdict.loc[("sft", "reward_inverts_utility")].holds
    report = (tmp_path / "report.md").read_text()
    assert "quality-utility paradox" in report and "numina_subset/dft: ppl" in report


def test_from_table_names_missing_columns(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("student,objective,stream,reward\ns,dft,a,1.0\n")
    result = CliRunner().invoke(
        app, ["report", "--from-table", str(bad), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code != 0
    with pytest.raises(ValueError, match="total_avg"):
        from_table(bad)


# --------------------------------------------------------------------------------------------
# A hand-made run directory
# --------------------------------------------------------------------------------------------


def _finish(folder: Path, attempt: int = 1) -> None:
    write_json(folder / MANIFEST, {"stage": str(folder), "row_counts": {}, "attempt": attempt})


def make_run_dir(
    tmp_path: Path,
    seed: int = 0,
    accuracy_scale: float = 1.0,
    accuracies: dict[str, float] | None = None,
    seed_spread: float = 0.0,
    **overrides: object,
):
    """Scores, training metrics and per-sample evaluations in the contract layout.
    `accuracy_scale` < 1 moves the streams' accuracies together (noisy ranks, wide intervals);
    `accuracies` replaces STREAM_SHAPE's; with `training.seeds`, training seed k's models are
    `seed_spread * (k - 1)` more accurate."""
    cfg = load_config(
        CONFIGS_DIR / "dryrun.yaml",
        [
            f"output_dir={tmp_path}",
            "report.num_bootstrap=200",
            # The hand-made shapes below are the paper's five streams.
            "streams.enabled=[slm_rft, oracle_refined, oracle_synthesized, numina_subset, style_aligned]",
            "evaluation.benchmarks.synthetic_hard.source.kind=synthetic",
            *(f"{k}={v}" for k, v in overrides.items()),
        ],
    )
    root = cfg.run_dir
    rng = np.random.default_rng(seed)
    rms = cfg.scoring.reward_models
    assert list(STREAM_SHAPE) == cfg.stream_names()
    for student in cfg.students:
        final = root / "streams" / student / "final"
        for stream, (reward, ppl, acc) in STREAM_SHAPE.items():
            ids = [f"p{i:03d}" for i in range(NUM_PROBLEMS)]
            scores = root / "scores" / student / stream
            ppls = rng.lognormal(np.log(ppl), 0.1, NUM_PROBLEMS)
            quarters = {f"q{q}_ppl": ppls * (1.2 - 0.1 * q) for q in range(1, 5)}
            write_parquet(
                scores / "ppl.parquet",
                pd.DataFrame(
                    {
                        "problem_id": ids,
                        "num_tokens": 100,
                        "ppl": ppls,
                        "mean_nll": np.log(ppls),
                        **quarters,
                    }
                ),
            )
            for k, rm in enumerate(rms):
                write_parquet(
                    scores / f"reward-{rm}.parquet",
                    pd.DataFrame(
                        {"problem_id": ids, "reward": rng.normal(reward + k, 0.3, NUM_PROBLEMS)}
                    ),
                )
            symbol = 0.1 + 0.1 * (ppl - 1.5)
            write_parquet(
                scores / "style.parquet",
                pd.DataFrame(
                    {
                        "problem_id": ids,
                        "symbol_freq": symbol,
                        "scaffolding_freq": 0.2 - symbol / 2,
                        "digit_freq": 0.1,
                        "whitespace_freq": 0.2,
                        "word_freq": 0.5 - symbol / 2,
                    }
                ),
            )
            _finish(scores)
            write_parquet(
                final / f"{stream}.parquet",
                pd.DataFrame(
                    {
                        "problem_id": ids,
                        "stream": stream,
                        "retention": rng.integers(3, 6, NUM_PROBLEMS)
                        if stream.startswith(("oracle_refined", "style"))
                        else None,
                    }
                ),
            )
            acc = (accuracies or {}).get(stream, acc)
            for j, objective in enumerate(["sft", "dft"]):
                for k, folder in enumerate(seed_cells(cfg)[objective].values()):
                    cell = f"{student}/{stream}/{folder}"
                    steps = np.arange(1, 21)
                    write_parquet(
                        root / "train" / cell / "metrics.parquet",
                        pd.DataFrame({"step": steps, "ce": ppl / np.sqrt(steps), "loss": 0.1}),
                    )
                    _finish(root / "train" / cell)
                    shift = 0.05 * j + seed_spread * (k - 1)
                    _write_eval(
                        root / "eval" / cell, cfg, rng, 0.45 + accuracy_scale * (acc - 0.45) + shift
                    )
        _write_eval(root / "eval" / student / "base" / "base", cfg, rng, 0.2)
        _finish(final)
    return cfg


def _write_eval(folder: Path, cfg, rng: np.random.Generator, accuracy: float) -> None:
    for bench in cfg.evaluation.benchmarks:
        rows = [
            {
                "problem_id": f"{bench}-{i}",
                "sample_idx": k,
                "correct": bool(rng.random() < accuracy),
                "status": "ok",
                "num_tokens": 50,
                "finish_reason": "stop",
            }
            for i in range(NUM_BENCH_PROBLEMS)
            for k in range(NUM_SAMPLES)
        ]
        rows[0]["correct"], rows[0]["status"] = None, "no_answer"  # unverifiable counts as wrong
        write_parquet(folder / f"{bench}.parquet", rows)
    _finish(folder)


@pytest.fixture
def run_cfg(tmp_path: Path):
    return make_run_dir(tmp_path)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory):
    """One complete run directory and its report, shared by the tests that only read it."""
    cfg = make_run_dir(tmp_path_factory.mktemp("full"))
    return cfg, report_stage.run(cfg)


def test_run_dir_report_has_every_table_and_plot(full_report) -> None:
    run_cfg, out = full_report
    assert (out / MANIFEST).is_file()
    names = {p.name for p in out.iterdir()}
    for student in run_cfg.students:
        for suffix in (
            "ppl_vs_accuracy",
            "quarter_ppl",
            "reward_rank",
            "style_shift",
            "training_curves",
            "total_avg",
            "sft_benchmarks",
            "dft_benchmarks",
        ):
            assert f"{student}_{suffix}.png" in names
            assert Image.open(out / f"{student}_{suffix}.png").size[0] > 300
        for table in (
            f"quality_{student}",
            f"accuracy_{student}_sft",
            f"accuracy_{student}_dft",
            f"style_shift_{student}",
        ):
            assert f"{table}.csv" in names
    assert {"report.md", "report.html", "correlations.csv", "verdict.csv", "missing.csv"} <= names

    corr = pd.read_csv(out / "correlations.csv")
    assert list(corr.columns) == CORRELATION_COLUMNS
    rms = run_cfg.scoring.reward_models
    xs = ["reward", *(f"reward-{rm}" for rm in rms), "ppl", "q1_ppl", "q2_ppl", "q3_ppl", "q4_ppl"]
    assert sorted(set(corr.x)) == sorted(xs)
    assert len(corr) == len(run_cfg.students) * 2 * len(xs) * 2
    assert (corr.n_streams == 5).all() and corr.ci_low.notna().all()
    assert (corr.ci_low <= corr.value + 1e-9).all() or (corr.ci_low <= corr.ci_high).all()
    # `reward` is the first configured reward model.
    first = corr[corr.x == f"reward-{rms[0]}"].value.to_numpy()
    assert np.allclose(corr[corr.x == "reward"].value.to_numpy(), first)
    assert pd.read_csv(out / "missing.csv").empty

    quality = pd.read_csv(out / f"quality_{next(iter(run_cfg.students))}.csv").set_index("stream")
    assert quality.loc["slm_rft", "n_problems"] == NUM_PROBLEMS
    assert quality.index[0] == "base" and np.isnan(quality.loc["base", "ppl"])
    base_acc = pd.read_csv(out / f"accuracy_{next(iter(run_cfg.students))}_dft.csv")
    assert quality.loc["base", "dft total_avg"] == pytest.approx(base_acc.total_avg[0])
    assert {
        f"reward-{rms[0]} ci_low",
        "q4_ppl",
        "retention",
        "symbol_freq",
        "dft total_avg",
    } <= set(quality.columns)
    accuracy = pd.read_csv(out / f"accuracy_{next(iter(run_cfg.students))}_dft.csv")
    assert accuracy.stream.tolist() == ["base", *STREAM_SHAPE]
    verdict = pd.read_csv(out / "verdict.csv")
    assert len(verdict) == len(run_cfg.students) * 2 * 3

    html = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == len(run_cfg.students) * 8
    assert base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in html and "https://" not in html  # opens with no network
    md = (out / "report.md").read_text()
    assert md.count("![") == len(images) and "## Verdict" in md


def test_accuracy_and_interval_match_an_independent_computation(full_report) -> None:
    run_cfg, out = full_report
    root = run_cfg.run_dir
    student, objective = "tiny-qwen", "dft"
    streams = list(STREAM_SHAPE)
    benches = list(run_cfg.evaluation.benchmarks)
    # Avg@k: mean over problems of the fraction of correct samples; null counts as wrong.
    acc = {}
    for s in streams:
        per_bench = []
        for b in benches:
            rows = pd.read_parquet(root / "eval" / student / s / objective / f"{b}.parquet")
            per_bench.append(
                rows.groupby("problem_id").correct.apply(
                    lambda c: c.fillna(False).astype(float).mean()
                )
            )
        acc[s] = per_bench
    totals = [np.mean([p.mean() * 100 for p in acc[s]]) for s in streams]
    table = pd.read_csv(out / f"accuracy_{student}_{objective}.csv").set_index("stream")
    assert table.loc[streams, "total_avg"].to_numpy() == pytest.approx(totals)
    # Spread: std (ddof=1) over the k sample sets of the accuracy each set gives alone.
    rows = pd.read_parquet(
        root / "eval" / student / "slm_rft" / objective / f"{benches[0]}.parquet"
    )
    per_set = rows.correct.fillna(False).astype(float).groupby(rows.sample_idx).mean() * 100
    assert table.loc["slm_rft", f"{benches[0]} spread"] == pytest.approx(per_set.std(ddof=1))
    # The PPL/Total Avg Spearman interval, recomputed with scipy in a plain loop following the
    # documented draw order: every resample of the shared problems, then of each benchmark's.
    ppl = np.stack(
        [
            pd.read_parquet(root / "scores" / student / s / "ppl.parquet")
            .set_index("problem_id")
            .sort_index()
            .ppl.to_numpy()
            for s in streams
        ]
    )
    benches_m = [
        np.stack([acc[s][i].sort_index().to_numpy() for s in streams]) for i in range(len(benches))
    ]
    rng = np.random.default_rng(run_cfg.report.seed)
    num = run_cfg.report.num_bootstrap
    xs = [ppl[:, rng.integers(0, ppl.shape[1], ppl.shape[1])].mean(axis=1) for _ in range(num)]
    ys = [
        [m[:, rng.integers(0, m.shape[1], m.shape[1])].mean(axis=1) for _ in range(num)]
        for m in benches_m
    ]
    values = [
        stats.spearmanr(xs[b], np.mean([per_bench[b] for per_bench in ys], axis=0)).statistic
        for b in range(num)
    ]
    corr = pd.read_csv(out / "correlations.csv")
    row = corr[
        (corr.student == student)
        & (corr.objective == objective)
        & (corr.x == "ppl")
        & (corr.method == "spearman")
    ].iloc[0]
    assert row.value == pytest.approx(stats.spearmanr(ppl.mean(axis=1), totals).statistic)
    assert (row.ci_low, row.ci_high) == pytest.approx(
        (np.quantile(values, 0.025), np.quantile(values, 0.975))
    )


def test_intervals_are_reproducible_from_the_seed(tmp_path: Path) -> None:
    cfg = make_run_dir(tmp_path, accuracy_scale=0.1)  # close accuracies: wide, seed-dependent
    data = from_run_dir(cfg)
    first = correlations(data, BootstrapSettings(num_resamples=200, seed=3))
    again = correlations(from_run_dir(cfg), BootstrapSettings(num_resamples=200, seed=3))
    pd.testing.assert_frame_equal(first, again)
    other = correlations(data, BootstrapSettings(num_resamples=200, seed=4))
    pd.testing.assert_series_equal(first.value, other.value)
    assert not np.allclose(first[["ci_low", "ci_high"]], other[["ci_low", "ci_high"]])
    assert (first.ci_low <= first.ci_high).all()


def test_partial_run_keeps_missing_cells_and_says_so(run_cfg, tmp_path: Path) -> None:
    RunDir.for_config(run_cfg).save_config(run_cfg)
    root = tmp_path / "moved"  # `qup report RUN_DIR` works on a run directory that was moved
    shutil.move(run_cfg.run_dir, root)
    shutil.rmtree(root / "eval" / "tiny-qwen" / "numina_subset" / "dft")
    shutil.rmtree(root / "train" / "tiny-llama")
    (root / "eval" / "tiny-qwen" / "slm_rft" / "sft" / "synthetic_hard.parquet").unlink()
    shutil.rmtree(root / "scores" / "tiny-llama" / "oracle_refined")
    result = CliRunner().invoke(app, ["report", str(root)])
    assert result.exit_code == 0, result.output
    out = root / "report"
    missing = pd.read_csv(out / "missing.csv")
    assert "eval/tiny-qwen/numina_subset/dft/synthetic_test.parquet" in set(missing.path)
    assert "scores/tiny-llama/oracle_refined" in set(missing.path)
    assert (missing.reason == "not trained yet").sum() == len(STREAM_SHAPE) * 2
    dft = pd.read_csv(out / "accuracy_tiny-qwen_dft.csv").set_index("stream")
    assert dft.loc["numina_subset", "status"] == "missing" and np.isnan(
        dft.loc["numina_subset", "total_avg"]
    )
    sft = pd.read_csv(out / "accuracy_tiny-qwen_sft.csv").set_index("stream")
    assert sft.loc["slm_rft", "status"] == "missing synthetic_hard" and np.isnan(
        sft.loc["slm_rft", "total_avg"]
    )
    corr = pd.read_csv(out / "correlations.csv")
    assert set(corr[(corr.student == "tiny-qwen") & (corr.objective == "dft")].n_streams) == {4}
    assert set(corr[(corr.student == "tiny-llama")].n_streams) == {4}  # oracle_refined not scored
    verdict = pd.read_csv(out / "verdict.csv")
    llama_style = verdict[(verdict.student == "tiny-llama") & (verdict.claim == "style_alignment")]
    assert llama_style.holds.isna().all() and "no verdict" in llama_style.text.iloc[0]
    md = (out / "report.md").read_text()
    assert "expected input(s) are absent" in md and "Training curves: no data yet." in md


def test_report_reruns_only_when_an_input_finishes(run_cfg) -> None:
    out = report_stage.run(run_cfg)
    stamp = read_json(out / MANIFEST)["timings"]["finished"]
    assert read_json(report_stage.run(run_cfg) / MANIFEST)["timings"]["finished"] == stamp
    _finish(run_cfg.run_dir / "eval" / "tiny-qwen" / "slm_rft" / "dft", attempt=2)  # finished anew
    assert read_json(report_stage.run(run_cfg) / MANIFEST)["timings"]["finished"] != stamp


# --------------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_chromium
def test_report_html_renders_in_headless_chromium(full_report, tmp_path: Path) -> None:
    _, out = full_report
    assert_page_and_plots_render(out / "report.html", tmp_path)


def test_streams_left_out_of_training_are_not_missing(tmp_path: Path) -> None:
    trained = ["slm_rft", "oracle_refined", "style_aligned_rule"]
    cfg = make_run_dir(tmp_path, **{"training.streams": f"[{','.join(trained)}]"})
    unit = cfg.run_dir / "eval" / "tiny-qwen" / "slm_rft" / "sft" / "synthetic_test"
    unit.mkdir()  # a (model, benchmark) unit without its manifest: still being evaluated
    data = from_run_dir(cfg)
    assert data.untrained == {"oracle_synthesized", "numina_subset"}
    assert [m["what"] for m in data.missing] == ["eval tiny-qwen/slm_rft/sft synthetic_test"]
    assert data.missing[0]["reason"] == "being evaluated"
    corr = correlations(data, BootstrapSettings(num_resamples=50))
    assert set(corr[corr.objective == "dft"].n_streams) == {3}
    assert set(corr[(corr.student == "tiny-qwen") & (corr.objective == "sft")].n_streams) == {2}
    table = accuracy_table(data, "tiny-qwen", "dft").set_index("stream")
    assert table.loc["numina_subset", "status"] == "not trained (training.streams)"
    assert table.loc["slm_rft", "status"] == "ok"


def test_report_of_a_run_with_nothing_scored_is_a_user_error(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", [f"output_dir={tmp_path}"])
    RunDir.for_config(cfg).save_config(cfg)
    result = CliRunner().invoke(app, ["report", str(cfg.run_dir)])
    assert isinstance(result.exception, StageError) and "nothing to report yet" in str(
        result.exception
    )


# --------------------------------------------------------------------------------------------
# Training seeds pooled
# --------------------------------------------------------------------------------------------

SEEDS = "[0, 1, 2]"


def _per_problem(path: Path) -> pd.Series:
    rows = pd.read_parquet(path)
    return rows.groupby("problem_id").correct.apply(lambda c: c.fillna(False).astype(float).mean())


def test_report_pools_three_seeds_with_intervals(tmp_path: Path) -> None:
    cfg = make_run_dir(tmp_path, seed_spread=0.04, **{"training.seeds": SEEDS})
    out = report_stage.run(cfg)
    root, student, stream = cfg.run_dir, "tiny-qwen", "slm_rft"
    benches = list(cfg.evaluation.benchmarks)
    folders = seed_cells(cfg)["dft"]
    assert folders == {0: "dft", 1: "dft-seed1", 2: "dft-seed2"}
    # One table per objective, seeds pooled, never one per seed.
    names = {p.name for p in out.iterdir()}
    assert f"accuracy_{student}_dft.csv" in names
    assert not any("seed1" in n for n in names) and f"{student}_total_avg.png" in names

    # Per-seed Total Avg, then the mean over seeds, recomputed from the sample files.
    acc = {  # seed -> benchmark -> per-problem accuracy (percent)
        seed: {
            b: _per_problem(root / "eval" / student / stream / folder / f"{b}.parquet") * 100
            for b in benches
        }
        for seed, folder in folders.items()
    }
    per_seed = {seed: np.mean([acc[seed][b].mean() for b in benches]) for seed in folders}
    seeds_csv = pd.read_csv(out / "seeds.csv")
    mine = seeds_csv[(seeds_csv.student == student) & (seeds_csv.stream == stream)]
    mine = mine[mine.objective == "dft"].set_index("seed")
    assert mine.total_avg.to_dict() == pytest.approx(per_seed)
    assert mine.cell.tolist() == [f"{student}/{stream}/{f}" for f in folders.values()]
    assert len(seeds_csv) == len(cfg.students) * len(STREAM_SHAPE) * 2 * 3

    table = pd.read_csv(out / f"accuracy_{student}_dft.csv").set_index("stream")
    assert table.loc[stream, "n_seeds"] == 3
    assert table.loc[stream, "total_avg"] == pytest.approx(np.mean(list(per_seed.values())))
    # Its interval: the hand loop over seeds and each benchmark's problems.
    groups = [np.stack([acc[s][b].sort_index().to_numpy() for s in folders]) for b in benches]
    means = hand_bootstrap(groups, cfg.report.num_bootstrap, cfg.report.seed)
    assert (table.loc[stream, "total_avg ci_low"], table.loc[stream, "total_avg ci_high"]) == (
        pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)))
    )

    # Paired differences: refined minus own, seed by seed and problem by problem (the same
    # draws as a Total Avg's), and minus the one base model.
    refined = {
        seed: {
            b: _per_problem(root / "eval" / student / "oracle_refined" / f / f"{b}.parquet") * 100
            for b in benches
        }
        for seed, f in folders.items()
    }
    base = {
        b: _per_problem(root / "eval" / student / "base" / "base" / f"{b}.parquet") * 100
        for b in benches
    }
    diffs = pd.read_csv(out / f"differences_{student}_dft.csv").set_index("stream")
    assert "slm_rft" in diffs.index and pd.isna(diffs.loc["slm_rft", "total_avg - slm_rft"])
    for col, other in (("total_avg - slm_rft", acc), ("total_avg - base", None)):
        groups = []
        for b in benches:
            mine = np.stack([refined[s][b].sort_index().to_numpy() for s in folders])
            ref = (
                np.stack([other[s][b].sort_index().to_numpy() for s in folders])
                if other is not None
                else base[b].sort_index().to_numpy()[None]
            )
            groups.append(mine - ref)
        means = hand_bootstrap(groups, cfg.report.num_bootstrap, cfg.report.seed)
        row = diffs.loc["oracle_refined"]
        assert row[col] == pytest.approx(np.mean([g.mean() for g in groups]))
        assert (row[f"{col} ci_low"], row[f"{col} ci_high"]) == pytest.approx(
            (np.quantile(means, 0.025), np.quantile(means, 0.975))
        )
    assert diffs.loc["oracle_refined", "total_avg - slm_rft ci_high"] < 0  # 0.45 vs 0.60
    assert "Paired differences, dft" in (out / "report.md").read_text()

    corr = pd.read_csv(out / "correlations.csv")
    assert set(corr.objective) == {"sft", "dft"} and corr.ci_low.notna().all()
    verdict = pd.read_csv(out / "verdict.csv").set_index(["student", "objective", "claim"])
    paradox = verdict.loc[(student, "dft", "reward_inverts_utility")]
    assert paradox.outcome == "holds" and paradox.text.startswith("Holds.")
    md = (out / "report.md").read_text()
    assert "Training seeds 0, 1, 2" in md and "seeds.csv" in md

    # A seed still missing a benchmark is left out of the pooled values, and listed.
    gone = f"eval/{student}/{stream}/dft-seed2/{benches[0]}.parquet"
    (root / gone).unlink()
    data = from_run_dir(cfg)
    row = data.measures(student, "dft").loc[stream]
    assert row.n_seeds == 2 and row.total_avg == pytest.approx((per_seed[0] + per_seed[1]) / 2)
    assert gone in {m["path"] for m in data.missing}


@pytest.mark.parametrize(
    ("case", "outcome"),
    [("paper", "holds"), ("reversed", "does not hold"), ("flat", "inconclusive")],
)
def test_verdict_says_holds_does_not_hold_or_inconclusive(
    tmp_path: Path, case: str, outcome: str
) -> None:
    kwargs: dict = {}
    if case == "reversed":  # more reward, more accuracy: the paradox's opposite
        kwargs["accuracies"] = {"style_aligned_rule": 0.15, "slm_rft": 0.3,
                                "oracle_refined": 0.45, "numina_subset": 0.6,
                                "oracle_synthesized": 0.75}  # fmt: skip
    if case == "flat":  # every stream as accurate as every other: noise only
        kwargs["accuracy_scale"] = 0.0
    cfg = make_run_dir(tmp_path, seed_spread=0.02, **kwargs, **{"training.seeds": SEEDS})
    data = from_run_dir(cfg)
    settings = BootstrapSettings(num_resamples=200)
    data.streams = with_total_avg_intervals(data, settings)
    verdict = verdicts(data, correlations(data, settings), settings)
    verdict = verdict[verdict.objective == "dft"].set_index(["student", "claim"])
    for student in cfg.students:
        row = verdict.loc[(student, "reward_inverts_utility")]
        assert row.outcome == outcome, row.text
        assert {True: "holds", False: "does not hold"}.get(row.holds, "inconclusive") == outcome
    if case == "reversed":
        row = verdict.loc[("tiny-qwen", "reward_inverts_utility")]
        assert "does not hold in this run: that is the result" in row.text
        style = verdict.loc[("tiny-qwen", "style_alignment")]
        assert style.outcome == "does not hold"  # style_aligned far below oracle_refined
