"""Submitting a grid plan through submitit, and reading back where its jobs are.

- `executor: slurm`: every pending job is submitted at once, SLURM holds each until its
  dependencies succeed (`afterok`). Jobs of one shape go out as one job array; an evaluation
  array whose cells mirror a training array waits task by task (`aftercorr`: eval of cell i
  starts when training of cell i succeeded, not when the whole array did).
- `executor: local` / `debug`: the same jobs run one after another in dependency order on this
  machine (submitit's local executor: its own process, log files, timeout and requeue
  handling); a job whose dependency failed is not run, as SLURM would never start it. One Ray
  cluster serves them all (each job's driver joins it): Ray's start-up and teardown are paid
  once, not per job. It is stopped after the last job, also on a failure, Ctrl-C or SIGTERM.

`<run>/grid/` holds `plan.json` and `plan.txt` (what was planned), `jobs.json` (each job's name,
stage, cells, outputs, resources and job id; merged over reruns) and `ray/<job id>.<attempt>/`
(where each job's Ray head listens; a local grid's one cluster: `ray/local-<hash>/`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qup_ray.config import ClusterConfig, ExperimentConfig, dump_config
from qup_ray.grid import ray_cluster
from qup_ray.grid.job import StageJob, exit_on_sigterm
from qup_ray.grid.plan import GridPlan, Job, format_plan, plan_grid
from qup_ray.rundir import RunDir, read_json, write_json, write_text

logger = logging.getLogger(__name__)

Progress = Callable[[str, str, str], None]
"""`progress(job name, job id, state)`, called on submission and on every state change. A local
grid also reports its shared Ray cluster as `progress(SHARED_RAY, address, "STARTED" |
"STOPPED")`."""

SHARED_RAY = "ray"

FINAL_OK = "COMPLETED"
# States after which a SLURM job does not run again on its own.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED_FINAL", "DEPENDENCY_FAILED", "INTERRUPTED"}  # fmt: skip


@dataclass
class GridResult:
    """What `launch` did: the plan, the job id of every submitted job, and (when it waited) the
    final state of each."""

    run_dir: Path
    plan: GridPlan
    plan_text: str
    job_ids: dict[str, str] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    shared_ray: dict[str, float] = field(default_factory=dict)
    """A local grid's shared Ray cluster: `start_s` and `stop_s` (seconds each took)."""

    @property
    def ok(self) -> bool:
        return all(self.states.get(name) == FINAL_OK for name in self.job_ids)


def _setup_lines(cluster: ClusterConfig) -> list[str]:
    env = [f"export {k}={shlex.quote(v)}" for k, v in cluster.env.items()]
    return [*cluster.setup, *env]


def make_executor(cluster: ClusterConfig, folder: Path, job: Job, dependency: str | None = None):
    """A submitit executor for one job's shape."""
    import submitit

    res = job.resources
    if cluster.executor == "debug":
        return submitit.DebugExecutor(folder)
    if cluster.executor == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=cluster.max_requeues)
        ex.update_parameters(timeout_min=res.timeout_min, gpus_per_node=res.gpus_per_node,
                             signal_delay_s=cluster.signal_delay_s, setup=_setup_lines(cluster))  # fmt: skip
        return ex
    ex = submitit.SlurmExecutor(folder, max_num_timeout=cluster.max_requeues)
    extra: dict[str, Any] = dict(cluster.sbatch_extra)
    if dependency:
        extra["dependency"] = dependency
    if cluster.account:
        extra["account"] = cluster.account
    params: dict[str, Any] = {
        "job_name": f"qup-{job.array or job.name}".replace("/", "-"),
        "nodes": res.nodes, "ntasks_per_node": 1, "cpus_per_task": res.cpus_per_node,
        "mem": f"{int(res.mem_gb * 1024)}M", "time": res.timeout_min,
        "signal_delay_s": cluster.signal_delay_s, "setup": _setup_lines(cluster),
        "additional_parameters": extra, "stderr_to_stdout": True,
    }  # fmt: skip
    for key in ("partition", "qos", "constraint"):
        if getattr(cluster, key):
            params[key] = getattr(cluster, key)
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    ex.update_parameters(**params)
    return ex


