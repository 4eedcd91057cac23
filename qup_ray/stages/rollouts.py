"""Stage `rollouts`: rejection sampling with every student, the shared problem set, SLM-RFT.

    qup run rollouts -c configs/paper.yaml

1. For each student, N samples per problem at temperature T through a Ray Data pipeline:
   vLLM actors generate (GPU stage), grader actors check every sample (CPU stage). Output is
   written shard by shard, so a killed run resumes without regenerating finished shards.
2. The shared problem set: the problems the anchor student solves at least once.
3. The SLM-RFT stream of each student: one correct, lightly filtered trace per problem.

Outputs: rollouts/<student>/rollouts.parquet, problem_set/problem_set.parquet,
streams/<student>/slm_rft/stream.parquet, each with its manifest.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qup_ray.answers import answer_parts
from qup_ray.config import ExperimentConfig, result_view
from qup_ray.data import PROBLEM_SCHEMA
from qup_ray.encoding import ChatFormat, fit_generation
from qup_ray.engines import (
    PoolEvents,
    VLLMGenerator,
    collect_shards,
    generate_and_grade,
    isolating_crashes,
    request_seed,
)
from qup_ray.models import engine_max_len, resolve_model
from qup_ray.prompts import load_prompt
from qup_ray.rft import select_rft
from qup_ray.rundir import (
    CRASHED_SCHEMA,
    STREAM_SCHEMA,
    RunDir,
    Stage,
    StageError,
    iter_batches,
    iter_rows,
    num_rows,
    read_parquet,
    rejected_row,
    stable_hash,
    write_parquet,
)

logger = logging.getLogger(__name__)

ROLLOUT_SCHEMA = pa.schema(
    [("problem_id", pa.string()), ("student", pa.string()), ("sample_idx", pa.int64()),
     ("response", pa.string()), ("finish_reason", pa.string()), ("num_tokens", pa.int64()),
     ("extracted", pa.string()), ("extract_mode", pa.string()), ("correct", pa.bool_()),
     ("status", pa.string())]
)  # fmt: skip
"""The rollouts' rejected table: a request whose prompt fills the context, or one that crashed
its engine actor every time it was sent (reason `engine_crash`, with the error)."""


def build_prompts(
    cfg: ExperimentConfig, student: str, model_path: str, problems: Iterable[dict],
    fmt: ChatFormat | None = None,
) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Generation requests (token ids from the one encoding, a per-request seed and a generation
    limit fitted to the engine's context) and the rejected rows: problems whose prompt alone
    fills the engine's context. `problems` may stream (rows of `problem_id`, `problem`,
    `answer`): only the requests are kept."""
    model = cfg.students[student]
    fmt = fmt or ChatFormat.for_model(model_path, model.prompt)
    limit = engine_max_len(model.engine, model_path)
    requests, rejected = [], []
    for p in problems:
        ids = fmt.prompt_ids(p["problem"])
        max_tokens = fit_generation(len(ids), cfg.rollouts.max_new_tokens, limit)
        if max_tokens is None:
            rejected.append(rejected_row(p["problem_id"], "prompt_over_context", len(ids), limit))
            continue
        requests.append(
            {"problem_id": p["problem_id"], "answer": p["answer"], "prompt_ids": ids,
             "max_tokens": max_tokens,
             "seed": request_seed(cfg.rollouts.seed, student, p["problem_id"])}
        )  # fmt: skip
    return requests, rejected


def aligned_batch_size(batch_size: int, shard_size: int) -> int:
    """The largest batch size <= `batch_size` dividing `shard_size`: engine batches then never
    straddle shards, so a resumed run feeds the engine exactly the batches an unbroken run does."""
    return max(d for d in range(1, min(batch_size, shard_size) + 1) if shard_size % d == 0)


def sampling_kwargs(cfg: ExperimentConfig, stop_token_ids: list[int]) -> dict[str, Any]:
    """`vllm.SamplingParams` keyword arguments of the rollouts (the seed is per request; the
    stop tokens are the student's turn end and EOS, so no sample runs into an invented turn)."""
    r = cfg.rollouts
    return {"n": r.num_samples_per_problem, "temperature": r.temperature, "top_p": r.top_p,
            "max_tokens": r.max_new_tokens, "stop_token_ids": stop_token_ids}  # fmt: skip


