"""Stage `streams`: the parallel data streams of every student over the same problem set.

    qup run streams -c configs/paper.yaml

For each student (its `slm_rft` stream comes from the rollouts stage):
- `oracle_refined`: the refine oracle minimally repairs each SLM-RFT trace;
- `oracle_synthesized`: the synthesize oracle solves each problem of the shared set from scratch;
- `numina_subset`: the source's own solution of each problem;
- `style_aligned_<oracle>`: each style oracle repairs the logic of each SLM-RFT trace in the
  student's own style, shown by a few other traces of the same student;
- semantic retention (1-5, by the judge oracle) of the refined, synthesized and style-aligned
  traces (each against the student's own SLM-RFT trace of the problem).
Oracle answers are graded; wrong ones are dropped (counted) unless
`streams.keep_wrong_oracle_answers`. Every oracle reply is cached in `<run>/oracle_cache/`, so a
rerun (or `--force`) never pays twice. Finally `streams/<student>/final/<stream>.parquet` holds
every stream cut to the problem ids all of them cover, with counts and reasons in its manifest.

The learner-compatibility streams (`slm_min_ppl`, `compat_select`, `reward_select`) are chosen
per problem of the cut from a scored pool (`qup_ray.selection`); their final tables add
`source`, `selection_mean_nll` and `selection_reward` columns, and the final manifest records
the pool and the mix of sources chosen.

Each stream folder holds `generated.parquet` (every row with its status and reason) and
`stream.parquet` (the rows kept).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from qup_ray.config import ExperimentConfig, OracleConfig, result_view
from qup_ray.grading import BoundedChecker
from qup_ray.oracle.client import OracleRequest, OracleResult, ReplyCheck, run_requests
from qup_ray.oracle.prompts import (
    check_boxed_answer,
    check_retention_score,
    parse_retention_score,
    refine_messages,
    retention_judge_messages,
    style_align_messages,
    synthesize_messages,
)
from qup_ray.prompts import load_prompt
from qup_ray.rft import rft_candidates
from qup_ray.rundir import (
    STREAM_SCHEMA,
    RunDir,
    Stage,
    StageError,
    iter_batches,
    num_rows,
    read_parquet,
    stable_hash,
)
from qup_ray.scoring import score_ppl, score_reward
from qup_ray.selection import OWN_SAMPLES, SELECTION_STREAMS, select

logger = logging.getLogger(__name__)

FINAL_SCHEMA = STREAM_SCHEMA.append(pa.field("retention", pa.int64()))
SELECTED_SCHEMA = pa.schema(
    [*FINAL_SCHEMA, pa.field("source", pa.string()), pa.field("selection_mean_nll", pa.float64()),
     pa.field("selection_reward", pa.float64())]
)  # fmt: skip
"""A selection stream: the final schema, where each chosen trace came from, and the scores it
was chosen by (mean NLL under the student; reward of the first reward model, when used)."""
GENERATED_SCHEMA = pa.schema(
    [("problem_id", pa.string()), ("stream", pa.string()), ("status", pa.string()),
     ("reason", pa.string()), ("trace", pa.string()), ("extracted", pa.string()),
     ("correct", pa.bool_()), ("retention", pa.int64()), ("prompt_tokens", pa.int64()),
     ("completion_tokens", pa.int64()), ("cost_usd", pa.float64()), ("cached", pa.bool_())]
)  # fmt: skip


class BudgetExhausted(StageError):
    """The oracle budget ran out; the finished requests are cached and a rerun resumes."""


def ask(
    cfg: ExperimentConfig,
    run: RunDir,
    oracle: str,
    requests: list[OracleRequest],
    check: ReplyCheck | None = None,
) -> list[OracleResult]:
    """Send requests to one oracle through its cache; batch vLLM engines for `vllm` oracles."""
    ocfg: OracleConfig = cfg.oracles[oracle]
    cache_dir = run.root / "oracle_cache" / oracle
    if ocfg.backend == "vllm" and not ocfg.base_url:
        from qup_ray.oracle.batch_engine import run_engine_requests

        return run_engine_requests(ocfg, requests, cache_dir, cfg)
    # A reply failing `check` (no boxed answer, no score) is retried and never cached.
    return run_requests(ocfg, requests, cache_dir, check=check)


def grade_replies(cfg: ExperimentConfig, golds: list[str], traces: list[str]) -> list:
    """The project's bounded checker over (gold, oracle trace) pairs."""
    with BoundedChecker(
        workers=cfg.grading.num_workers, timeout_s=cfg.grading.timeout_s
    ) as checker:
        return checker.check_many(
            list(zip(golds, traces, strict=True)), lenient=cfg.grading.lenient
        )


