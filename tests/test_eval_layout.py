"""The eval stage's cells, units and status rows, and its summary tables, without engines."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qup_ray.config import CONFIGS_DIR, load_config
from qup_ray.rundir import BLOCKED, RunDir, StageError, eval_cells, expected_stage_dirs
from qup_ray.stages import eval as eval_stage


@pytest.fixture
def cfg(tmp_path: Path):
    return load_config(CONFIGS_DIR / "dryrun.yaml", [f"output_dir={tmp_path}"])


def test_cells_are_base_students_then_train_cells(cfg):
    cells = eval_cells(cfg)
    assert cells[:2] == ["tiny-qwen/base/base", "tiny-llama/base/base"]
    # 2 students x 8 streams x 2 objectives trained models after the two base students.
    assert len(cells) == 2 + 32 and "tiny-llama/style_aligned_rule/dft" in cells
    no_base = load_config(CONFIGS_DIR / "dryrun.yaml", ["evaluation.evaluate_base=false"])
    assert eval_cells(no_base) == cells[2:]


def test_status_lists_every_model_and_its_benchmark_units(cfg):
    rows = [rel for kind, rel in expected_stage_dirs(cfg) if kind == "eval"]
    assert rows[:2] == ["eval/tiny-qwen/base/base", "eval/tiny-qwen/base/base/synthetic_test"]
    assert len(rows) == len(eval_cells(cfg)) * (1 + len(cfg.evaluation.benchmarks))
    paper = load_config(CONFIGS_DIR / "paper.yaml")
    units = [rel for kind, rel in expected_stage_dirs(paper) if kind == "eval"]
    assert f"eval/{next(iter(paper.students))}/base/base/olympiadbench" in units


def test_missing_export_is_blocked_and_shown_by_status(cfg):
    run = RunDir.for_config(cfg)
    path, train_dir = eval_stage.model_source(cfg, run, "tiny-qwen/slm_rft/sft")
    assert path is None and train_dir == run.root / "train" / "tiny-qwen" / "slm_rft" / "sft"
    state = eval_stage.prepare_cell(cfg, run, "tiny-qwen/slm_rft/sft", {}, force=False)
    assert state == "blocked"
    blocked = json.loads((run.root / "eval/tiny-qwen/slm_rft/sft" / BLOCKED).read_text())
    assert "no exported model" in blocked["reason"]
    rows = {r["path"]: r for r in run.status(cfg)}
    assert rows["eval/tiny-qwen/slm_rft/sft"]["state"] == "blocked"
    assert rows["eval/tiny-qwen/slm_rft/sft/synthetic_test"]["state"] == "missing"


def test_unknown_cells_are_refused(cfg):
    with pytest.raises(StageError, match="unknown eval cells"):
        eval_stage.run(cfg, cells=["tiny-qwen/nope/sft"])


def test_totals_only_for_models_with_every_benchmark(cfg):
    cfg = load_config(
        CONFIGS_DIR / "dryrun.yaml",
        ["evaluation.benchmarks.second={source: {kind: synthetic, num_synthetic: 5, seed: 9}}"],
    )
    summary = [
        {"student": "a", "stream": "base", "objective": "base", "benchmark": "synthetic_test",
         "avg_at_k": 0.25},
        {"student": "a", "stream": "base", "objective": "base", "benchmark": "second",
         "avg_at_k": 0.75},
        {"student": "b", "stream": "s", "objective": "sft", "benchmark": "second",
         "avg_at_k": 1.0},
    ]  # fmt: skip
    assert eval_stage.totals_rows(cfg, summary) == [
        {"student": "a", "stream": "base", "objective": "base", "total_avg": 0.5,
         "num_benchmarks": 2}
    ]  # fmt: skip


def test_batches_never_straddle_shards():
    assert eval_stage.engine_batch_size(64, 256) == 64
    assert eval_stage.engine_batch_size(64, 40) == 40
    assert eval_stage.engine_batch_size(64, 100) == 50
    assert eval_stage.engine_batch_size(7, 4) == 4


def test_busy_seconds_is_the_union_of_unit_windows():
    windows = [(0, 10), (2, 8), (9, 12), (20, 21)]
    manifests = [{"timings": {"started": a, "finished": b}} for a, b in windows] + [{}]
    assert eval_stage.busy_seconds(manifests) == 12 + 1


def test_summary_tables_are_typed_even_when_empty(cfg):
    run = RunDir.for_config(cfg)
    out = eval_stage.write_summaries(cfg, run, {"synthetic_test": []}, {})
    summary = pq.read_table(out / "summary.parquet")
    assert summary.num_rows == 0
    assert summary.schema.field("avg_at_k").type == pa.float64()
    assert summary.schema.names[-3:] == ["unverifiable_rate", "mean_tokens", "num_rejected"]
    assert "pass_at_4" in summary.schema.names and "pass_at_8" not in summary.schema.names
    assert pq.read_table(out / "totals.parquet").schema.names == [
        "student", "stream", "objective", "total_avg", "num_benchmarks"
    ]  # fmt: skip
    assert json.loads((out / "_manifest.json").read_text())["row_counts"]["summary"] == 0


def test_models_side_by_side_fit_the_gpus(cfg):
    assert eval_stage.models_side_by_side(cfg, cluster_gpus=0) == 1  # CPU engines: one at a time
    engine = {"num_actors": 2, "num_gpus_per_actor": 1}  # each model takes 2 GPUs
    gpu = load_config(
        CONFIGS_DIR / "dryrun.yaml",
        [f"students.{s}.engine.{k}={v}" for s in cfg.students for k, v in engine.items()],
    )
    assert eval_stage.models_side_by_side(gpu, cluster_gpus=8) == 4
    assert eval_stage.models_side_by_side(gpu, cluster_gpus=3) == 1
    capped = load_config(CONFIGS_DIR / "dryrun.yaml", [
        *[f"students.{s}.engine.{k}={v}" for s in cfg.students for k, v in engine.items()],
        "evaluation.max_parallel_models=2",
    ])  # fmt: skip
    assert eval_stage.models_side_by_side(capped, cluster_gpus=64) == 2
