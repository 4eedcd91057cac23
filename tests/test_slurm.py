"""The grid on a real SLURM: the single-node cluster of `slurm/local-cluster.sh` (munge, MariaDB,
slurmdbd, slurmctld, slurmd), started once per session.

A tiny grid of the dry-run config (one student, 16 problems, shards of 4) goes through submitit
with `afterok` dependencies; each job runs its own Ray cluster. The results are compared with the
same stages run directly with `qup run`; a job requeued mid-stage with `scontrol requeue` and a
job that hits its time limit both resume and finish without duplicate rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from qup_ray.config import CONFIGS_DIR, REPO_ROOT, ClusterConfig, dump_config, load_config
from qup_ray.grid import launch
from qup_ray.grid.submit import slurm_states, wait_for_slurm
from qup_ray.rundir import MANIFEST

# Engines start and a grid waits for its jobs: minutes on 2 cores, more than the default limit.
pytestmark = [pytest.mark.slurm, pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(3600)]

# 32 samples per problem: shards take seconds each on 2 cores, so interruptions land between them.
NUM_PROBLEMS, SHARD_SIZE, SAMPLES = 16, 4, 32


def qup(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qup_ray.cli", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local SLURM cluster (installed and started by the script, idempotently)."""
    if os.geteuid() != 0 and shutil.which("sinfo") is None:
        pytest.skip("the local SLURM cluster needs root (or an installed, running SLURM)")
    result = subprocess.run([str(REPO_ROOT / "slurm" / "local-cluster.sh"), "start"],
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def cluster_config(**changes) -> ClusterConfig:
    # The whole 2-core node per job: jobs run one at a time, as their dependencies want anyway.
    fields = {"executor": "slurm", "partition": "debug", "gpus_per_node": 0, "cpus_per_node": 2,
              "mem_gb": 8, "timeout_min": 30, "max_requeues": 3, "signal_delay_s": 30}  # fmt: skip
    return ClusterConfig(**{**fields, **changes})


def experiment(out: Path, cpu_world, extra: list[str] = ()):
    """The dry-run config cut to one student, no reward models and (unless `extra` says
    otherwise) the slm_rft stream only, run under `out`."""
    base = load_config(CONFIGS_DIR / "dryrun.yaml")
    # Engine calls of one shard each, so shards finish one by one and a requeue lands mid-stage.
    engine = {**base.students["tiny-qwen"].engine.model_dump(mode="json"), "batch_size": SHARD_SIZE}
    student = json.dumps({**base.students["tiny-qwen"].model_dump(mode="json"), "engine": engine})
    overrides = [f"output_dir={out}", f"problems.num_problems={NUM_PROBLEMS}",
                 f"rollouts.shard_size={SHARD_SIZE}", f"rollouts.num_samples_per_problem={SAMPLES}",
                 "students={tiny-qwen: " + student + "}",
                 "scoring.reward_models=[]", "reward_models={}",  # so: no reward_select
                 "streams.enabled=[slm_rft]", *extra]  # fmt: skip
    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", overrides)
    path = out / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))
    return cfg, path


def rows(path: Path) -> list[dict]:
    key = lambda r: (r["problem_id"], r.get("sample_idx", 0))  # noqa: E731
    return sorted(pq.read_table(path).to_pylist(), key=key)


def wait_until(what: str, check, timeout_s: float = 900, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"gave up waiting for {what}")


def other_address() -> str:
    """A non-loopback IPv4 address of this machine."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    pytest.skip("no non-loopback address to check the dashboard against")


def scontrol_job(job_id: str) -> str:
    return subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True
    ).stdout


def release_requeued(job_id: str) -> None:
    """SLURM holds a requeued job until a begin time some two minutes on; starting it at once
    saves CI that wait (the requeue itself is what the tests check)."""
    wait_until("the requeued job to pend", lambda: "JobState=PENDING" in scontrol_job(job_id)
               or "JobState=RUNNING" in scontrol_job(job_id), timeout_s=300, poll_s=1)  # fmt: skip
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                   capture_output=True, check=False)  # fmt: skip


def own_ray_processes(job_id: str) -> list[int]:
    marker = re.compile(rf"qup-ray-{job_id}(?![\w.-])")
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(marker.search(part) for part in p.info["cmdline"] or [])]  # fmt: skip


@pytest.fixture(scope="session")
def direct_run(tmp_path_factory, cpu_world) -> Path:
    """problems and rollouts run directly (`qup run`), the reference for the grid's results."""
    out = tmp_path_factory.mktemp("direct")
    _, path = experiment(out, cpu_world)
    for stage in ("problems", "rollouts"):
        result = qup("run", stage, "-c", str(path))
        assert result.returncode == 0, result.stderr[-3000:]
    return out / "dryrun"


