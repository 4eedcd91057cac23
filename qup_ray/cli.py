"""`qup`: the command line of qup_ray.

    qup dryrun [--out DIR]                     every stage on this machine (CPU, tiny models)
    qup run STAGE -c CONFIG [key=value ...]    one stage on the current (or a local) Ray cluster
    qup fetch -c CONFIG [--plan]               download every pinned model and dataset once
    qup grid -c CONFIG --cluster YAML [--plan] the model x stream x objective grid on SLURM
    qup status RUN_DIR                         what is done, partial, failed or missing
    qup validate -c CONFIG [key=value ...]     check a config, print every problem
    qup grade IN.jsonl --out OUT.jsonl         grade responses with the project's answer checker
    qup bench NAME [--json]                    a stage's throughput against its bare baseline
    qup report RUN_DIR                         the paper's analysis: tables, plots, verdict
    qup report --from-table CSV --out DIR      the same analysis from per-stream numbers

User mistakes (a bad config, a missing input stage) print one clear message and exit with code 2;
features not built yet exit with code 3.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from qup_ray.config import CONFIGS_DIR, ConfigError, load_config

logger = logging.getLogger(__name__)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="qup_ray: reproduce 'The Quality-Utility Paradox' on Ray, vLLM, DeepSpeed and SLURM.",
)

EXIT_USER_ERROR = 2
EXIT_NOT_BUILT = 3

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Experiment YAML (configs/*.yaml).")
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides like rollouts.temperature=0.7.", show_default=False),
]


class NotBuilt(Exception):
    """A command whose feature does not exist yet."""


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    # stdout carries results (JSON lines of `bench`, `grade`); every log goes to stderr, vLLM's
    # too (it logs to stdout by default, also in the processes it starts).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


@app.command()
def validate(config: ConfigOpt, overrides: Overrides = None) -> None:
    """Check a config and print every problem at once (exit code 2 when there is one)."""
    cfg = load_config(config, overrides or [])
    typer.echo(
        f"{config}: ok (experiment {cfg.experiment!r}, {len(cfg.students)} students, "
        f"{len(cfg.stream_names())} streams, run dir {cfg.run_dir})"
    )


@app.command("run")
def run_cmd(
    stage: Annotated[
        str, typer.Argument(help="problems, rollouts, streams, score, train, eval, report")
    ],
    config: ConfigOpt,
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option(help="Redo the stage even if it finished.")] = False,
) -> None:
    """Run one stage; a finished stage with the same config and inputs is skipped."""
    from qup_ray.rundir import RunDir
    from qup_ray.stages import STAGE_ORDER, StageNotBuilt, run_stage

    if stage not in STAGE_ORDER:
        raise typer.BadParameter(f"unknown stage {stage!r}; one of {', '.join(STAGE_ORDER)}")
    cfg = load_config(config, overrides or [])
    RunDir.for_config(cfg).save_config(cfg)
    try:
        out = run_stage(stage, cfg, force=force)
    except StageNotBuilt as e:
        raise NotBuilt(str(e)) from None
    typer.echo(f"{stage}: done -> {out}")


@app.command()
def fetch(
    config: ConfigOpt,
    overrides: Overrides = None,
    plan: Annotated[
        bool, typer.Option(help="List what would be fetched (works offline); download nothing.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Download again even if cached.")] = False,
) -> None:
    """Download every model and dataset the config names, at its pinned revision, into the
    Hugging Face cache, so later jobs run with HF_HUB_OFFLINE=1."""
    from qup_ray import fetch as fetching

    cfg = load_config(config, overrides or [])
    if plan:
        for line in fetching.plan(cfg):
            typer.echo(line)
        return
    typer.echo(f"fetch: done -> {fetching.run(cfg, force=force)}")


@app.command()
def dryrun(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Parent folder of the run directory.")] = Path("runs"),
    cluster: Annotated[Path, typer.Option(help="Cluster YAML with a local executor.")] = CONFIGS_DIR
    / "clusters"
    / "local.yaml",
    force: Annotated[
        bool, typer.Option(help="Delete the dry run's folder and redo it all.")
    ] = False,
    overrides: Overrides = None,
) -> None:
    """The whole paper on this machine (CPU, tiny models, synthetic problems): every job of the
    grid of configs/dryrun.yaml through the local executor, one line per job; logs in files."""
    import shutil

    from qup_ray.config import load_cluster_config
    from qup_ray.dryrun import run_dryrun

    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", [f"output_dir={out}", *(overrides or [])])
    cluster_cfg = load_cluster_config(cluster)
    if cluster_cfg.executor == "slurm":
        raise ConfigError([f"executor: a dry run runs on this machine (got 'slurm' in {cluster})"])
    if force and cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    verbose = bool(ctx.parent and ctx.parent.params.get("verbose"))
    if not verbose:
        # The terminal shows the jobs' progress lines; the library's INFO logs stay in the logs.
        logging.getLogger().setLevel(logging.WARNING)
    code = run_dryrun(cfg, cluster_cfg, typer.echo, verbose=verbose)
    if code:
        raise typer.Exit(code)


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="<output_dir>/<experiment>")]) -> None:
    """Table of stages and grid cells: done, partial (shards done of total), failed, missing."""
    from qup_ray.rundir import RunDir

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(
            [f"no config.yaml in {run_dir}: not a run directory"], source=str(run_dir)
        )
    cfg = load_config(cfg_path)
    rows = RunDir(run_dir).status(cfg)
    jobs = {}
    if (run_dir / "grid" / "jobs.json").is_file():
        from qup_ray.grid import job_states

        jobs = {path: f"{jid} {state}" for path, (jid, state) in job_states(run_dir).items()}
    width = max(len(r["path"]) for r in rows)
    job_width = max([len(j) for j in jobs.values()] + [3])
    typer.echo(f"{'PATH'.ljust(width)}  {'STATE':8}  {'JOB'.ljust(job_width)}  DETAIL")
    for r in rows:
        job = jobs.get(r["path"], "-").ljust(job_width)
        typer.echo(f"{r['path'].ljust(width)}  {r['state']:8}  {job}  {r['detail']}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    typer.echo("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


@app.command()
def grid(
    config: ConfigOpt,
    cluster: Annotated[Path, typer.Option(help="Cluster YAML (configs/clusters/*.yaml).")],
    plan: Annotated[
        bool,
        typer.Option(help="Print jobs, resources, dependencies and GPU-hours; submit nothing."),
    ] = False,
    wait: Annotated[
        bool | None,
        typer.Option(help="Wait for the jobs to finish (default: only with a local executor)."),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(help="Only these stages, comma-separated (e.g. problems,rollouts)."),
    ] = None,
    cells: Annotated[
        str | None,
        typer.Option(
            help="Only these train/eval cells, comma-separated (student/stream/objective)."
        ),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """The model x stream x objective grid as SLURM jobs through submitit: data stages, one
    training and one evaluation job per cell, the report; finished cells are not resubmitted."""
    from qup_ray.config import load_cluster_config
    from qup_ray.grid import launch
    from qup_ray.stages import STAGE_ORDER

    cfg = load_config(config, overrides or [])
    cluster_cfg = load_cluster_config(cluster)

    def progress(name: str, job_id: str, state: str) -> None:
        typer.echo(f"{job_id or '-':>12}  {state:<18} {name}", err=True)

    only = [s.strip() for s in stages.split(",")] if stages else None
    if unknown := [s for s in only or [] if s not in ("fetch", *STAGE_ORDER)]:
        raise ConfigError(
            [f"--stages: not stages {unknown}; one of fetch, {', '.join(STAGE_ORDER)}"]
        )
    chosen = [c.strip() for c in cells.split(",")] if cells else None
    result = launch(
        cfg, cluster_cfg, plan_only=plan, wait=wait, progress=progress, stages=only, cells=chosen
    )
    typer.echo(result.plan_text)
    if plan:
        return
    typer.echo(f"submitted {len(result.job_ids)} jobs; ids and plan in {result.run_dir / 'grid'}")
    if result.states and not result.ok:
        failed = sorted(n for n, s in result.states.items() if s != "COMPLETED")
        typer.echo(f"not completed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@app.command()
def grade(
    in_path: Annotated[
        Path, typer.Argument(metavar="IN.jsonl", help="Rows with response, answer.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL.")],
    timeout_s: Annotated[float, typer.Option(help="Time bound of one check.")] = 5.0,
    workers: Annotated[int | None, typer.Option(help="Grading processes (default: CPUs).")] = None,
    lenient: Annotated[
        bool, typer.Option(help="Fall back to 'the answer is' / last number.")
    ] = False,
) -> None:
    """Grade `response` against `answer` for every row; adds extracted, correct, status."""
    if not in_path.is_file():
        raise ConfigError([f"input file not found: {in_path}"], source="qup grade")
    if importlib.util.find_spec("qup_ray.grading") is None:
        raise NotBuilt("the answer checker is not built yet in this version of qup_ray")
    from qup_ray.grading import grade_jsonl

    summary = grade_jsonl(in_path, out, workers=workers, timeout_s=timeout_s, lenient=lenient)
    typer.echo(json.dumps(summary, sort_keys=True))


@app.command()
def bench(
    name: Annotated[
        str, typer.Argument(help="Benchmark name (e.g. grade, rollouts, ppl, oracle).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    quick: Annotated[bool, typer.Option(help="Smaller workload, for smoke tests.")] = False,
    rounds: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Engine benchmarks: alternating baseline/pipeline rounds, "
            "median reported (default 3, 1 with --quick).",
        ),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Measured throughput of a pipeline stage against its bare baseline, in the same run.
    Engine benchmarks (rollouts, ppl) take overrides of configs/dryrun.yaml."""
    benches: dict[str, str] = {}
    if importlib.util.find_spec("qup_ray.bench") is not None:
        benches = importlib.import_module("qup_ray.bench").BENCHES
    if name not in benches:
        known = ", ".join(sorted(benches)) or "none yet"
        raise NotBuilt(f"benchmark {name!r} is not built yet (available: {known})")
    run_bench = importlib.import_module(benches[name]).run
    accepted = inspect.signature(run_bench).parameters
    kwargs: dict[str, Any] = {"quick": quick}
    for option, value in (("overrides", overrides), ("rounds", rounds)):
        if value:
            if option not in accepted:
                raise ConfigError([f"benchmark {name!r} takes no {option}"], source="qup bench")
            kwargs[option] = value
    result = run_bench(**kwargs)
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            typer.echo(f"{key:>20}: {value}")


