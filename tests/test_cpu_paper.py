"""`configs/cpu_paper.yaml`, the paper's experiment on 2 CPU cores (issue #20): the config holds the
issue's design, and a reduced version of it (a handful of problems) runs through the grid's local
executor to a report that pools training seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qup_ray.config import CONFIGS_DIR, OBJECTIVES, STREAMS, load_cluster_config, load_config
from qup_ray.grid.plan import plan_grid
from qup_ray.rundir import RunDir, eval_cells, train_cells

CONFIG = CONFIGS_DIR / "cpu_paper.yaml"
LOCAL = CONFIGS_DIR / "clusters" / "local.yaml"

# A few dozen problems (a handful reach every stream), two seeds, one objective, three streams, one
# student and one reward model, a small benchmark: every stage of the config runs, on the grid's
# code path, in a few minutes. (The second student and reward model would only repeat the same
# code path; the config test above checks that the full config has both.)
_QWEN = load_config(CONFIG).students["tiny-qwen"].model_dump(mode="json")
REDUCED = [
    "problems.num_problems=40",
    "rollouts.shard_size=20",
    "students={tiny-qwen: " + json.dumps(_QWEN) + "}",
    "scoring.reward_models=[tiny-qwen-rm]",
    "streams.enabled=[slm_rft,oracle_refined,style_aligned]",
    "training.objectives=[sft]",
    "training.seeds=[0,1]",
    "training.global_batch_size=8",
    "evaluation.num_samples=2",
    "evaluation.shard_size=8",
    "evaluation.benchmarks.synthetic_test.source.num_synthetic=8",
    "scoring.num_bootstrap=50",
]


def test_cpu_paper_config_is_the_issue_design(tmp_path: Path):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}"])
    assert len(cfg.students) == 2
    assert cfg.rollouts.num_samples_per_problem == 8 and cfg.rollouts.temperature == 1.0
    assert cfg.problems.num_problems >= 400  # the shared set keeps several hundred of them
    assert set(cfg.streams.enabled) == set(STREAMS)  # the paper's streams and the compat ones
    assert set(cfg.training.objectives) == set(OBJECTIVES)
    assert len(cfg.training.seeds or []) >= 3 and cfg.training.seed in cfg.training.seeds
    assert cfg.evaluation.num_samples == 16
    (bench,) = cfg.evaluation.benchmarks.values()
    assert bench.source.num_synthetic >= 200
    assert bench.source.seed != cfg.problems.source.seed  # held out
    plan = plan_grid(cfg, load_cluster_config(LOCAL), tmp_path / "run")
    cells = [f"{s}/{st}/{c}" for s in cfg.students for st in cfg.stream_names()
             for c in train_cells(cfg)]  # fmt: skip
    assert len(cells) == 2 * len(cfg.stream_names()) * 2 * len(cfg.training.seeds)
    assert len(eval_cells(cfg)) == len(cells) + 2  # and both base students
    jobs = {j.stage: j for j in plan.jobs}
    assert list(jobs) == ["problems", "rollouts", "streams", "score", "train", "eval", "report"]
    assert sorted(jobs["train"].cells or []) == sorted(cells)
    assert sorted(jobs["eval"].cells or []) == sorted(eval_cells(cfg))


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(2400)
def test_cpu_paper_reduced_runs_through_the_grid_to_a_report_pooling_seeds(
    tmp_path: Path, cpu_world
):
    args = ["-c", str(CONFIG), "--cluster", str(LOCAL), f"output_dir={tmp_path}", *REDUCED]
    result = subprocess.run(
        [sys.executable, "-m", "qup_ray.cli", "grid", *args],
        capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "cpu_paper"
    cfg = load_config(run_dir / "config.yaml")
    states = {r["path"]: r["state"] for r in RunDir(run_dir).status(cfg)}
    assert states and set(states.values()) == {"done"}, states
    report = run_dir / "report"
    seeds = pd.read_csv(report / "seeds.csv")
    assert set(seeds["seed"]) == {0, 1}
    # Each trained cell's own Total Avg is in seeds.csv, once per seed: one student x three
    # streams x two seeds.
    assert list(cfg.students) == ["tiny-qwen"] and len(cfg.stream_names()) == 3
    assert len(seeds) == 3 * 2, seeds
    assert (seeds.groupby(["student", "stream", "objective"]).size() == 2).all(), seeds
    verdict = pd.read_csv(report / "verdict.csv")
    assert (
        len(verdict)
        and verdict["outcome"].isin(["holds", "does not hold", "inconclusive", "no verdict"]).all()
    )
    assert (report / "report.html").is_file()