def judge_retention(cfg: ExperimentConfig, run: RunDir, originals: list[str], refined: list[str],
                    keys: list[str]) -> list[int | None]:  # fmt: skip
    """Semantic retention (1-5) of each refined trace against its original; None: unparseable."""
    requests = [OracleRequest(f"{k}:retention", retention_judge_messages(o, r))
                for k, o, r in zip(keys, originals, refined, strict=True)]  # fmt: skip
    results = ask(cfg, run, cfg.streams.retention_judge, requests, check=check_retention_score)
    return [parse_retention_score(r.content) if r.status == "done" else None for r in results]


def oracle_stream(cfg: ExperimentConfig, run: RunDir, student: str, stream: str, oracle: str,
                  items: list[dict], messages: list[list[dict]], prompt_file: str,
                  retention_of: list[str | None] | None, force: bool) -> Path:  # fmt: skip
    """One oracle-made stream: ask, grade, judge retention, keep the right ones."""
    inputs = [run.root / "problem_set", run.root / "streams" / student / "slm_rft"]
    judge = (
        [cfg.streams.retention_judge]
        if retention_of is not None and cfg.streams.retention_judge
        else []
    )
    prompt_state = json.dumps(
        [load_prompt(prompt_file), *[load_prompt("retention_judge")] * bool(judge)]
    )
    config_hash = (
        cfg.section_hash("streams", "grading")
        + ":"
        + stable_hash([result_view(cfg.oracles[o]) for o in [oracle, *judge]], prompt_state)
    )
    stage = Stage(run.root / "streams" / student / stream, config_hash, inputs=inputs, force=force)
    if stage.is_done():
        return stage.dir
    with stage.running():
        requests = [
            OracleRequest(f"{it['problem_id']}:{stream}", m)
            for it, m in zip(items, messages, strict=True)
        ]
        with stage.timed("oracle"):
            results = ask(cfg, run, oracle, requests, check=check_boxed_answer)
        done = [i for i, r in enumerate(results) if r.status == "done"]
        with stage.timed("grade"):
            grades = dict(zip(done, grade_replies(cfg, [items[i]["answer"] for i in done],
                                                  [results[i].content for i in done]), strict=True))  # fmt: skip
        retention: dict[int, int | None] = {}
        if judge:
            # Judged against the student's own trace of the problem, where it has one (a
            # synthesized trace of a problem the student never solved has nothing to retain).
            judged = [i for i in done if retention_of[i] is not None]
            with stage.timed("retention"):
                scores = judge_retention(cfg, run, [retention_of[i] for i in judged],
                                         [results[i].content for i in judged],
                                         [items[i]["problem_id"] for i in judged])  # fmt: skip
            retention = dict(zip(judged, scores, strict=True))
        generated, kept = [], []
        for i, (item, result) in enumerate(zip(items, results, strict=True)):
            grade = grades.get(i)
            status, reason = _row_status(cfg, result, grade)
            generated.append({
                "problem_id": item["problem_id"], "stream": stream, "status": status, "reason": reason,
                "trace": result.content, "extracted": grade.extracted if grade else None,
                "correct": grade.correct if grade else None, "retention": retention.get(i),
                "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "cost_usd": result.cost_usd, "cached": result.cached,
            })  # fmt: skip
            if status == "kept":
                kept.append({"problem_id": item["problem_id"], "problem": item["problem"],
                             "answer": item["answer"], "trace": result.content, "student": student,
                             "stream": stream, "sample_idx": 0, "num_tokens": result.completion_tokens,
                             "retention": retention.get(i)})  # fmt: skip
        stage.write_table("generated", pa.Table.from_pylist(generated, schema=GENERATED_SCHEMA))
        skipped = sum(1 for g in generated if g["status"] == "skipped_budget")
        if skipped:
            raise BudgetExhausted(
                f"{stage.dir}: oracle {oracle!r} budget reached with {skipped} requests unsent; "
                f"raise oracles.{oracle}.budget_usd and rerun (paid replies are cached)"
            )
        stage.write_table("stream", pa.Table.from_pylist(kept, schema=FINAL_SCHEMA))
        statuses = Counter(g["status"] for g in generated)
        stage.finish(
            row_counts={"generated": len(generated), "stream": len(kept)},
            oracle=oracle, statuses=dict(statuses),
            reasons=dict(Counter(g["reason"] for g in generated if g["reason"])),
            cost_usd=round(sum(r.cost_usd for r in results if not r.cached), 6),
            cached_requests=sum(r.cached for r in results),
            retention_judged=len(retention),
            retention_unparsed=sum(1 for v in retention.values() if v is None),
        )  # fmt: skip
    return stage.dir


