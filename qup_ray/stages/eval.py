"""Stage `eval`: Avg@k, pass@k and maj@k of every trained model and every base student.

    qup run eval -c configs/paper.yaml

1. The benchmarks are loaded once (`qup_ray.data`, hub ids and field maps in the config) and
   written to `eval/benchmarks/<benchmark>.parquet` (with a `-rejected` table of unusable rows).
2. Each model, a *cell*: a trained export `train/<student>/<stream>/<objective>/model/`, or a
   base student, the reference cell `<student>/base/base`. A cell whose export is missing is
   recorded (`_blocked.json`, shown by `qup status`, listed in `eval/_manifest.json`) and the
   others go on.
3. k samples per problem with the student's prompt (`qup_ray.encoding`), generated and graded
   by the rollouts' pipeline (`engines.generate_and_grade`): one model's engine actors at a
   time, all its unfinished (benchmark, shard)s in one pass, so a model's engines start once.
   Every (model, benchmark) is a unit with its own manifest and resumable shards.
4. Per-sample rows in `eval/<cell>/<benchmark>.parquet`; one row per (student, stream,
   objective, benchmark) in `eval/summary.parquet` (`qup_ray.metrics.summarize`) and the
   Total Avg of every model with all its benchmarks done in `eval/totals.parquet`.

Faults: Ray restarts an engine actor that dies and sends its batch again; samples are seeded per
request, so the redone batch gives the rows an unbroken run gives. A problem that kills its actor
every time it is sent (a poison input) is isolated (`engines.isolating_crashes`): the unfinished
shards are redone one request per batch and the problem goes to the unit's rejected table
(reason `engine_crash`, with the error); every other shard is written and the stage finishes.
One rule for every problem without samples, whether its prompt fills the context or it crashed
its engine: it is left out of Avg@k, pass@k and maj@k (and of `num_problems`) and counted in
`num_rejected`, with its reason in `eval/<cell>/<benchmark>/rejected.parquet` (`finish_unit`).
Each unit's manifest counts its isolated rows and names the engine pass that generated it;
each cell's manifest and `eval/_manifest.json` sum the actor restarts and retried batches of
their distinct engine passes and the isolated rows (`faults`, shown by `qup status`).

One job evaluates many models inside one Ray cluster; `cells` restricts it to some (the SLURM
grid runs one job per cell). Every job rebuilds the two summary tables from the finished units.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from qup_ray import metrics
from qup_ray.config import ExperimentConfig, cpu_world_identity, result_view
from qup_ray.data import PROBLEM_SCHEMA, load_problems
from qup_ray.data import REJECTED_SCHEMA as BENCHMARK_REJECTED_SCHEMA
from qup_ray.encoding import ChatFormat, fit_generation
from qup_ray.engines import (
    PoolEvents,
    collect_shards,
    generate_and_grade,
    isolating_crashes,
    request_seed,
)
from qup_ray.models import engine_max_len, resolve_model
from qup_ray.prompts import load_prompt
from qup_ray.rundir import (
    BLOCKED,
    CRASHED_SCHEMA,
    MANIFEST,
    RunDir,
    Stage,
    StageError,
    content_fingerprint,
    eval_cells,
    manifest_fingerprint,
    read_json,
    read_parquet,
    rejected_row,
    stable_hash,
    write_json,
    write_parquet,
)

logger = logging.getLogger(__name__)

BASE = "base"
SAMPLE_SCHEMA = pa.schema(
    [("problem_id", pa.string()), ("sample_idx", pa.int64()), ("response", pa.string()),
     ("extracted", pa.string()), ("correct", pa.bool_()), ("status", pa.string()),
     ("num_tokens", pa.int64()), ("finish_reason", pa.string())]
)  # fmt: skip


@dataclass
class Unit:
    """One (model, benchmark): its stage folder, requests and the shards still to generate."""

    benchmark: str
    stage: Stage
    requests: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    """Problems rejected before generation (prompt over the context)."""
    done_shards: set[int] = field(default_factory=set)
    engine_pass: dict[str, Any] | None = None
    """The engine pass that generated this run's shards of the unit: its id and what its
    pools survived (`generate`)."""


# --------------------------------------------------------------------------------------------
# Benchmarks and models
# --------------------------------------------------------------------------------------------


def load_benchmarks(cfg: ExperimentConfig, run: RunDir) -> dict[str, list[dict]]:
    """Every configured benchmark's problems (first `max_problems_per_benchmark`), written to
    `eval/benchmarks/` with the rows that could not be used."""
    out = {}
    for name, bench in cfg.evaluation.benchmarks.items():
        loaded, rejected = load_problems(bench.source, name)
        rows, seen = [], set()
        for i, row in enumerate(loaded):
            if row["problem_id"] in seen:  # the same problem twice would be scored twice
                rejected.append(
                    {
                        "row_index": i,
                        "benchmark": name,
                        "reason": "duplicate problem",
                        "raw": row["problem"][:2000],
                    }
                )
                continue
            seen.add(row["problem_id"])
            rows.append(row)
        cap = cfg.evaluation.max_problems_per_benchmark
        rows = rows[:cap] if cap else rows
        folder = run.root / "eval" / "benchmarks"
        write_parquet(folder / f"{name}.parquet", pa.Table.from_pylist(rows, PROBLEM_SCHEMA))
        write_parquet(
            folder / f"{name}-rejected.parquet",
            pa.Table.from_pylist(rejected, BENCHMARK_REJECTED_SCHEMA),
        )
        logger.info("benchmark %s: %d problems, %d rows rejected", name, len(rows), len(rejected))
        out[name] = rows
    return out


def model_source(cfg: ExperimentConfig, run: RunDir, cell: str) -> tuple[str | None, Path | None]:
    """(model path, train cell folder) of a cell; (None, folder) when the export is missing.
    A base cell's model is its student's configured checkpoint and has no train folder."""
    student, stream, _ = cell.split("/")
    if stream == BASE:
        return resolve_model(cfg.students[student].path, cfg), None
    train_dir = run.root / "train" / cell
    if not (train_dir / MANIFEST).is_file() or not (train_dir / "model").is_dir():
        return None, train_dir
    return str(train_dir / "model"), train_dir


def unit_hash(cfg: ExperimentConfig, cell: str, benchmark: str, problems: list[dict]) -> str:
    """What decides a unit's samples: sampling settings, grading, the student's model settings
    and prompt text, the benchmark's content (ids and gold answers), and for a base cell the
    checkpoint reference (a train cell's model is an input, fingerprinted by its manifest)."""
    e = cfg.evaluation
    student, stream, _ = cell.split("/")
    model = cfg.students[student]
    sampling = {
        k: getattr(e, k) for k in ("num_samples", "temperature", "top_p", "max_new_tokens", "seed")
    }
    model_view = result_view(model) if stream == BASE else result_view(model.engine)
    world = (
        cpu_world_identity(cfg.cpu_world)
        if stream == BASE and model.path.startswith("cpu-world:")
        else None
    )
    content = [(p["problem_id"], p["problem"], p["answer"]) for p in problems]
    return stable_hash(
        sampling,
        result_view(cfg.grading),
        model_view,
        model.prompt,
        load_prompt(model.prompt),
        benchmark,
        content,
        world,
    )


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def build_requests(
    cfg: ExperimentConfig, fmt: ChatFormat, limit: int, benchmark: str, problems: list[dict]
) -> tuple[list[dict], list[dict]]:
    """One request per problem (prompt ids, seed, generation limit fitted to the engine's
    context), and the problems whose prompt alone fills the context."""
    requests, rejected = [], []
    for p in problems:
        ids = fmt.prompt_ids(p["problem"])
        max_tokens = fit_generation(len(ids), cfg.evaluation.max_new_tokens, limit)
        if max_tokens is None:
            rejected.append(
                rejected_row(
                    p["problem_id"], "prompt_over_context", len(ids), limit, table=benchmark
                )
            )
            continue
        requests.append(
            {
                "problem_id": p["problem_id"],
                "answer": p["answer"],
                "prompt_ids": ids,
                "max_tokens": max_tokens,
                "seed": request_seed(cfg.evaluation.seed, benchmark, p["problem_id"]),
            }
        )
    return requests, rejected


def engine_batch_size(batch_size: int, shard_size: int) -> int:
    """The largest batch size <= `batch_size` dividing `shard_size`, so engine batches do not
    straddle shards and a resumed run feeds the engine the batches an unbroken run does."""
    return max(d for d in range(1, min(batch_size, shard_size) + 1) if shard_size % d == 0)


@dataclass
class CellWork:
    """One model's unfinished units, ready for generation."""

    cell: str
    model_path: str
    train_dir: Path | None
    units: list[Unit]
    """Every unit of the model (its manifest lists them all)."""
    pending: list[Unit] = field(default_factory=list)
    """The units still to evaluate."""


def generate(
    cfg: ExperimentConfig, student: str, works: list[CellWork], stop_token_ids: list[int]
) -> None:
    """One generate -> grade pass over every unfinished shard of these models (all of one
    student, so one prompt format and one set of stop tokens). The engine actors load the models
    one after another in the same process (`model_path` column), so many models pay one actor
    start-up and one import of vLLM; each shard is written as soon as all its samples are
    graded.

    Ray restarts an engine actor that dies and redoes its batch. If a batch kills its actor past
    every retry, the unfinished shards are redone one request per batch, and the requests that
    still crash are written to `crashed-*.parquet` beside their shard (`write_shards`). Every
    unit that took part records the pass (`Unit.engine_pass`: its id, actor restarts, retried
    batches)."""
    e = cfg.evaluation
    pending = [
        dict(q, work=w, unit=u, shard=i // e.shard_size, model_path=work.model_path)
        for w, work in enumerate(works)
        for u, unit in enumerate(work.pending)
        for i, q in enumerate(unit.requests)
        if i // e.shard_size not in unit.done_shards
    ]
    if not pending:
        return
    units = {(q["work"], q["unit"]): works[q["work"]].pending[q["unit"]] for q in pending}
    sampling = {
        "n": e.num_samples,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "max_tokens": e.max_new_tokens,
        "stop_token_ids": stop_token_ids,
    }
    # The pass's events beside the first unit's shards: shared storage on a cluster, and gone
    # once that unit finishes.
    events_root = next(iter(units.values())).stage.shard_dir / "engine_events"
    pools = [PoolEvents.fresh(events_root)]

    def redo_unfinished(failure: str) -> None:
        finished = {key: unit.stage.finished_shards() for key, unit in units.items()}
        todo = [q for q in pending if q["shard"] not in finished[(q["work"], q["unit"])]]
        pools.append(PoolEvents.fresh(events_root))
        write_shards(cfg, student, works, todo, sampling, pools[-1], error=failure)

    isolating_crashes(
        lambda: write_shards(cfg, student, works, pending, sampling, pools[0]),
        redo_unfinished,
        f"eval {student}: generation",
    )
    num_actors = cfg.students[student].engine.num_actors
    survived: Counter[str] = Counter()
    for events in pools:
        survived.update(events.summary(num_actors))
    engine_pass = {"id": pools[0].path.name, "actor_restarts": survived["actor_restarts"],
                   "retried_batches": survived["retried_batches"]}  # fmt: skip
    for unit in units.values():
        unit.engine_pass = engine_pass


def write_shards(
    cfg: ExperimentConfig, student: str, works: list[CellWork], pending: list[dict],
    sampling: dict[str, Any], events: PoolEvents, error: str | None = None,
) -> None:  # fmt: skip
    """One generate -> grade pipeline over `pending`, writing each (model, benchmark, shard) once
    all its samples are in. With an `error` (the failure that made this an isolating pass), one
    request per batch: a shard's problems left without their samples crashed their actor every
    time and are written, with the error, to the shard's `crashed` table before the shard."""
    n = cfg.evaluation.num_samples
    engine = cfg.students[student].engine
    ds = generate_and_grade(
        pending,
        None,
        engine,
        sampling=sampling,
        grading=cfg.grading,
        batch_size=engine_batch_size(engine.batch_size, cfg.evaluation.shard_size),
        cache_dir=str(cfg.cache_root()),
        tags={"student": student, "stage": "eval"},
        events_dir=events.path,
        isolating=error is not None,
    )
    expected = Counter((q["work"], q["unit"], q["shard"]) for q in pending)
    position = {(q["work"], q["unit"], q["problem_id"]): i for i, q in enumerate(pending)}

    def write(key: tuple[int, int, int], rows: list[dict]) -> None:  # in request order
        unit = works[key[0]].pending[key[1]]
        rows = sorted(
            rows, key=lambda r: (position[(key[0], key[1], r["problem_id"])], r["sample_idx"])
        )
        if error is not None:
            per_problem = Counter(r["problem_id"] for r in rows)
            crashed = [
                rejected_row(q["problem_id"], "engine_crash", len(q["prompt_ids"]), 0,
                             table=unit.benchmark) | {"error": error}
                for q in pending
                if (q["work"], q["unit"], q["shard"]) == key and per_problem[q["problem_id"]] < n
            ]  # fmt: skip
            lost = {r["problem_id"] for r in crashed}
            rows = [r for r in rows if r["problem_id"] not in lost]
            write_parquet(unit.stage.shard_dir / f"crashed-{key[2]:06d}.parquet",
                          pa.Table.from_pylist(crashed, schema=CRASHED_SCHEMA))  # fmt: skip
        table = pa.Table.from_pylist(
            [{k: r.get(k) for k in SAMPLE_SCHEMA.names} for r in rows], SAMPLE_SCHEMA
        )
        unit.stage.write_shard(key[2], table)
        logger.info("%s: shard %d written", unit.stage.dir, key[2])

    collect_shards(ds, expected, n, lambda r: (r["work"], r["unit"], r["shard"]), write,
                   error=error, what=student)  # fmt: skip


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------


def prepare_cell(
    cfg: ExperimentConfig, run: RunDir, cell: str, benchmarks: dict[str, list[dict]], force: bool
) -> CellWork | str:
    """A model's unfinished units with their requests; "done" when every unit finished earlier
    (its manifest is rewritten), "blocked" when its export is missing."""
    cell_dir = run.root / "eval" / cell
    model_path, train_dir = model_source(cfg, run, cell)
    if model_path is None:
        reason = f"no exported model in {train_dir}: run `qup run train` for this cell first"
        logger.warning("eval %s: %s", cell, reason)
        write_json(cell_dir / BLOCKED, {"reason": reason, "time": time.time()})
        return "blocked"
    with contextlib.suppress(FileNotFoundError):
        (cell_dir / BLOCKED).unlink()
    inputs = [train_dir] if train_dir is not None else []
    units = [
        Unit(
            name,
            Stage(
                cell_dir / name, unit_hash(cfg, cell, name, problems), inputs=inputs, force=force
            ),
        )
        for name, problems in benchmarks.items()
    ]
    work = CellWork(cell, model_path, train_dir, units, [u for u in units if not u.stage.is_done()])
    if not work.pending:
        write_cell_manifest(cfg, cell_dir, cell, units, train_dir)
        return "done"
    with contextlib.suppress(FileNotFoundError):
        (cell_dir / MANIFEST).unlink()  # the cell is not finished until its units are
    return work


def evaluate_cells(
    cfg: ExperimentConfig, run: RunDir, works: list[CellWork], benchmarks: dict[str, list[dict]]
) -> None:
    """Generate the missing shards of these models (one student's) in one engine pass, then
    finish each unit and each cell."""
    student = works[0].cell.split("/")[0]
    model = cfg.students[student]
    with contextlib.ExitStack() as stack:
        for work in works:
            fmt = ChatFormat.for_model(work.model_path, model.prompt)
            limit = engine_max_len(model.engine, work.model_path)
            for unit in work.pending:
                stack.enter_context(unit.stage.running())
                problems = benchmarks[unit.benchmark]
                unit.requests, unit.rejected = build_requests(
                    cfg, fmt, limit, unit.benchmark, problems
                )
                num_shards = math.ceil(len(unit.requests) / cfg.evaluation.shard_size)
                unit.done_shards = unit.stage.plan_shards(num_shards)
                stack.enter_context(unit.stage.timed("generate_and_grade"))
        generate(cfg, student, works, list(fmt.stop_token_ids))
    for work in works:
        for unit in work.pending:
            finish_unit(cfg, work.cell, unit, work.model_path)
        write_cell_manifest(
            cfg, run.root / "eval" / work.cell, work.cell, work.units, work.train_dir
        )


def finish_unit(cfg: ExperimentConfig, cell: str, unit: Unit, model_path: str) -> None:
    """Per-sample table beside the unit folder, the unit's rejected table, summary, manifest.

    The one rule for problems without samples: rejected before generation (prompt over the
    context) or isolated during it (`engine_crash`: it killed its engine actor every time), a
    problem is a row of the unit's rejected table, counted in `rejected` (the summary's
    `num_rejected`), and left out of `problems` and of every metric: Avg@k, pass@k and maj@k
    are over the problems that have their k samples."""
    crashed = [
        row
        for path in sorted(unit.stage.shard_dir.glob("crashed-*.parquet"))
        for row in read_parquet(path).to_pylist()
    ]
    rejected = [row | {"error": None} for row in unit.rejected] + crashed
    num_problems = len(unit.requests) - len(crashed)
    table = unit.stage.read_shards()
    table = (
        table.select(SAMPLE_SCHEMA.names).cast(SAMPLE_SCHEMA)
        if table.num_rows
        else (SAMPLE_SCHEMA.empty_table())
    )
    rows = table.drop_columns(["response"]).to_pylist()  # counts and metrics need no text
    if len(rows) != num_problems * cfg.evaluation.num_samples:
        raise RuntimeError(
            f"{unit.stage.dir}: {len(rows)} samples for {num_problems} "
            f"problems x {cfg.evaluation.num_samples}"
        )
    write_parquet(unit.stage.dir.parent / f"{unit.benchmark}.parquet", table)
    unit.stage.write_table("rejected", pa.Table.from_pylist(rejected, schema=CRASHED_SCHEMA))
    summary = metrics.summarize(rows) if rows else None
    unit.stage.finish(
        row_counts={"samples": len(rows), "problems": num_problems, "rejected": len(rejected)},
        cell=cell,
        benchmark=unit.benchmark,
        model_path=model_path,
        summary=summary,
        statuses=dict(Counter(r["status"] for r in rows)),
        generated_tokens=sum(r["num_tokens"] for r in rows),
        num_generation_shortened=sum(
            1 for q in unit.requests if q["max_tokens"] < cfg.evaluation.max_new_tokens
        ),
        faults={"isolated_rows": len(crashed)},
        engine_pass=unit.engine_pass,
    )
    if summary:
        logger.info(
            "eval %s %s: Avg@%d = %.4f",
            cell,
            unit.benchmark,
            summary["num_samples"],
            summary["avg_at_k"],
        )


def write_cell_manifest(
    cfg: ExperimentConfig, cell_dir: Path, cell: str, units: list[Unit], train_dir: Path | None
) -> None:
    """The cell's manifest, written once every unit is done: what `qup status` shows."""
    manifests = {u.benchmark: u.stage.manifest() or {} for u in units}
    config_hash = stable_hash({b: m.get("config_hash") for b, m in manifests.items()})
    write_json(
        cell_dir / MANIFEST,
        {
            "stage": str(cell_dir),
            "cell": cell,
            "config_hash": config_hash,
            "inputs": {str(train_dir): manifest_fingerprint(train_dir)} if train_dir else {},
            "row_counts": {
                b: m.get("row_counts", {}).get("samples", 0) for b, m in manifests.items()
            },
            "avg_at_k": {b: (m.get("summary") or {}).get("avg_at_k") for b, m in manifests.items()},
            "generated_tokens": sum(m.get("generated_tokens", 0) for m in manifests.values()),
            "faults": summed_faults(manifests.values()),
            "timings": {"duration_s": round(busy_seconds(manifests.values()), 3)},
            "fingerprint": content_fingerprint(cell_dir, config_hash),
        },
    )


def summed_faults(unit_manifests: Iterable[dict]) -> dict[str, int]:
    """What these units survived: the actor restarts and retried batches of their distinct
    engine passes (units generated in one pass share its pools: counted once) and their
    isolated rows."""
    manifests = list(unit_manifests)
    passes = {m["engine_pass"]["id"]: m["engine_pass"] for m in manifests if m.get("engine_pass")}
    return {
        "actor_restarts": sum(p["actor_restarts"] for p in passes.values()),
        "retried_batches": sum(p["retried_batches"] for p in passes.values()),
        "isolated_rows": sum(m.get("faults", {}).get("isolated_rows", 0) for m in manifests),
    }


def busy_seconds(manifests: Iterable[dict]) -> float:
    """Wall time the units took together: the union of their [started, finished] windows
    (units evaluated in one engine pass overlap; the grid's throughput estimate reads it)."""
    windows = sorted(
        (m["timings"]["started"], m["timings"]["finished"]) for m in manifests if m.get("timings")
    )
    total, end = 0.0, float("-inf")
    for start, finish in windows:
        total += max(0.0, finish - max(start, end))
        end = max(end, finish)
    return total


# --------------------------------------------------------------------------------------------
# The run's summary tables
# --------------------------------------------------------------------------------------------


TOTALS_SCHEMA = pa.schema(
    [("student", pa.string()), ("stream", pa.string()), ("objective", pa.string()),
     ("total_avg", pa.float64()), ("num_benchmarks", pa.int64())]
)  # fmt: skip


def summary_schema(cfg: ExperimentConfig) -> pa.Schema:
    """Columns of eval/summary.parquet: the cell and benchmark, then `metrics.summarize`'s
    (pass@k up to the samples taken) and the problems rejected before generation."""
    ks = metrics.reported_pass_ks(cfg.evaluation.num_samples)
    rates = [
        "avg_at_k",
        "avg_at_k_std",
        *[f"pass_at_{k}" for k in ks],
        "maj_at_k",
        "truncation_rate",
        "unverifiable_rate",
        "mean_tokens",
    ]
    return pa.schema(
        [(c, pa.string()) for c in ("student", "stream", "objective", "benchmark")]
        + [("num_problems", pa.int64()), ("num_samples", pa.int64())]
        + [(c, pa.float64()) for c in rates]
        + [("num_rejected", pa.int64())]
    )


def current_units(
    cfg: ExperimentConfig, run: RunDir, benchmarks: dict[str, list[dict]]
) -> list[tuple[str, str, dict]]:
    """(cell, benchmark, manifest) of every finished unit of the configured cells and
    benchmarks whose manifest matches this config and model: a unit left from another config is
    not mixed in, even when this job did not redo it."""
    units = []
    for cell in eval_cells(cfg):
        stream = cell.split("/")[1]
        train_dir = None if stream == BASE else run.root / "train" / cell
        inputs = {str(train_dir): manifest_fingerprint(train_dir)} if train_dir else {}
        for bench, problems in benchmarks.items():
            path = run.root / "eval" / cell / bench / MANIFEST
            m = read_json(path) if path.is_file() else {}
            current = m.get("config_hash") == unit_hash(cfg, cell, bench, problems)
            if current and m.get("inputs") == inputs:
                units.append((cell, bench, m))
    return units


def summary_rows(units: list[tuple[str, str, dict]]) -> list[dict[str, Any]]:
    """One row per current unit (`current_units`) with samples."""
    return [
        {
            **dict(zip(("student", "stream", "objective"), cell.split("/"), strict=True)),
            "benchmark": bench,
            **m["summary"],
            "num_rejected": m["row_counts"].get("rejected", 0),
        }
        for cell, bench, m in units
        if m.get("summary")
    ]


def totals_rows(cfg: ExperimentConfig, summary: list[dict]) -> list[dict[str, Any]]:
    """Total Avg of every model that has all configured benchmarks summarised."""
    by_cell: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for r in summary:
        by_cell[(r["student"], r["stream"], r["objective"])][r["benchmark"]] = r["avg_at_k"]
    wanted = set(cfg.evaluation.benchmarks)
    return [
        {
            "student": s,
            "stream": st,
            "objective": o,
            "total_avg": metrics.total_avg(avgs),
            "num_benchmarks": len(avgs),
        }
        for (s, st, o), avgs in by_cell.items()
        if set(avgs) == wanted
    ]


def write_summaries(
    cfg: ExperimentConfig, run: RunDir, benchmarks: dict[str, list[dict]], states: dict[str, str]
) -> Path:
    """eval/summary.parquet, eval/totals.parquet and eval/_manifest.json (written last)."""
    out = run.root / "eval"
    units = current_units(cfg, run, benchmarks)
    summary = summary_rows(units)
    totals = totals_rows(cfg, summary)
    write_parquet(out / "summary.parquet", pa.Table.from_pylist(summary, summary_schema(cfg)))
    write_parquet(out / "totals.parquet", pa.Table.from_pylist(totals, TOTALS_SCHEMA))
    config_hash = cfg.section_hash("evaluation", "grading")
    blocked = sorted(c for c, s in states.items() if s == "blocked")
    write_json(
        out / MANIFEST,
        {
            "stage": str(out),
            "config_hash": config_hash,
            "row_counts": {
                "summary": len(summary),
                "totals": len(totals),
                "blocked_models": len(blocked),
            },
            "blocked_models": blocked,
            "cells_this_run": states,
            "faults": summed_faults(m for _, _, m in units),
            "fingerprint": content_fingerprint(out, config_hash),
        },
    )
    if blocked:
        logger.warning(
            "eval: %d model(s) not exported yet, not evaluated: %s",
            len(blocked),
            ", ".join(blocked),
        )
    return out


def run(cfg: ExperimentConfig, *, force: bool = False, cells: list[str] | None = None) -> Path:
    """Evaluate every base student and trained export (or only `cells`) on every benchmark."""
    from qup_ray.ray_session import init_ray

    run_dir = RunDir.for_config(cfg)
    known = eval_cells(cfg)
    unknown = sorted(set(cells or []) - set(known))
    if unknown:
        raise StageError(f"unknown eval cells {unknown}; cells of this config: {', '.join(known)}")
    chosen = [c for c in known if cells is None or c in cells]
    benchmarks = load_benchmarks(cfg, run_dir)
    init_ray(cfg.ray)
    import ray

    width = models_side_by_side(cfg, ray.cluster_resources().get("GPU", 0.0))
    logger.info("eval: %d model(s), %d at a time", len(chosen), width)

    states: dict[str, str] = {}
    works: list[CellWork] = []
    for cell in chosen:
        prepared = prepare_cell(cfg, run_dir, cell, benchmarks, force)
        if isinstance(prepared, str):
            states[cell] = prepared
        else:
            works.append(prepared)
            states[cell] = "done"
    by_student: dict[str, list[CellWork]] = defaultdict(list)
    for work in works:
        by_student[work.cell.split("/")[0]].append(work)
    if width == 1:  # one engine actor pool per student, loading its models one after another
        for student_works in by_student.values():
            evaluate_cells(cfg, run_dir, student_works, benchmarks)
    else:  # each model's Ray Data pipeline runs from its own driver thread, side by side
        with ThreadPoolExecutor(width, thread_name_prefix="eval") as pool:
            list(pool.map(lambda w: evaluate_cells(cfg, run_dir, [w], benchmarks), works))
    return write_summaries(cfg, run_dir, benchmarks, states)


def models_side_by_side(cfg: ExperimentConfig, cluster_gpus: float) -> int:
    """How many models are evaluated at once: `evaluation.max_parallel_models`, at most as many
    as the cluster's GPUs hold (each model takes `num_actors x num_gpus_per_actor` of its
    student's engine); one on CPU, where engines would only compete for the same cores."""
    per_model = max(
        s.engine.num_actors * s.engine.num_gpus_per_actor for s in cfg.students.values()
    )
    if per_model <= 0:
        return 1
    fit = max(1, int(cluster_gpus // per_model))
    wanted = cfg.evaluation.max_parallel_models
    return min(fit, wanted) if wanted else fit