def _stage_job(job: Job, cfg: ExperimentConfig, cluster: ClusterConfig,
               shared_ray: dict | None = None) -> StageJob:  # fmt: skip
    return StageJob(job.name, job.stage, job.cells, cfg, cluster, job.resources, os.getcwd(),
                    shared_ray)  # fmt: skip


def _submission_units(plan: GridPlan) -> list[list[Job]]:
    """Pending jobs grouped into submissions (arrays or single jobs), dependencies first."""
    units: list[list[Job]] = []
    arrays: dict[str, list[Job]] = {}
    for job in plan.pending:
        if job.array:
            if job.array not in arrays:
                arrays[job.array] = []
                units.append(arrays[job.array])
            arrays[job.array].append(job)
        else:
            units.append([job])
    return units


def _dependency(unit: list[Job], ids: dict[str, str], arrays: dict[str, list[Job]]) -> str | None:
    """The sbatch `--dependency` of a unit, or None; raises if it cannot be one string."""
    deps = [sorted(j.depends_on) for j in unit]
    if all(not d for d in deps):
        return None
    if all(d == deps[0] for d in deps):
        return "afterok:" + ":".join(ids[d] for d in deps[0])
    # An array whose task i waits on task i of one earlier array (eval cell -> its training).
    for other in arrays.values():
        if [j.depends_on for j in unit] == [[o.name] for o in other]:
            return "aftercorr:" + ids[other[0].name].split("_")[0]
    return None


def _record(run_root: Path, plan: GridPlan, ids: dict[str, str], cluster: ClusterConfig,
            states: dict[str, str] | None = None) -> None:  # fmt: skip
    """Merge this submission's job ids into `<run>/grid/jobs.json` (earlier ones stay)."""
    path = run_root / "grid" / "jobs.json"
    records = {r["name"]: r for r in read_json(path)["jobs"]} if path.is_file() else {}
    for job in plan.jobs:
        if job.name in ids:
            records[job.name] = {**job.to_json(), "job_id": ids[job.name],
                                 "executor": cluster.executor, "submitted": time.time()}  # fmt: skip
        if states and job.name in states and job.name in records:
            records[job.name]["state"] = states[job.name]
    write_json(path, {"jobs": list(records.values())})


def _submit_slurm(plan: GridPlan, cfg: ExperimentConfig, cluster: ClusterConfig, folder: Path,
                  progress: Progress | None) -> dict[str, str]:  # fmt: skip
    ids: dict[str, str] = {}
    arrays: dict[str, list[Job]] = {}
    for unit in _submission_units(plan):
        dependency = _dependency(unit, ids, arrays)
        if dependency is None and any(j.depends_on for j in unit):
            singles = [[j] for j in unit]  # dependencies differ per task: one job each
        else:
            singles = [unit]
        for part in singles:
            dep = _dependency(part, ids, arrays) if part is not unit else dependency
            executor = make_executor(cluster, folder, part[0], dep)
            with executor.batch():
                submitted = [executor.submit(_stage_job(j, cfg, cluster)) for j in part]
            for job, handle in zip(part, submitted, strict=True):
                ids[job.name] = str(handle.job_id)
                if progress:
                    progress(job.name, ids[job.name], "SUBMITTED")
        if unit[0].array:
            arrays[unit[0].array] = unit
    return ids


