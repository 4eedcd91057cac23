"""The grid as jobs: one per data stage, one per training and evaluation cell, and the report.

    [fetch ->] problems -> rollouts -> streams -> score ------------------------------> report
                               \\-> train/<cell> (array) -> eval/<cell> (array) -/
    eval/<student>/base/base (the untrained students) -------------------------/

A job is finished when every folder it writes has its `_manifest.json` and the run's saved
config equals this one in every field that changes results; finished jobs are left out of a
submission and nothing waits for them, so a rerun after a failure submits only what is missing,
and a rerun after a config edit submits every job (each stage skips what its hash says is
unchanged). Resources come from the cluster YAML (defaults, then `stages.<stage>`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from qup_ray.config import (
    ClusterConfig,
    ConfigError,
    ExperimentConfig,
    load_config,
)
from qup_ray.fetch import needs_fetch
from qup_ray.grid.estimate import problem_set_size, stage_gpu_hours, throughputs
from qup_ray.rundir import MANIFEST, RunDir, eval_cells, train_cells, train_streams
from qup_ray.selection import SELECTION_STREAMS

DATA_STAGES = ("problems", "rollouts", "streams", "score")


@dataclass(frozen=True)
class Resources:
    """What one job asks SLURM for."""

    nodes: int
    gpus_per_node: int
    cpus_per_node: int
    mem_gb: float
    timeout_min: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return (
            f"{self.nodes}n x {self.gpus_per_node}gpu {self.cpus_per_node}cpu "
            f"{self.mem_gb:g}GB {self.timeout_min}min"
        )


@dataclass
class Job:
    """One SLURM job: a stage (restricted to one cell for train and eval) and what it writes."""

    name: str
    """`problems`, ..., `train/<student>/<stream>/<objective>`, `eval/<cell>`, `report`."""
    stage: str
    cells: list[str] | None
    outputs: list[str]
    """Run-dir-relative folders; the job is finished when each holds a manifest."""
    depends_on: list[str]
    """Names of the jobs (of this submission) that must succeed first."""
    resources: Resources
    gpu_hours: float
    array: str | None = None
    """Jobs with the same array name share a shape and are submitted as one SLURM array."""
    done: bool = False

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class GridPlan:
    """Every job of a grid (finished ones marked), and where the estimate's figures came from."""

    jobs: list[Job]
    rate_sources: dict[str, str] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    problem_set: int = 0
    problem_set_measured: bool = False

    @property
    def pending(self) -> list[Job]:
        return [j for j in self.jobs if not j.done]

    def gpu_hours_by_stage(self, pending_only: bool = False) -> dict[str, float]:
        out: dict[str, float] = {}
        for j in self.pending if pending_only else self.jobs:
            out[j.stage] = out.get(j.stage, 0.0) + j.gpu_hours
        return out


def stage_resources(cluster: ClusterConfig, stage: str) -> Resources:
    """The cluster's defaults with the stage's overrides."""
    over = cluster.stages.get(stage)

    def pick(name: str):
        value = getattr(over, name, None) if over is not None else None
        return getattr(cluster, name) if value is None else value

    return Resources(
        nodes=over.nodes if over is not None else 1,
        gpus_per_node=pick("gpus_per_node"),
        cpus_per_node=pick("cpus_per_node"),
        mem_gb=pick("mem_gb"),
        timeout_min=pick("timeout_min"),
    )


def _data_outputs(cfg: ExperimentConfig, stage: str) -> list[str]:
    students, streams = list(cfg.students), cfg.stream_names()
    if stage == "problems":
        return ["problems"]
    if stage == "rollouts":
        rft = [f"streams/{s}/slm_rft" for s in students if "slm_rft" in streams]
        return [*(f"rollouts/{s}" for s in students), "problem_set", *rft]
    if stage == "streams":
        # Selection streams have no folder of their own: they are chosen in `final`.
        others = [st for st in streams if st != "slm_rft" and st not in SELECTION_STREAMS]
        return [f"streams/{s}/{st}" for s in students for st in [*others, "final"]]
    return [f"scores/{s}/{st}" for s in students for st in streams]


def grid_cells(cfg: ExperimentConfig) -> list[str]:
    """Training cells "student/stream/objective" (streams of `training.streams`), grid order."""
    objectives = train_cells(cfg)
    return [f"{s}/{st}/{o}" for s in cfg.students for st in train_streams(cfg) for o in objectives]


def base_cells(cfg: ExperimentConfig) -> list[str]:
    """Evaluation cells of the untrained students (when `evaluation.evaluate_base`)."""
    return [c for c in eval_cells(cfg) if c.endswith("/base/base")]


def results_config_changed(cfg: ExperimentConfig, root: Path) -> bool:
    """True when the config the run's outputs were made with (its saved `results_hash`, else
    its `config.yaml`) differs from `cfg` in a field that changes results, or in the CPU
    world's code. Throughput fields (`result_view`), the Ray
    connection and the output folder do not count. Then every job is submitted again, and each
    stage redoes only what its own manifest hash says changed."""
    saved = root / "config.yaml"
    if not saved.is_file():
        return False
    saved_hash = RunDir(root).saved_results_hash()
    if saved_hash is not None:  # also sees a change to the CPU world's code
        return saved_hash != cfg.results_hash()
    try:
        before = load_config(saved)
    except ConfigError:  # written by another version of the suite: let the stages decide
        return True
    return before.results_hash() != cfg.results_hash()