def test_grid_requeued_mid_stage_matches_the_direct_run(
    slurm_cluster, cpu_world, direct_run: Path, tmp_path: Path
):
    cfg, _ = experiment(tmp_path, cpu_world)
    run = tmp_path / "dryrun"
    result = launch(cfg, cluster_config(), stages=["problems", "rollouts"])
    ids = result.job_ids
    assert set(ids) == {"problems", "rollouts"}
    assert f"Dependency=afterok:{ids['problems']}" in scontrol_job(ids["rollouts"])

    # The rollouts job's own Ray cluster: dashboard on 127.0.0.1 only.
    head = run / "grid" / "ray" / f"{ids['rollouts']}.0" / "head.json"
    wait_until("the rollouts job's Ray head", head.is_file)
    port = json.loads(head.read_text())["ports"]["dashboard"]

    def dashboard_answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until("the dashboard on 127.0.0.1", dashboard_answers, timeout_s=120)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((other_address(), port), timeout=5).close()

    # Requeue mid-stage: after its first shard, before its last.
    shards = run / "rollouts" / "tiny-qwen" / "_shards"
    wait_until("a first rollouts shard", lambda: list(shards.glob("shard-*.parquet")), poll_s=0.2)
    finished_before = len(list(shards.glob("shard-*.parquet")))
    subprocess.run(["scontrol", "requeue", ids["rollouts"]], check=True)
    release_requeued(ids["rollouts"])
    states = wait_for_slurm(ids, timeout_s=1500)
    assert states == {"problems": "COMPLETED", "rollouts": "COMPLETED"}
    assert 1 <= finished_before < NUM_PROBLEMS // SHARD_SIZE, "the requeue came too late"
    assert (run / "grid" / "ray" / f"{ids['rollouts']}.1" / "head.json").is_file()
    log = next((run / "slurm_logs" / ids["rollouts"]).glob("*.out")).read_text()
    assert f"resuming, {finished_before} of 4 shards already finished" in log

    # The same results as running the stages directly, no duplicate rows.
    assert rows(run / "problems" / "problems.parquet") == rows(
        direct_run / "problems" / "problems.parquet"
    )
    grid_rollouts = rows(run / "rollouts" / "tiny-qwen" / "rollouts.parquet")
    assert len(grid_rollouts) == NUM_PROBLEMS * SAMPLES
    assert len({(r["problem_id"], r["sample_idx"]) for r in grid_rollouts}) == len(grid_rollouts)
    assert grid_rollouts == rows(direct_run / "rollouts" / "tiny-qwen" / "rollouts.parquet")
    assert not own_ray_processes(ids["rollouts"]), "the job left Ray processes behind"

    # `qup status` shows each cell's job id and state; a rerun submits nothing.
    status = qup("status", str(run), timeout=120)
    assert status.returncode == 0, status.stderr
    lines = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:-1]}
    assert lines["problems"][1:4] == ["done", ids["problems"], "COMPLETED"]
    assert lines["rollouts/tiny-qwen"][1:4] == ["done", ids["rollouts"], "COMPLETED"]
    again = launch(cfg, cluster_config(), stages=["problems", "rollouts"])
    assert again.job_ids == {}