def _run_locally(plan: GridPlan, cfg: ExperimentConfig, cluster: ClusterConfig, folder: Path,
                 progress: Progress | None, result: GridResult) -> None:  # fmt: skip
    """Each pending job in dependency order, one at a time, all on one Ray cluster started here;
    dependents of a failure do not run. Fills `result` (ids, states, the cluster's timings)."""
    ids, states = result.job_ids, result.states
    needs_ray = any(job.stage != "fetch" for job in plan.pending)
    node = handle = head = None
    in_main = threading.current_thread() is threading.main_thread()
    # SIGTERM (a killed launcher) must reach the `finally`: the cluster and the job go too.
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm) if in_main else None
    try:
        if needs_ray:
            t0 = time.time()
            node, head = _start_shared_cluster(plan, cluster, result.run_dir)
            result.shared_ray["start_s"] = round(time.time() - t0, 1)
            if progress:
                progress(SHARED_RAY, head["address"], "STARTED")
        for job in plan.pending:
            failed = [d for d in job.depends_on if states.get(d) != FINAL_OK]
            if failed:
                states[job.name] = "DEPENDENCY_FAILED"
                if progress:
                    progress(job.name, "", states[job.name])
                continue
            executor = make_executor(cluster, folder, job)
            handle = executor.submit(_stage_job(job, cfg, cluster, head))
            ids[job.name] = str(handle.job_id)
            _record(result.run_dir, plan, {job.name: ids[job.name]}, cluster,
                    {job.name: "RUNNING"})  # fmt: skip
            if progress:
                progress(job.name, ids[job.name], "RUNNING")
            try:
                handle.result()
                states[job.name] = FINAL_OK
            except Exception as e:  # the job's own traceback is in its log
                logger.error("job %s failed: %s", job.name, str(e).strip().splitlines()[-1:])
                states[job.name] = "FAILED"
            handle = None
            _record(result.run_dir, plan, {job.name: ids[job.name]}, cluster,
                    {job.name: states[job.name]})  # fmt: skip
            if progress:
                progress(job.name, ids[job.name], states[job.name])
    finally:
        if handle is not None:  # interrupted while a job ran: it goes before its cluster
            _cancel(handle)
        if node is not None:
            t0 = time.time()
            ray_cluster.stop_local_cluster(node)
            result.shared_ray["stop_s"] = round(time.time() - t0, 1)
            if progress:
                progress(SHARED_RAY, "", "STOPPED")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(OSError):  # submitit's local controller makes the pattern's
            folder.rmdir()  # folder literally ("%j"): gone when empty, beside the jobs' logs


def _cancel(handle: Any, timeout_s: float = 30.0) -> None:
    """Stop a running local job (SIGINT, as Ctrl-C would) and wait until it is gone."""
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(Exception):
        if not handle.done():
            handle.cancel(check=False)
        while not handle.done() and time.monotonic() < deadline:
            time.sleep(0.2)


def _start_shared_cluster(
    plan: GridPlan, cluster: ClusterConfig, run_root: Path
) -> tuple[ray_cluster.RayNode, dict]:
    """The local grid's Ray cluster, sized for its largest job (they run one at a time)."""
    jobs = [j.resources for j in plan.pending if j.stage != "fetch"]
    cpus = max(r.cpus_per_node for r in jobs)
    mem_gb = max(r.mem_gb for r in jobs)
    name = ray_cluster.local_cluster_name(run_root)
    node, head = ray_cluster.start_local_cluster(
        name, run_root / "grid" / "ray" / name,
        port_range=cluster.ray_port_range, port_block=cluster.ray_port_block,
        temp_root=cluster.ray_temp_root, num_cpus=cpus,
        num_gpus=max(r.gpus_per_node for r in jobs),
        object_store_bytes=int(mem_gb * cluster.object_store_fraction * 2**30),
        dashboard_host=cluster.dashboard_host, setup=_setup_lines(cluster),
    )  # fmt: skip
    logger.info("grid: one Ray cluster for every local job at %s (dashboard %s)",
                head["address"], head["dashboard"])  # fmt: skip
    return node, head


