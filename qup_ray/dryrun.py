"""`qup dryrun`: the whole paper on this machine, through the grid launcher's own code path.

The dry run is `qup grid` with `configs/clusters/local.yaml`: the same jobs and dependencies as
on SLURM, run one after the other by submitit's local executor, each job in its own process; all
jobs share one Ray cluster, started before the first and stopped after the last. Everything a job prints (vLLM, Ray, DeepSpeed, training) goes to that job's
log files under `<run>/<log_dir>/<job id>/`; the terminal gets one line when a job starts and one
when it ends, with the counts that matter, and on a failure the path of the log that explains it.
A second dry run finds every job finished and returns in seconds.

This module is launcher code: it reads manifests to summarise, it never runs a stage itself.
"""

from __future__ import annotations

import csv
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from qup_ray.config import ClusterConfig, ExperimentConfig
from qup_ray.rundir import MANIFEST, read_json, write_json

Echo = Callable[[str], None]


def _manifests(root: Path, outputs: list[str]) -> dict[str, dict]:
    return {o: read_json(root / o / MANIFEST) for o in outputs if (root / o / MANIFEST).is_file()}


def _rows(manifests: dict[str, dict], key: str) -> int:
    return sum(int(m.get("row_counts", {}).get(key, 0) or 0) for m in manifests.values())


def job_summary(root: Path, stage: str, outputs: list[str]) -> str:
    """The counts a person wants after a job: problems solved, rows rejected, cells trained."""
    ms = _manifests(root, outputs)
    if stage == "problems":
        return f"{_rows(ms, 'problems')} problems, {_rows(ms, 'rejected')} rejected"
    if stage == "rollouts":
        counts = ms.get("problem_set", {}).get("counts", {})
        correct = sum(m.get("num_correct", 0) for m in ms.values())
        return (
            f"{_rows(ms, 'rollouts')} samples, {correct} correct; problem set: "
            f"{counts.get('solved_by_anchor', '?')} of {counts.get('problems', '?')} problems"
        )
    if stage == "streams":
        finals = [m for o, m in ms.items() if o.endswith("/final")]
        kept = sum(sum(m.get("row_counts", {}).values()) for m in finals)
        return f"{len(ms)} stream folders, {kept} traces in the streams cut to common ids"
    if stage == "score":
        return f"{_rows(ms, 'ppl')} traces scored, {_rows(ms, 'rejected')} rejected (over context)"
    if stage in ("train", "eval"):
        return f"{len(ms)} of {len(outputs)} cells done"
    return f"{len(ms)} of {len(outputs)} outputs done"


def job_log(root: Path, cluster: ClusterConfig, job_id: str) -> Path | None:
    """The error log submitit wrote for a job (its stderr: where a traceback lands)."""
    folder = root / cluster.log_dir / job_id
    logs = sorted(folder.glob("*_log.err")) if folder.is_dir() else []
    return logs[-1] if logs else None


def verdict_lines(root: Path) -> list[str]:
    """The report's computed verdict for the first student and objective, one short line per
    claim (report/verdict.csv; the whole sentences are in report.html)."""
    path = root / "report" / "verdict.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("text")]
    if not rows:
        return []
    first = (rows[0]["student"], rows[0]["objective"])
    out = []
    for r in rows:
        if (r["student"], r["objective"]) != first:
            continue
        claim = r["text"].split(":", 1)[0].split(" (", 1)[0]
        out.append(f"{r['student']} {r['objective']}: {claim} ({r['evidence']} evidence)")
    return out


class _Ticker:
    """On a terminal, one line that shows the running job's elapsed time (a heartbeat for jobs
    that take minutes); nothing when the output is a file or a pipe."""

    def __init__(self, stream=sys.stdout) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.label = ""
        self.started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, label: str) -> None:
        self.label, self.started = label, time.time()
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def stop(self) -> None:
        self._stop.set()
        self.clear()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            if self.label:
                elapsed = int(time.time() - self.started)
                self.stream.write(f"\r\033[K  ... {self.label} {elapsed // 60}m{elapsed % 60:02d}s")
                self.stream.flush()