def _row_status(cfg: ExperimentConfig, result: OracleResult, grade) -> tuple[str, str]:
    if result.status == "skipped_budget":
        return "skipped_budget", "oracle budget reached"
    if result.status != "done":
        return "failed", result.error or "oracle request failed"
    if grade.status != "ok":
        return "dropped", f"answer not verifiable: {grade.status}"
    if not grade.correct and not cfg.streams.keep_wrong_oracle_answers:
        return "dropped", "wrong final answer"
    return "kept", ""


def numina_stream(run: RunDir, student: str, force: bool) -> Path:
    """The source's own solutions (NuminaMath CoT) of the shared problem set."""
    stage = Stage(
        run.root / "streams" / student / "numina_subset",
        "numina",
        inputs=[run.root / "problem_set"],
        force=force,
    )
    if stage.is_done():
        return stage.dir
    with stage.running():
        set_path = run.root / "problem_set" / "problem_set.parquet"
        seen = {"problems": 0}

        def rows() -> Iterator[pa.RecordBatch]:  # the problem set's order, a batch at a time
            for batch in iter_batches(set_path, ["problem_id", "problem", "answer", "solution"]):
                seen["problems"] += batch.num_rows
                solution = batch.column("solution")
                # A problem without a solution ("" or missing) has nothing to train on.
                batch = batch.filter(pc.fill_null(pc.not_equal(solution, ""), False))
                n = batch.num_rows
                yield pa.RecordBatch.from_pydict(
                    {"problem_id": batch.column("problem_id"), "problem": batch.column("problem"),
                     "answer": batch.column("answer"), "trace": batch.column("solution"),
                     "student": pa.array([student] * n, pa.string()),
                     "stream": pa.array(["numina_subset"] * n, pa.string()),
                     "sample_idx": pa.array([0] * n, pa.int64()),
                     "num_tokens": pa.array([len(t.split()) for t in
                                             batch.column("solution").to_pylist()], pa.int64()),
                     "retention": pa.nulls(n, pa.int64())},
                    schema=FINAL_SCHEMA,
                )  # fmt: skip

        stage.write_table("stream", rows(), schema=FINAL_SCHEMA)
        kept = num_rows(stage.path("stream"))
        stage.finish(row_counts={"stream": kept}, no_solution=seen["problems"] - kept)
    return stage.dir


def problem_ids(path: Path) -> set[str]:
    """The `problem_id` column of a table, read alone (bookkeeping, no text)."""
    return set(read_parquet(path, ["problem_id"]).column("problem_id").to_pylist())


def final_table(stream_path: Path, common: set[str]) -> pa.Table:
    """One built stream in the final schema, cut to the ids `common`, sorted by problem."""
    t = read_parquet(stream_path)
    if "retention" not in t.column_names:
        t = t.append_column("retention", pa.nulls(t.num_rows, pa.int64()))
    t = t.select(FINAL_SCHEMA.names).cast(FINAL_SCHEMA)
    return cut(t, common)


def cut(table: pa.Table, ids: set[str]) -> pa.Table:
    """The rows of `table` whose problem_id is in `ids`, sorted by problem_id (in Arrow)."""
    value_set = pa.array(sorted(ids), pa.string())
    return table.filter(pc.is_in(table.column("problem_id"), value_set=value_set)).sort_by(
        "problem_id"
    )