def wait_for_slurm(
    job_ids: dict[str, str],
    progress: Progress | None = None,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
) -> dict[str, str]:
    """Poll `sacct` until every job (`{name: job id}`) reached a final state; returns the
    states. A requeued job passes through PENDING again and is waited for."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while True:
        states = slurm_states(list(job_ids.values()))
        now = {name: states.get(jid, "PENDING").split()[0] for name, jid in job_ids.items()}
        for name, state in now.items():
            if progress and last.get(name) != state:
                progress(name, job_ids[name], state)
        last = now
        if all(s in FINAL_STATES for s in now.values()):
            return now
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"grid jobs still running after {timeout_s:.0f}s: {now}")
        time.sleep(poll_s)


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """State of each job (array tasks as `ID_TASK`) from `sacct`; missing ones are left out."""
    if not job_ids:
        return {}
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id.strip()] = state.strip()
    return states


def job_states(run_root: Path) -> dict[str, tuple[str, str]]:
    """`{output folder: (job id, state)}` of the grid jobs recorded in `<run>/grid/jobs.json`;
    SLURM jobs are asked through `sacct`, local ones show their recorded state."""
    path = Path(run_root) / "grid" / "jobs.json"
    if not path.is_file():
        return {}
    records = read_json(path)["jobs"]
    slurm_ids = [r["job_id"] for r in records if r.get("executor") == "slurm"]
    live: dict[str, str] = {}
    if slurm_ids:
        try:
            live = slurm_states(slurm_ids)
        except (OSError, subprocess.TimeoutExpired):
            logger.warning("sacct is not reachable: showing recorded job states")
    out = {}
    for r in records:
        state = live.get(r["job_id"], r.get("state", "SUBMITTED"))
        for folder in r["outputs"]:
            out[folder] = (r["job_id"], state)
    return out


def launch(
    cfg: ExperimentConfig,
    cluster: ClusterConfig,
    *,
    plan_only: bool = False,
    wait: bool | None = None,
    progress: Progress | None = None,
    timeout_s: float | None = None,
    stages: list[str] | None = None,
    cells: list[str] | None = None,
) -> GridResult:
    """Plan the grid of `cfg` and (unless `plan_only`) submit what is not finished.

    `wait` (default: True for local executors, False for SLURM) blocks until every submitted
    job reached a final state and fills `GridResult.states`. `stages` and `cells` restrict the
    grid to those stages and train/eval cells; a submission leaves out stages not built in this
    version of qup_ray."""
    from qup_ray.stages import STAGE_ORDER, is_built

    run = RunDir.for_config(cfg)
    if not plan_only:
        wanted = stages or ["fetch", *STAGE_ORDER]  # fetch: a job, not a stage module
        built = [s for s in wanted if s == "fetch" or is_built(s)]
        if missing := [s for s in wanted if s not in built]:
            logger.warning("grid: stages not built in this version, not submitted: %s", missing)
        stages = built
    if wait is None:
        wait = cluster.executor != "slurm"
    plan = plan_grid(cfg, cluster, run.root, stages, cells)
    text = format_plan(plan, cluster)
    result = GridResult(run.root, plan, text)
    if plan_only:
        return result
    run.save_config(cfg)
    write_json(run.root / "grid" / "plan.json", {
        "jobs": [j.to_json() for j in plan.jobs], "rates": plan.rates,
        "rate_sources": plan.rate_sources, "cluster": cluster.model_dump(mode="json"),
        "created": time.time(),
    })  # fmt: skip
    write_text(run.root / "grid" / "plan.txt", text + "\n")
    write_text(run.root / "grid" / "cluster.yaml", dump_config(cluster))
    folder = run.root / cluster.log_dir / "%j"
    if not plan.pending:
        logger.info("grid: every job finished earlier, nothing to submit")
        return result
    if cluster.executor == "slurm":
        result.job_ids = _submit_slurm(plan, cfg, cluster, folder, progress)
        _record(run.root, plan, result.job_ids, cluster)
        logger.info("grid: submitted %d jobs; logs in %s", len(result.job_ids), folder.parent)
        if wait:
            result.states = wait_for_slurm(result.job_ids, progress, timeout_s=timeout_s)
            _record(run.root, plan, result.job_ids, cluster, result.states)
        return result
    _run_locally(plan, cfg, cluster, folder, progress, result)
    return result