def run_dryrun(
    cfg: ExperimentConfig, cluster: ClusterConfig, echo: Echo, *, verbose: bool = False
) -> int:
    """Launch the grid of `cfg` on `cluster` (a local executor), print one line per job, and
    return the exit code (0 when every job succeeded). Writes `<run>/dryrun.json`: the wall time
    of every job, of the shared Ray cluster's start and stop, and `breakdown_s`, where the
    whole run's seconds went (jobs, Ray, and the launcher's own planning: they sum to
    `total_s`)."""
    from qup_ray.grid import launch
    from qup_ray.grid.submit import SHARED_RAY

    t0 = time.time()
    root = cfg.run_dir
    timings: dict[str, dict] = {}
    ticker = _Ticker()
    jobs_by_name: dict[str, tuple[str, list[str]]] = {}

    def progress(name: str, job_id: str, state: str) -> None:
        if name == SHARED_RAY:
            ticker.clear()
            if state == "STARTED":
                echo(f"  {'ray':<10} up at {job_id}: one Ray cluster for every job")
            return
        stage, outputs = jobs_by_name.get(name, ("", []))
        now = time.time()
        if state == "RUNNING":
            timings[name] = {"job_id": job_id, "started": now}
            ticker.start(name)
            return
        ticker.clear()
        entry = timings.setdefault(name, {"job_id": job_id, "started": now})
        entry.update(state=state, seconds=round(now - entry["started"], 1))
        if state == "COMPLETED":
            echo(
                f"  {name:<10} done in {entry['seconds']:6.0f} s   {job_summary(root, stage, outputs)}"
            )
        else:
            log = job_log(root, cluster, job_id) if job_id else None
            echo(f"  {name:<10} {state}" + (f": see {log}" if log else ""))
        if verbose and job_id and (log := job_log(root, cluster, job_id)):
            echo(log.read_text()[-20000:])

    echo(f"dry run: {root} (the grid on this machine, {cluster.executor} executor)")
    # The plan first (cheap), so progress lines can name each job's outputs.
    plan = launch(cfg, cluster, plan_only=True)
    for job in plan.plan.jobs:
        jobs_by_name[job.name] = (job.stage, job.outputs)
    pending = plan.plan.pending
    stages = dict.fromkeys(j.stage for j in pending)
    echo(f"  {len(plan.plan.jobs)} jobs, {len(pending)} to run ({', '.join(stages) or 'none'})")
    try:
        result = launch(cfg, cluster, progress=progress)
    finally:
        ticker.stop()
    total = round(time.time() - t0, 1)
    ray = result.shared_ray
    if ray:
        echo(
            f"  {'ray':<10} start {ray.get('start_s', 0):.0f} s + stop {ray.get('stop_s', 0):.0f} s"
        )
    if timings or not (root / "dryrun.json").is_file():  # a run that ran nothing keeps the last
        write_json(root / "dryrun.json", {
            "total_s": total, "jobs": timings, "ok": result.ok, "shared_ray": ray,
            "breakdown_s": breakdown(total, timings, ray),
        })  # fmt: skip
    if not result.ok:
        failed = [n for n, s in result.states.items() if s != "COMPLETED"]
        echo(f"dry run FAILED after {total:.0f} s: {', '.join(failed)} (logs above)")
        return 1
    echo(f"dry run finished in {total:.0f} s; every stage and cell: qup status {root}")
    report = root / "report" / "report.html"
    if report.is_file():
        echo(f"report: {report}")
    for line in verdict_lines(root)[:3]:
        echo(f"  verdict: {line}")
    return 0


def breakdown(total_s: float, jobs: dict[str, dict], ray: dict[str, float]) -> dict[str, float]:
    """Where a run's seconds went: the Ray cluster's start, each job, its stop, and
    the rest (planning, records, summaries): the values sum to `total_s`."""
    parts = {"ray_start": ray.get("start_s", 0.0)} if ray else {}
    parts |= {name: float(t.get("seconds", 0.0)) for name, t in jobs.items()}
    if ray:
        parts["ray_stop"] = ray.get("stop_s", 0.0)
    parts["launcher"] = round(total_s - sum(parts.values()), 1)
    return parts
