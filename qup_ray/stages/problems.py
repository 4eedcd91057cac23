"""Stage `problems`: the pool of training problems.

    qup run problems -c configs/paper.yaml

Loads the configured source (NuminaMath-CoT in the paper), normalises it, drops exact duplicates
(on normalised text), drops problems that overlap an evaluation benchmark (word n-grams), and
takes a seeded random sample of `problems.num_problems` (not the first N). Every row that does not
make it is in `rejected.parquet` with its reason; the manifest counts each reason.

Outputs in `<run>/problems/`: problems.parquet, rejected.parquet, _manifest.json.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from qup_ray.config import ExperimentConfig, result_view
from qup_ray.data import PROBLEM_SCHEMA, REJECTED_SCHEMA, load_problems, normalize_text
from qup_ray.rundir import RunDir, Stage, stable_hash

logger = logging.getLogger(__name__)


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of the normalised text; a text shorter than n words is one n-gram."""
    words = normalize_text(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def contamination(
    problems: list[dict], benchmark_rows: dict[str, list[dict]], n: int, max_overlap: float
) -> dict[str, str]:
    """problem_id -> benchmark name, for problems sharing more than `max_overlap` of their
    n-grams with one benchmark problem set (or equal to a benchmark problem)."""
    index: dict[tuple[str, ...], str] = {}
    for name, rows in benchmark_rows.items():
        for row in rows:
            for gram in word_ngrams(row["problem"], n):
                index.setdefault(gram, name)
    hits: dict[str, str] = {}
    for row in tqdm(problems, desc="decontaminate", unit="problem", mininterval=2, leave=False):
        grams = word_ngrams(row["problem"], n)
        if not grams:
            continue
        matched: dict[str, int] = {}
        for gram in grams:
            bench = index.get(gram)
            if bench is not None:
                matched[bench] = matched.get(bench, 0) + 1
        for bench, count in matched.items():
            if count / len(grams) >= max_overlap:
                hits[row["problem_id"]] = bench
                break
    return hits


def run(cfg: ExperimentConfig, *, force: bool = False) -> Path:
    """Build `<run>/problems/`; skipped when its manifest matches the config."""
    pc = cfg.problems
    config_hash = cfg.section_hash("problems")
    if pc.decontaminate:  # the benchmarks decontaminated against, not the rest of evaluation
        config_hash += ":" + stable_hash(result_view(cfg.evaluation.benchmarks))
    stage = Stage(RunDir.for_config(cfg).root / "problems", config_hash, force=force)
    if stage.is_done():
        return stage.dir
    with stage.running():
        with stage.timed("load"):
            rows, rejected = load_problems(pc.source)
        num_loaded = len(rows) + len(rejected)
        num_malformed = len(rejected)

        unique: dict[str, dict] = {}
        for row in rows:
            first = unique.setdefault(row["problem_id"], row)
            if first is not row:
                rejected.append(_rejection(row, f"duplicate of {first['problem_id']}"))
        num_duplicates = len(rows) - len(unique)

        num_contaminated = 0
        if pc.decontaminate and cfg.evaluation.benchmarks:
            with stage.timed("decontaminate"):
                bench_rows = {
                    name: load_problems(bench.source, benchmark=name)[0]
                    for name, bench in cfg.evaluation.benchmarks.items()
                }
                hits = contamination(
                    list(unique.values()), bench_rows, pc.ngram_size, pc.max_overlap
                )
            for pid, bench in hits.items():
                rejected.append(_rejection(unique.pop(pid), f"contaminated: overlaps {bench}"))
            num_contaminated = len(hits)

        # Sample from a canonical order so the result depends only on the data and the seed.
        pool = sorted(unique.values(), key=lambda r: r["problem_id"])
        if len(pool) < pc.num_problems:
            logger.warning(
                "only %d usable problems, fewer than the %d asked for", len(pool), pc.num_problems
            )
        sampled = random.Random(pc.seed).sample(pool, min(pc.num_problems, len(pool)))

        stage.write_table("problems", pa.Table.from_pylist(sampled, schema=PROBLEM_SCHEMA))
        stage.write_table("rejected", pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA))
        counts = {
            "loaded": num_loaded,
            "rejected_malformed": num_malformed,
            "duplicates": num_duplicates,
            "contaminated": num_contaminated,
            "not_sampled": len(pool) - len(sampled),
            "sampled": len(sampled),
        }
        logger.info("problems: %s", counts)
        stage.finish(
            row_counts={"problems": len(sampled), "rejected": len(rejected)}, counts=counts
        )
    return stage.dir


def _rejection(row: dict, reason: str) -> dict:
    return {"row_index": -1, "benchmark": row["benchmark"], "reason": f"{reason} ({row['problem_id']})",
            "raw": row["problem"][:2000]}  # fmt: skip