def engine_batch_size(cfg: ExperimentConfig, student: str) -> int:
    """Prompts per engine call: the student's batch size, aligned to the shard size."""
    return aligned_batch_size(cfg.students[student].engine.batch_size, cfg.rollouts.shard_size)


def rollout_dataset(cfg: ExperimentConfig, student: str, model_path: str, rows: list[dict],
                    generator: type = VLLMGenerator, fmt: ChatFormat | None = None,
                    events: PoolEvents | None = None, isolating: bool = False) -> Any:  # fmt: skip
    """The Ray Data pipeline of the stage (`engines.generate_and_grade` with the student's
    engine, sampling and batch size). `qup bench rollouts` times this same pipeline."""
    fmt = fmt or ChatFormat.for_model(model_path, cfg.students[student].prompt)
    return generate_and_grade(
        rows, model_path, cfg.students[student].engine,
        sampling=sampling_kwargs(cfg, list(fmt.stop_token_ids)), grading=cfg.grading,
        batch_size=engine_batch_size(cfg, student), cache_dir=str(cfg.cache_root()),
        tags={"student": student, "stage": "rollouts"}, generator=generator,
        events_dir=events.path if events else None, isolating=isolating,
    )  # fmt: skip


def generate(cfg: ExperimentConfig, student: str, model_path: str, requests: list[dict],
             stage: Stage, done: set[int], fmt: ChatFormat) -> dict[str, int]:  # fmt: skip
    """Run the generate -> grade pipeline over the unfinished shards, writing each as it
    completes. Ray restarts engine actors that die and redoes their batches; if a batch kills
    its actor past every retry, the unfinished shards are redone one request per batch and the
    requests that still crash are set aside (`crashed-*.parquet` next to the shards, reason
    `engine_crash`). Returns what the engine pools survived (see `engines.PoolEvents`)."""
    r = cfg.rollouts
    pending = [
        dict(q, shard=i // r.shard_size)
        for i, q in enumerate(requests)
        if i // r.shard_size not in done
    ]
    if not pending:
        return {}
    pools = [PoolEvents.fresh(stage.shard_dir / "engine_events")]

    def redo_unfinished(failure: str) -> None:
        finished = stage.finished_shards()
        todo = [q for q in pending if q["shard"] not in finished]
        pools.append(PoolEvents.fresh(stage.shard_dir / "engine_events"))
        write_shards(cfg, student, model_path, todo, stage, fmt, pools[-1], error=failure)

    isolating_crashes(
        lambda: write_shards(cfg, student, model_path, pending, stage, fmt, pools[0]),
        redo_unfinished, f"{stage.dir}: generation",
    )  # fmt: skip
    num_actors = cfg.students[student].engine.num_actors
    totals = Counter()
    for events in pools:
        totals.update(events.summary(num_actors))
    return dict(totals)


def write_shards(cfg: ExperimentConfig, student: str, model_path: str, pending: list[dict],
                 stage: Stage, fmt: ChatFormat, events: PoolEvents,
                 error: str | None = None) -> None:  # fmt: skip
    """One generate -> grade pass, writing each shard once all its samples are in. With an
    `error` (the failure that made this an isolating pass), one request per batch: requests
    without samples at the end crashed their actor every time and are written, with the error,
    to the shard's `crashed` table before the shard itself."""
    n = cfg.rollouts.num_samples_per_problem
    expected = Counter(q["shard"] for q in pending)
    ds = rollout_dataset(cfg, student, model_path, pending, fmt=fmt, events=events,
                         isolating=error is not None)  # fmt: skip
    position = {q["problem_id"]: i for i, q in enumerate(pending)}

    def write(shard: int, rows: list[dict]) -> None:  # in request order
        rows = sorted(rows, key=lambda x: (position[x["problem_id"]], x["sample_idx"]))
        if error is not None:
            got = {row["problem_id"] for row in rows}
            crashed = [rejected_row(q["problem_id"], "engine_crash", len(q["prompt_ids"]), 0)
                       | {"error": error}
                       for q in pending if q["shard"] == shard and q["problem_id"] not in got]  # fmt: skip
            write_parquet(stage.shard_dir / f"crashed-{shard:06d}.parquet",
                          pa.Table.from_pylist(crashed, schema=CRASHED_SCHEMA))  # fmt: skip
        stage.write_shard(shard, pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA))
        logger.info("%s: shard %d written", stage.dir, shard)

    def keep(row: dict) -> dict:
        return {k: row.get(k) for k in ROLLOUT_SCHEMA.names if k != "student"} | {
            "student": student
        }

    with stage.timed("generate_and_grade"):
        collect_shards(ds, expected, n, lambda row: row["shard"], write, error=error, keep=keep,
                       what=str(stage.dir))  # fmt: skip