def cut_to_common_ids(cfg: ExperimentConfig, run: RunDir, student: str, force: bool) -> Path:
    """`streams/<student>/final/<stream>.parquet`: every stream on the same problem ids; the
    selection streams (`qup_ray.selection`) are chosen here, from the cut's traces and the
    student's own correct samples. The common ids come from the id columns alone; each stream
    is then read, cut and written one at a time."""
    streams = cfg.stream_names()
    built = [s for s in streams if s not in SELECTION_STREAMS]
    selected = [s for s in streams if s in SELECTION_STREAMS]
    dirs = [run.root / "streams" / student / s for s in built]
    config_hash = stable_hash(streams)
    if selected:  # what changes the pool's scores and picks
        config_hash += ":" + cfg.section_hash(
            "seed", "rollouts", "students", "reward_models", "scoring", "cpu_world"
        )
    stage = Stage(
        run.root / "streams" / student / "final",
        config_hash,
        inputs=[run.root / "problem_set", *dirs]
        + ([run.root / "rollouts" / student] if selected else []),
        force=force,
    )
    if stage.is_done():
        return stage.dir
    with stage.running():
        problem_set = problem_ids(run.root / "problem_set" / "problem_set.parquet")
        paths = {s: d / "stream.parquet" for s, d in zip(built, dirs, strict=True)}
        ids = {s: problem_ids(p) for s, p in paths.items()}
        common = problem_set.intersection(*ids.values())
        missing = {s: len(problem_set - ids[s]) for s in built}
        selection: dict = {}
        chosen_tables: dict[str, pa.Table] = {}
        if selected:
            tables = {s: final_table(p, common) for s, p in paths.items()}
            with stage.timed("selection"):
                chosen, selection = select_streams(cfg, run, student, selected, tables, common)
            del tables
            for s, rows in chosen.items():
                missing[s] = len(problem_set - {r["problem_id"] for r in rows})
            # A problem none of whose candidates is eligible (all over an engine's context)
            # leaves a selection stream without it: the cut then drops it from every stream.
            common = common.intersection(
                *({r["problem_id"] for r in rows} for rows in chosen.values())
            )
            chosen_tables = {s: pa.Table.from_pylist(rows, schema=SELECTED_SCHEMA)
                             for s, rows in chosen.items()}  # fmt: skip
        for s in streams:
            table = cut(chosen_tables[s], common) if s in chosen_tables else final_table(
                paths[s], common)  # fmt: skip
            stage.write_table(s, table)
        stage.finish(
            row_counts={s: len(common) for s in streams},
            counts={"problem_set": len(problem_set), "common": len(common),
                    "dropped": len(problem_set) - len(common)},
            missing_by_stream=missing,
            dropped_because="a problem is kept only if every stream of the student has a trace for it",
            **({"selection": selection} if selected else {}),
        )  # fmt: skip
        logger.info("%s: %d of %d problems in every stream; missing per stream %s",
                    student, len(common), len(problem_set), missing)  # fmt: skip
    return stage.dir


def select_streams(cfg: ExperimentConfig, run: RunDir, student: str, names: list[str],
                   tables: dict[str, pa.Table], common: set[str]) -> tuple[dict[str, list[dict]], dict]:  # fmt: skip
    """The selection streams `names` of one student over the problem ids `common`, and what the
    manifest records of them. The pool: the student's correct rollouts that pass the SLM-RFT
    filters (SLM-RFT's own pick among them), and the rows of every other stream of the cut,
    scored through the score cache (the score stage later finds these scores there)."""
    from qup_ray.ray_session import init_ray

    set_table = read_parquet(run.root / "problem_set" / "problem_set.parquet",
                             ["problem_id", "problem", "answer"])  # fmt: skip
    problems = {p["problem_id"]: p for p in cut(set_table, common).to_pylist()}
    # The pool is the student's correct samples of the problem set (what rft_candidates
    # judges); the rest of the rollouts never reach Python.
    correct = [
        b.filter(pc.and_(pc.equal(b.column("correct"), True),
                         pc.is_in(b.column("problem_id"), value_set=set_table.column("problem_id"))))
        for b in iter_batches(run.root / "rollouts" / student / "rollouts.parquet")
    ]  # fmt: skip
    own, _ = rft_candidates(
        (row for b in correct for row in b.to_pylist()),
        set(set_table.column("problem_id").to_pylist()), cfg.rollouts.rft,
        lengths=[n for b in correct for n in b.column("num_tokens").to_pylist()],
    )  # fmt: skip
    del correct
    pool = [
        {"problem_id": pid, "problem": problems[pid]["problem"], "answer": problems[pid]["answer"],
         "trace": r["response"], "source": OWN_SAMPLES, "correct": True,
         "sample_idx": r["sample_idx"], "num_tokens": r["num_tokens"], "retention": None}
        for pid in sorted(common & set(own)) for r in own[pid]
    ]  # fmt: skip
    for stream, table in tables.items():
        if stream == "slm_rft":  # its trace is one of the student's samples above
            continue
        generated = run.root / "streams" / student / stream / "generated.parquet"
        # Oracle streams keep wrong answers only under keep_wrong_oracle_answers: ask the grades.
        grades = (
            {
                g["problem_id"]: g["correct"]
                for g in read_parquet(generated, ["problem_id", "correct"]).to_pylist()
            }
            if generated.is_file()
            else {}
        )
        pool += [{**r, "source": stream, "correct": grades.get(r["problem_id"], True)}
                 for r in table.to_pylist()]  # fmt: skip
    for i, c in enumerate(pool):
        c["key"] = str(i)
    init_ray(cfg.ray)
    rejected: list[dict] = []
    nll = {r["key"]: r["mean_nll"] for r in score_ppl(cfg, student, pool, rejected)}
    rm = cfg.scoring.reward_models[0] if cfg.scoring.reward_models else None
    reward = (
        {r["key"]: r["reward"] for r in score_reward(cfg, rm, pool, rejected)}
        if rm and "reward_select" in names
        else {}
    )
    for c in pool:
        c["mean_nll"], c["reward"] = nll.get(c["key"]), reward.get(c["key"])
    chosen: dict[str, list[dict]] = {}
    record: dict = {
        "seed": cfg.seed, "reward_model": rm if "reward_select" in names else None,
        # The prompt-logprob PPL of the score pass: exact whatever the sampling temperature.
        "nll_source": "score_prompt_logprobs",
        "pool_by_source": dict(Counter(c["source"] for c in pool)),
        "pool_over_context": dict(Counter(r["table"] for r in rejected)),
    }  # fmt: skip
    for name in names:
        picks, counts = select(name, pool, cfg.seed)
        chosen[name] = [
            {**{k: c[k] for k in FINAL_SCHEMA.names if k not in ("student", "stream")},
             "student": student, "stream": name, "source": c["source"],
             "selection_mean_nll": c["mean_nll"], "selection_reward": c["reward"]}
            for c in picks
        ]  # fmt: skip
        record[name] = {
            "candidates": counts,
            "chosen_by_source": dict(Counter(c["source"] for c in picks)),
        }
        logger.info("%s/%s: %d problems, sources %s", student, name, len(picks),
                    record[name]["chosen_by_source"])  # fmt: skip
    return chosen, record