def plan_grid(
    cfg: ExperimentConfig,
    cluster: ClusterConfig,
    run_root: Path | None = None,
    stages: list[str] | None = None,
    cells: list[str] | None = None,
) -> GridPlan:
    """Expand `cfg` into the jobs of its grid; jobs whose outputs are finished are marked done.

    `stages` keeps only the jobs of those stages (the others are taken as run elsewhere: no job
    waits for them). `cells` keeps only the train and eval jobs of those cells."""
    root = Path(run_root) if run_root is not None else cfg.run_dir
    changed = results_config_changed(cfg, root)
    rates = throughputs(cluster)
    ps = problem_set_size(cfg, cluster, root)
    jobs: dict[str, Job] = {}

    def add(name: str, stage: str, job_cells, outputs, deps, array=None, cells: int = 1) -> None:
        res = stage_resources(cluster, stage)
        gpu_work = res.gpus and stage != "fetch"
        hours = cells * stage_gpu_hours(stage, cfg, cluster, rates, ps) if gpu_work else 0.0
        done = not changed and all((root / o / MANIFEST).is_file() for o in outputs)
        jobs[name] = Job(name, stage, job_cells, outputs, deps, res, hours, array, done)

    # Models and datasets are downloaded once, by a CPU job, before any GPU job waits on them.
    previous: list[str] = []
    if needs_fetch(cfg):
        add("fetch", "fetch", None, ["fetch"], [])
        previous = ["fetch"]
    for stage in DATA_STAGES:
        add(stage, stage, None, _data_outputs(cfg, stage), previous)
        previous = [stage]
    trained = [c for c in grid_cells(cfg) if cells is None or c in cells]
    base = [c for c in base_cells(cfg) if cells is None or c in cells]
    if cluster.split_cells:
        for cell in trained:
            add(f"train/{cell}", "train", [cell], [f"train/{cell}"], ["streams"], array="train")
            add(f"eval/{cell}", "eval", [cell], [f"eval/{cell}"], [f"train/{cell}"], array="eval")
        for cell in base:
            add(f"eval/{cell}", "eval", [cell], [f"eval/{cell}"], ["problems"], array="eval-base")
    else:
        add(
            "train",
            "train",
            trained,
            [f"train/{c}" for c in trained],
            ["streams"],
            cells=len(trained),
        )
        add("eval", "eval", [*base, *trained], [f"eval/{c}" for c in [*base, *trained]],
            ["problems", "train"], cells=len(base) + len(trained))  # fmt: skip
    add("report", "report", None, ["report"],
        ["score", *(n for n, j in jobs.items() if j.stage == "eval")])  # fmt: skip
    # A job must rerun when something it depends on reruns (its inputs change); fetching again
    # changes nothing (the revisions are pinned or locked).
    for job in jobs.values():
        if job.done and any(not jobs[d].done for d in job.depends_on if d != "fetch"):
            job.done = False
    if stages is not None:
        jobs = {n: j for n, j in jobs.items() if j.stage in stages}
    for job in jobs.values():
        job.depends_on = [d for d in job.depends_on if d in jobs and not jobs[d].done]
    return GridPlan(
        list(jobs.values()), rate_sources=rates.sources, rates=rates.rates, problem_set=ps,
        problem_set_measured=(root / "problem_set" / MANIFEST).is_file(),
    )  # fmt: skip


def format_plan(plan: GridPlan, cluster: ClusterConfig) -> str:
    """The plan as text: every job with resources and dependencies, then the GPU-hour estimate."""
    lines = [f"{'JOB':<60} {'RESOURCES':<34} {'GPU-H':>8}  DEPENDS ON"]
    for j in plan.jobs:
        deps = ", ".join(j.depends_on) if len(j.depends_on) <= 3 else (
            f"{', '.join(j.depends_on[:2])} and {len(j.depends_on) - 2} more")  # fmt: skip
        state = " (finished, not submitted)" if j.done else ""
        array = f" [array {j.array}]" if j.array else ""
        lines.append(
            f"{j.name + array:<60} {j.resources.describe():<34} {j.gpu_hours:>8.1f}  "
            f"{deps or '-'}{state}"
        )
    pending = plan.pending
    lines += ["", f"{len(plan.jobs)} jobs, {len(pending)} to submit, executor {cluster.executor}"]
    lines.append("GPU-hours by stage (estimate; all jobs / still to run):")
    every, todo = plan.gpu_hours_by_stage(), plan.gpu_hours_by_stage(pending_only=True)
    for stage, hours in every.items():
        count = sum(1 for j in plan.jobs if j.stage == stage)
        lines.append(
            f"  {stage:<10} {hours:>10.1f} / {todo.get(stage, 0.0):>10.1f}  ({count} jobs)"
        )
    lines.append(f"  {'total':<10} {sum(every.values()):>10.1f} / {sum(todo.values()):>10.1f}")
    measured = "measured (problem_set manifest)" if plan.problem_set_measured else (
        "estimated: num_problems x estimate.problem_set_fraction")  # fmt: skip
    lines += [
        "The estimate: work counted from the config (problems x samples x tokens for rollouts,",
        "traces x models for score, problem set x epochs per training cell, benchmarks x",
        "problems x samples per evaluation cell) divided by tokens per GPU-second. Throughputs:",
        *(f"  {k} = {plan.rates[k]:g} from {src}" for k, src in plan.rate_sources.items()),
        f"  problem set = {plan.problem_set} problems, {measured}",
        "  API oracles (openai backend) cost dollars (oracles.*.budget_usd), not GPU-hours;",
        "  CPU-only jobs (0 GPUs) count 0.",
    ]
    return "\n".join(lines)
