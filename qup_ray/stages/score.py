"""Stage `score`: perceived quality, adaptation cost and style of every trace.

    qup run score -c configs/paper.yaml

For every student and every one of its streams (`streams/<student>/final/<stream>.parquet`):
- `ppl.parquet`: mean NLL and PPL of the response tokens under that student, overall and per
  quarter Q1..Q4, formatted with the student's prompt and chat template exactly as training
  formats them (vLLM prompt log-probabilities, one engine per student over all its streams);
- `reward-<rm>.parquet`: the score of every configured reward model (one engine per model);
- `style.parquet`: token-category counts/frequencies with the student's tokenizer;
- `summary.json`: mean, std, median and a 95% bootstrap interval of each measure, and the
  semantic retention scores of the streams stage.
All tables are keyed by problem_id, one row per trace. Engine results go through the score
cache of `qup_ray.scoring` (`<run>/score_cache/`): a trace in several streams is scored once, and
an interrupted run resumes from the engine batches it finished. The driver reads the stream
tables a batch at a time for each engine pass and keeps only keys, scores and the engine inputs
still to score (int32 token ids), never every trace's text.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from qup_ray.config import ExperimentConfig
from qup_ray.prompts import load_prompt
from qup_ray.rundir import (
    REJECTED_SCHEMA,
    RunDir,
    Stage,
    StageError,
    iter_rows,
    stable_hash,
    write_json,
)
from qup_ray.scoring import PPL_FIELDS, pool_faults, score_ppl, score_reward, score_style
from qup_ray.stats import summarize

logger = logging.getLogger(__name__)

SCORED_COLUMNS = ["problem_id", "problem", "trace", "stream", "retention"]
"""What scoring reads of a final stream table (the answer, source and selection columns stay on
disk)."""


def run(cfg: ExperimentConfig, *, force: bool = False) -> Path:
    """Score every stream of every student; a stream whose scores are up to date is skipped."""
    from qup_ray.ray_session import init_ray

    run_dir = RunDir.for_config(cfg)
    streams = cfg.stream_names()
    prompts = sorted({m.prompt for m in cfg.students.values()}
                     | {rm.prompt for rm in cfg.reward_models.values() if rm.prompt})  # fmt: skip
    config_hash = cfg.section_hash("scoring", "reward_models", "students", "cpu_world") + (
        ":" + stable_hash([load_prompt(p) for p in prompts])  # prompt files by content
    )
    pending: list[tuple[str, str, Stage]] = []
    for student in cfg.students:
        final = run_dir.root / "streams" / student / "final"
        if not (final / "_manifest.json").is_file():
            raise StageError(f"{final} is not finished: run `qup run streams` first")
        for stream in streams:
            stage = Stage(
                run_dir.root / "scores" / student / stream, config_hash, inputs=[final], force=force
            )
            if not stage.is_done():
                pending.append((student, stream, stage))
    if not pending:
        return run_dir.root / "scores"
    init_ray(cfg.ray)
    started = time.time()

    def final_path(student: str, stream: str) -> Path:
        return run_dir.root / "streams" / student / "final" / f"{stream}.parquet"

    def traces_of(students: list[str]) -> Iterator[dict]:
        """The traces of these students' pending streams, read a batch at a time: each engine
        pass reads them again rather than the driver holding every text."""
        for student, stream, _ in pending:
            if student in students:
                for row in iter_rows(final_path(student, stream), SCORED_COLUMNS):
                    yield {**row, "key": f"{student}|{stream}|{row['problem_id']}"}

    # What the tables are written from: per pending stream, each trace's key and retention.
    scored: dict[tuple[str, str], list[dict]] = {
        (student, stream): [
            {**row, "key": f"{student}|{stream}|{row['problem_id']}"}
            for row in iter_rows(final_path(student, stream), ["problem_id", "retention"])
        ]
        for student, stream, _ in pending
    }
    students = list(dict.fromkeys(student for student, _, _ in pending))
    results: dict[str, dict[str, dict]] = defaultdict(dict)  # key -> table name -> row
    rejected: list[dict] = []  # rows with their key, over an engine's limit
    for student in students:
        num = sum(len(rows) for (s, _), rows in scored.items() if s == student)
        logger.info("perplexity of %d traces under %s", num, student)
        for row in score_ppl(cfg, student, traces_of([student]), rejected):
            results[row["key"]]["ppl"] = row
        for row in score_style(cfg, student, traces_of([student])):
            results[row["key"]]["style"] = row
    for rm in cfg.scoring.reward_models:
        logger.info("reward model %s on %d traces", rm, sum(map(len, scored.values())))
        for row in score_reward(cfg, rm, traces_of(students), rejected):
            results[row["key"]][f"reward-{rm}"] = row
    faults = pool_faults(cfg, since=started)  # engine actors that died and were restarted
    rejected_by_key: dict[str, list[dict]] = defaultdict(list)
    for r in rejected:
        rejected_by_key[r.pop("key")].append(r)

    for student, stream, stage in pending:
        with stage.running():
            rows = scored[(student, stream)]
            tables = ["ppl", "style", *(f"reward-{rm}" for rm in cfg.scoring.reward_models)]
            summary: dict[str, dict] = {}
            stream_rejected = [r for t in rows for r in rejected_by_key[t["key"]]]
            stage.write_table(
                "rejected", pa.Table.from_pylist(stream_rejected, schema=REJECTED_SCHEMA)
            )
            counts = {}
            for name in tables:
                out = []
                for t in rows:
                    r = results[t["key"]].get(name)
                    if r is None:  # rejected for this table: in rejected.parquet
                        continue
                    out.append(
                        {
                            "problem_id": t["problem_id"],
                            **{k: v for k, v in r.items() if k not in ("key", "response_start")},
                        }
                    )
                stage.write_table(name, pa.Table.from_pylist(out))
                counts[name] = len(out)
                for field in _summary_fields(name):
                    summary[f"{name}.{field}"] = summarize(
                        [o.get(field) for o in out], cfg.scoring.num_bootstrap, cfg.seed
                    )
            summary["retention"] = summarize(
                [t.get("retention") for t in rows], cfg.scoring.num_bootstrap, cfg.seed
            )
            write_json(stage.dir / "summary.json", summary)
            stage.finish(
                row_counts={**counts, "rejected": len(stream_rejected)},
                student=student, stream=stream, traces=len(rows), faults=faults,
            )  # fmt: skip
    return run_dir.root / "scores"


def _summary_fields(table: str) -> tuple[str, ...]:
    if table == "ppl":
        return ("num_tokens", *PPL_FIELDS)
    if table == "style":
        return (
            "num_tokens",
            "tokens_per_step",
            "symbol_freq",
            "scaffolding_freq",
            "digit_freq",
            "whitespace_freq",
            "word_freq",
        )
    return ("reward",)