def test_job_hitting_its_time_limit_requeues_and_resumes(slurm_cluster, cpu_world, tmp_path):
    """Once rollouts are mid-stage, the job's time limit is cut to a minute or two from now:
    SLURM sends USR2 `signal_delay_s` before it, submitit calls the job's `checkpoint()` and
    requeues it, and the next attempt resumes from the shards. (Cutting the limit at a known
    point makes the test independent of how long engines take to start on a busy machine.)"""
    problems = 16 * NUM_PROBLEMS  # 64 shards: minutes of generation, USR2 falls among them
    cfg, _ = experiment(tmp_path, cpu_world, [f"problems.num_problems={problems}"])
    run = tmp_path / "dryrun"
    # submitit counts USR2 in a job of at most 10 minutes as a time-out, not a preemption.
    result = launch(cfg, cluster_config(timeout_min=10, signal_delay_s=60),
                    stages=["problems", "rollouts"])  # fmt: skip
    job_id = result.job_ids["rollouts"]
    shards = run / "rollouts" / "tiny-qwen" / "_shards"
    wait_until("a first rollouts shard", lambda: list(shards.glob("shard-*.parquet")), poll_s=0.2)
    run_s = sum(int(x) * f for x, f in zip(
        re.search(r"RunTime=(\d+):(\d+):(\d+)", scontrol_job(job_id)).groups(),
        (3600, 60, 1), strict=True))  # fmt: skip
    # The limit ends 1-2 minutes from now; USR2 comes 60 s (+ up to 30 s) before it.
    limit_min = run_s // 60 + 2
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit_min}"], check=True)
    wait_until("the requeue", lambda: re.search(r"Restarts=1|JobState=(COMPLETED|FAILED)",
                                                 scontrol_job(job_id)), timeout_s=600)  # fmt: skip
    assert "Restarts=1" in scontrol_job(job_id), "the stage finished before its time limit"
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True)
    release_requeued(job_id)
    states = wait_for_slurm(result.job_ids, timeout_s=1800)
    assert states == {"problems": "COMPLETED", "rollouts": "COMPLETED"}, slurm_states([job_id])
    log = "\n".join(p.read_text() for p in (run / "slurm_logs" / job_id).glob("*.out"))
    assert "this job is timed-out" in log
    assert "resuming," in log
    assert (run / "grid" / "ray" / f"{job_id}.1" / "head.json").is_file()  # a second attempt
    got = rows(run / "rollouts" / "tiny-qwen" / "rollouts.parquet")
    assert len({(r["problem_id"], r["sample_idx"]) for r in got}) == len(got) == problems * SAMPLES
    assert not own_ray_processes(job_id)


def test_grid_of_train_and_eval_cells(slurm_cluster, cpu_world, direct_run: Path, tmp_path: Path):
    """The streams job, two training cells (one SLURM array) after it and their evaluations (an
    array whose task i waits for training task i), each job on its own Ray cluster. Problems and
    rollouts are the direct run's (the same config sections): the grid finds them finished and
    submits neither (the requeue test above runs both on SLURM)."""
    cells = ["tiny-qwen/slm_rft/sft", "tiny-qwen/oracle_refined/sft"]
    cfg, _ = experiment(tmp_path, cpu_world, [
        "streams.enabled=[slm_rft, oracle_refined]", "streams.style_oracles=[]",
        "training.objectives=[sft]", "evaluation.max_problems_per_benchmark=8",
        "evaluation.shard_size=4"])  # fmt: skip
    run = tmp_path / "dryrun"
    # The rollouts stage's outputs: its rollouts, the problem set and the slm_rft stream.
    for output in ("problems", "rollouts", "problem_set", "streams/tiny-qwen/slm_rft"):
        shutil.copytree(direct_run / output, run / output)
    stages = ["problems", "rollouts", "streams", "train", "eval"]
    result = launch(cfg, cluster_config(timeout_min=60), stages=stages, cells=cells)
    assert [j.stage for j in result.plan.jobs if j.done] == ["problems", "rollouts"]
    ids = result.job_ids
    assert list(ids) == ["streams", *(f"train/{c}" for c in cells),
                         *(f"eval/{c}" for c in cells)]  # fmt: skip
    train_array = ids[f"train/{cells[0]}"].split("_")[0]
    assert [ids[f"train/{c}"] for c in cells] == [f"{train_array}_0", f"{train_array}_1"]
    assert f"afterok:{ids['streams']}" in scontrol_job(ids[f"train/{cells[0]}"])
    assert f"aftercorr:{train_array}" in scontrol_job(ids[f"eval/{cells[1]}"])
    states = wait_for_slurm(ids, timeout_s=3000)
    assert set(states.values()) == {"COMPLETED"}, states
    k = cfg.evaluation.num_samples
    for cell in cells:
        assert (run / "train" / cell / MANIFEST).is_file()
        assert (run / "train" / cell / "model" / "config.json").is_file()
        assert (run / "eval" / cell / MANIFEST).is_file()
        evaluated = pq.read_table(run / "eval" / cell / "synthetic_test.parquet")
        assert evaluated.num_rows == 8 * k
    status = qup("status", str(run), timeout=120)
    lines = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:-1]}
    for cell in cells:
        assert lines[f"train/{cell}"][1:4] == ["done", ids[f"train/{cell}"], "COMPLETED"]