def run_student(
    cfg: ExperimentConfig, run: RunDir, student: str, problems_path: Path, force: bool
) -> Path:
    """Rollouts of one student: `rollouts/<student>/rollouts.parquet`."""
    model = cfg.students[student]
    config_hash = (
        cfg.section_hash("rollouts", "grading", "cpu_world")
        + ":"
        # The prompt file by content: editing a prompt reruns what used it.
        + stable_hash(result_view(model), load_prompt(model.prompt))
    )
    stage = Stage(
        run.root / "rollouts" / student, config_hash, inputs=[run.root / "problems"], force=force
    )
    if stage.is_done():
        return stage.dir
    with stage.running():
        t0 = time.time()
        model_path = resolve_model(model.path, cfg)
        fmt = ChatFormat.for_model(model_path, model.prompt)  # the tokenizer loads once
        requests, rejected = build_prompts(
            cfg, student, model_path, iter_rows(problems_path, ["problem_id", "problem", "answer"]),
            fmt,
        )  # fmt: skip
        num_shards = math.ceil(len(requests) / cfg.rollouts.shard_size)
        done = stage.plan_shards(num_shards)
        survived = generate(cfg, student, model_path, requests, stage, done, fmt)
        crashed = [row for path in sorted(stage.shard_dir.glob("crashed-*.parquet"))
                   for row in read_parquet(path).to_pylist()]  # fmt: skip
        rejected = [row | {"error": None} for row in rejected] + crashed
        stage.write_table("rejected", pa.Table.from_pylist(rejected, schema=CRASHED_SCHEMA))
        # Shard by shard into one table, and counted from its bookkeeping columns: the
        # driver never holds the samples' text.
        stage.write_table("rollouts", iter_batches(stage.shard_paths()), schema=ROLLOUT_SCHEMA)
        tally = rollout_tally(stage.path("rollouts"))
        problem_ids = read_parquet(problems_path, ["problem_id"]).column("problem_id").to_pylist()
        first = next(iter_rows(problems_path, ["problem"], batch_rows=1), None)
        generated_tokens = tally["generated_tokens"]
        stage.finish(
            row_counts={"rollouts": tally["rows"], "problems": len(requests),
                        "rejected": len(rejected)},
            student=student, model_path=model.path,
            prompt={"file": model.prompt, "template": load_prompt(model.prompt),
                    "example_rendered": fmt.prompt_text(first["problem"]) if first else None,
                    "example_ids": requests[0]["prompt_ids"] if requests else None},
            num_generation_shortened=sum(
                1 for q in requests if q["max_tokens"] < cfg.rollouts.max_new_tokens),
            statuses=tally["statuses"],
            # Gold answers with several boxed parts (all are required; see answers.answer_parts).
            gold_multi_part=sum(1 for p in iter_rows(problems_path, ["solution"])
                                if len(answer_parts(p.get("solution") or "")) > 1),
            num_correct=tally["num_correct"],
            num_truncated=tally["num_truncated"],
            pass_histogram=pass_histogram(tally["correct_by_problem"], problem_ids,
                                          cfg.rollouts.num_samples_per_problem),
            generated_tokens=generated_tokens,
            tokens_per_s=round(generated_tokens / max(time.time() - t0, 1e-9), 2),
            faults={"actor_restarts": survived.get("actor_restarts", 0),
                    "retried_batches": survived.get("retried_batches", 0),
                    "isolated_rows": len(crashed)},
        )  # fmt: skip
    return stage.dir


def correct_counts(rollouts_path: Path) -> Counter:
    """problem_id -> correct samples, from the `problem_id` and `correct` columns (streamed)."""
    counts: Counter[str] = Counter()
    for batch in iter_batches(rollouts_path, ["problem_id", "correct"]):
        solved = batch.filter(pc.equal(batch.column("correct"), True)).column("problem_id")
        for item in pc.value_counts(solved).to_pylist():
            counts[item["values"]] += item["counts"]
    return counts