def run_student(cfg: ExperimentConfig, run: RunDir, student: str, force: bool) -> None:
    # The oracle requests of a stream are sent in one call (one endpoint or engine start), so
    # its items are held: the columns the prompts need, one copy.
    problem_set = read_parquet(run.root / "problem_set" / "problem_set.parquet",
                               ["problem_id", "problem", "answer"]).to_pylist()  # fmt: skip
    rft = read_parquet(run.root / "streams" / student / "slm_rft" / "stream.parquet",
                       ["problem_id", "problem", "answer", "trace"]).to_pylist()  # fmt: skip
    traces = [r["trace"] for r in rft]
    enabled = set(cfg.streams.enabled)
    if "oracle_refined" in enabled:
        oracle_stream(cfg, run, student, "oracle_refined", cfg.streams.refine_oracle, rft,
                      [refine_messages(r["problem"], r["trace"]) for r in rft], "refine", traces, force)  # fmt: skip
    if "oracle_synthesized" in enabled:
        # Retention of a fresh solution is judged against the student's own (SLM-RFT) trace of
        # the same problem, as the paper reports it (3.91 for GPT-5.2).
        own = {r["problem_id"]: r["trace"] for r in rft}
        oracle_stream(cfg, run, student, "oracle_synthesized", cfg.streams.synthesize_oracle, problem_set,
                      [synthesize_messages(p["problem"]) for p in problem_set], "synthesize",
                      [own.get(p["problem_id"]) for p in problem_set], force)  # fmt: skip
    if "numina_subset" in enabled:
        numina_stream(run, student, force)
    if "style_aligned" in enabled:
        rng = random.Random(cfg.seed)
        k = min(cfg.streams.num_style_exemplars, max(len(rft) - 1, 0))
        messages = []
        for i, r in enumerate(rft):
            # Exemplars are other problems' traces: the style, never this problem's content.
            picks = [j for j in rng.sample(range(len(rft)), min(k + 1, len(rft))) if j != i][:k]
            exemplars = [traces[j] for j in picks]
            messages.append(style_align_messages(r["problem"], r["trace"], exemplars))
        for oracle in cfg.streams.style_oracles:
            oracle_stream(cfg, run, student, f"style_aligned_{oracle}", oracle, rft, messages,
                          "style_align", traces, force)  # fmt: skip
    cut_to_common_ids(cfg, run, student, force)


def run(cfg: ExperimentConfig, *, force: bool = False) -> Path:
    """All streams of every student, then each student's cut to common problem ids."""
    run_dir = RunDir.for_config(cfg)
    for student in cfg.students:
        rft = run_dir.root / "streams" / student / "slm_rft" / "stream.parquet"
        if not rft.is_file():
            raise StageError(f"{rft} not found: run `qup run rollouts` first")
    for student in cfg.students:
        run_student(cfg, run_dir, student, force)
    return run_dir.root / "streams"