@app.command()
def report(
    run_dir: Annotated[
        Path | None, typer.Argument(help="<output_dir>/<experiment> (writes its report/)")
    ] = None,
    from_table: Annotated[
        Path | None,
        typer.Option(
            help="CSV of per-stream numbers: student, objective, stream, reward, "
            "total_avg, ppl (optional q1_ppl..q4_ppl, retention)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (with --from-table).")] = None,
    force: Annotated[bool, typer.Option(help="Redo the report even if it is up to date.")] = False,
) -> None:
    """The paper's analysis: tables, rank correlations with intervals, plots, verdict."""
    from qup_ray.report import BootstrapSettings, build_report
    from qup_ray.report import from_table as read_table

    if (run_dir is None) == (from_table is None):
        raise ConfigError(
            ["give either RUN_DIR or --from-table CSV --out DIR"], source="qup report"
        )
    if from_table is not None:
        if out is None:
            raise ConfigError(["--from-table needs --out DIR"], source="qup report")
        if not from_table.is_file():
            raise ConfigError([f"file not found: {from_table}"], source="qup report")
        try:
            data = read_table(from_table)
        except ValueError as e:
            raise ConfigError([str(e)], source="qup report") from None
        build_report(data, out, BootstrapSettings())
        typer.echo(f"report: done -> {out}")
        return
    from qup_ray.stages.report import report_run_dir

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(
            [f"no config.yaml in {run_dir}: not a run directory"], source=str(run_dir)
        )
    path = report_run_dir(load_config(cfg_path), run_dir, force=force)
    typer.echo(f"report: done -> {path}")