def rollout_tally(rollouts_path: Path) -> dict[str, Any]:
    """What the rollouts manifest counts, read batch by batch from the bookkeeping columns:
    rows, statuses, correct and truncated samples, generated tokens, correct per problem."""
    tally: dict[str, Any] = {"rows": 0, "num_correct": 0, "num_truncated": 0,
                             "generated_tokens": 0}  # fmt: skip
    statuses: Counter[str] = Counter()
    for batch in iter_batches(rollouts_path, ["status", "correct", "finish_reason", "num_tokens"]):
        tally["rows"] += batch.num_rows
        tally["num_correct"] += pc.sum(pc.equal(batch.column("correct"), True)).as_py() or 0
        tally["num_truncated"] += (
            pc.sum(pc.equal(batch.column("finish_reason"), "length")).as_py() or 0
        )
        tally["generated_tokens"] += pc.sum(batch.column("num_tokens")).as_py() or 0
        for item in pc.value_counts(batch.column("status")).to_pylist():
            statuses[item["values"]] += item["counts"]
    tally["statuses"] = dict(statuses)
    tally["correct_by_problem"] = correct_counts(rollouts_path)
    return tally


def pass_histogram(num_correct: Counter, problem_ids: list[str], n: int) -> dict[str, int]:
    """How many problems have k correct samples, for k = 0..n."""
    hist = Counter(num_correct.get(pid, 0) for pid in problem_ids)
    return {str(k): hist.get(k, 0) for k in range(n + 1)}


def run_problem_set(cfg: ExperimentConfig, run: RunDir, problems_path: Path, force: bool) -> Path:
    """The problems the anchor student solves at least once: `problem_set/problem_set.parquet`."""
    anchor = cfg.anchor_student
    inputs = [run.root / "problems", *[run.root / "rollouts" / s for s in cfg.students]]
    stage = Stage(
        run.root / "problem_set", cfg.section_hash("anchor_student"), inputs=inputs, force=force
    )
    if stage.is_done():
        return stage.dir
    with stage.running():
        n = cfg.rollouts.num_samples_per_problem
        problem_ids = read_parquet(problems_path, ["problem_id"]).column("problem_id").to_pylist()
        histograms, correct_by_student = {}, {}
        for student in cfg.students:
            counts = correct_counts(run.root / "rollouts" / student / "rollouts.parquet")
            correct_by_student[student] = counts
            histograms[student] = pass_histogram(counts, problem_ids, n)
        anchor_counts = correct_by_student[anchor]
        solved = pa.array(sorted(anchor_counts), pa.string())
        schema = PROBLEM_SCHEMA.append(pa.field("anchor_num_correct", pa.int64())).append(
            pa.field("anchor_pass_rate", pa.float64())
        )

        def kept() -> Iterator[pa.RecordBatch]:  # the problems' order, text a batch at a time
            for batch in iter_batches(problems_path):
                batch = batch.filter(pc.is_in(batch.column("problem_id"), value_set=solved))
                num = [anchor_counts[pid] for pid in batch.column("problem_id").to_pylist()]
                yield pa.RecordBatch.from_arrays(
                    [*batch.select(PROBLEM_SCHEMA.names).cast(PROBLEM_SCHEMA).columns,
                     pa.array(num, pa.int64()), pa.array([k / n for k in num], pa.float64())],
                    schema=schema,
                )  # fmt: skip

        stage.write_table("problem_set", kept(), schema=schema)
        num_kept = num_rows(stage.path("problem_set"))
        stage.finish(
            row_counts={"problem_set": num_kept}, anchor_student=anchor,
            counts={"problems": len(problem_ids), "solved_by_anchor": num_kept,
                    "unsolved_by_anchor": len(problem_ids) - num_kept},
            pass_histograms=histograms,
        )  # fmt: skip
    return stage.dir