world_app = typer.Typer(
    help="The CPU world: tiny models, synthetic problems, rule oracle.", no_args_is_help=True
)
app.add_typer(world_app, name="cpu-world")


@world_app.command("build")
def world_build(
    cache_dir: Annotated[
        str | None, typer.Option(help="Default: $QUP_CACHE_DIR or ~/.cache/qup_ray.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
) -> None:
    """Build (or find in the cache) the tiny students and reward models."""
    from qup_ray.cpu_world.__main__ import main as world_main

    sys.exit(
        world_main(
            [
                "build",
                *(["--cache-dir", cache_dir] if cache_dir else []),
                *(["--force"] if force else []),
            ]
        )
    )


@world_app.command(
    "oracle", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def world_oracle(ctx: typer.Context) -> None:
    """Serve the rule oracle (OpenAI-compatible, 127.0.0.1): options as
    `python -m qup_ray.cpu_world.oracle_server --help` (--port, --fault-rate, --latency-s, ...)."""
    from qup_ray.cpu_world.oracle_server import main as oracle_main

    sys.exit(oracle_main(list(ctx.args)))


def main() -> None:
    """Console entry point: user mistakes become one message and exit code 2, no traceback."""
    from qup_ray.rundir import StageError

    try:
        app()
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except StageError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except NotBuilt as e:
        typer.echo(f"not built yet: {e}", err=True)
        sys.exit(EXIT_NOT_BUILT)


if __name__ == "__main__":
    main()