def run_slm_rft(cfg: ExperimentConfig, run: RunDir, student: str, force: bool) -> Path:
    """`streams/<student>/slm_rft/stream.parquet`: the student's own correct traces."""
    rollouts_dir, set_dir = run.root / "rollouts" / student, run.root / "problem_set"
    stage = Stage(run.root / "streams" / student / "slm_rft", cfg.section_hash("rollouts"),
                  inputs=[rollouts_dir, set_dir], force=force)  # fmt: skip
    if stage.is_done():
        return stage.dir
    with stage.running():
        rollouts_path = rollouts_dir / "rollouts.parquet"
        problem_set = read_parquet(set_dir / "problem_set.parquet", ["problem_id"])
        ids = set(problem_set.column("problem_id").to_pylist())
        # The length limit needs every correct sample's length first (a column, no text); then
        # one streamed pass judges each sample and keeps only (problem, sample, length).
        light = read_parquet(rollouts_path, ["problem_id", "correct", "num_tokens"])
        light = light.filter(pc.and_(pc.equal(light.column("correct"), True),
                                     pc.is_in(light.column("problem_id"),
                                              value_set=problem_set.column("problem_id"))))  # fmt: skip
        chosen, counts = select_rft(
            iter_rows(rollouts_path, ROLLOUT_COLUMNS_FOR_RFT), ids, cfg.rollouts.rft,
            cfg.rollouts.seed, lengths=light.column("num_tokens").to_pylist(),
            fields=("problem_id", "sample_idx", "num_tokens"),
        )  # fmt: skip
        stream = rft_stream(rollouts_path, set_dir / "problem_set.parquet", chosen, student)
        stage.write_table("stream", stream)
        counts["problem_set"] = len(ids)
        counts["no_correct_trace"] = len(ids) - len(set(light.column("problem_id").to_pylist()))
        stage.finish(
            row_counts={"stream": stream.num_rows}, filters=counts,
            selection=cfg.rollouts.rft.selection,
        )  # fmt: skip
    return stage.dir


ROLLOUT_COLUMNS_FOR_RFT = [
    "problem_id", "sample_idx", "response", "finish_reason", "num_tokens", "correct",
]  # fmt: skip


def rft_stream(rollouts_path: Path, problem_set_path: Path, chosen: list[dict],
               student: str) -> pa.Table:  # fmt: skip
    """The SLM-RFT stream of the `chosen` (problem_id, sample_idx) samples, sorted by problem:
    their responses joined (in Arrow, a batch at a time) with their problems."""
    keys = pa.table({"problem_id": pa.array([c["problem_id"] for c in chosen], pa.string()),
                     "sample_idx": pa.array([c["sample_idx"] for c in chosen], pa.int64())})  # fmt: skip
    parts = [
        pa.Table.from_batches([batch]).join(keys, ["problem_id", "sample_idx"], join_type="inner")
        for batch in iter_batches(
            rollouts_path, ["problem_id", "sample_idx", "response", "num_tokens"]
        )
    ]
    picked = (
        pa.concat_tables(parts)
        if parts
        else keys.append_column("response", pa.array([], pa.string())).append_column(
            "num_tokens", pa.array([], pa.int64())
        )
    )
    problems = read_parquet(problem_set_path, ["problem_id", "problem", "answer"])
    picked = picked.join(problems, "problem_id", join_type="inner").sort_by("problem_id")
    n = picked.num_rows
    return pa.table(
        {"problem_id": picked.column("problem_id"), "problem": picked.column("problem"),
         "answer": picked.column("answer"), "trace": picked.column("response"),
         "student": pa.array([student] * n, pa.string()),
         "stream": pa.array(["slm_rft"] * n, pa.string()),
         "sample_idx": picked.column("sample_idx"), "num_tokens": picked.column("num_tokens")},
    ).cast(STREAM_SCHEMA)  # fmt: skip


def run(cfg: ExperimentConfig, *, force: bool = False) -> Path:
    """Rollouts for every student, then the shared problem set, then each SLM-RFT stream."""
    from qup_ray.ray_session import init_ray

    run_dir = RunDir.for_config(cfg)
    problems_path = run_dir.root / "problems" / "problems.parquet"
    if not problems_path.is_file():
        raise StageError(f"{problems_path} not found: run `qup run problems` first")
    for model in cfg.students.values():  # a model missing offline stops here, before Ray starts
        resolve_model(model.path, cfg)
    init_ray(cfg.ray)
    for student in cfg.students:
        run_student(cfg, run_dir, student, problems_path, force)
    run_problem_set(cfg, run_dir, problems_path, force)
    for student in cfg.students:
        run_slm_rft(cfg, run_dir, student, force)
    return run_dir.root / "rollouts"
