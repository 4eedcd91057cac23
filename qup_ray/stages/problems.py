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
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as compute
from tqdm import tqdm

from qup_ray.config import ExperimentConfig, result_view
from qup_ray.data import (
    PROBLEM_SCHEMA,
    REJECTED_SCHEMA,
    hub_folder,
    iter_problems,
    load_problems,
    normalize_text,
)
from qup_ray.rundir import RunDir, Stage, iter_batches, stable_hash, table_writer

logger = logging.getLogger(__name__)


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of the normalised text; a text shorter than n words is one n-gram."""
    words = normalize_text(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def ngram_index(benchmark_rows: dict[str, list[dict]], n: int) -> dict[tuple[str, ...], str]:
    """Each word n-gram of the benchmark problems -> the (first) benchmark holding it."""
    index: dict[tuple[str, ...], str] = {}
    for name, rows in benchmark_rows.items():
        for row in rows:
            for gram in word_ngrams(row["problem"], n):
                index.setdefault(gram, name)
    return index


def overlapping_benchmark(
    text: str, index: dict[tuple[str, ...], str], n: int, max_overlap: float
) -> str | None:
    """The benchmark a problem shares at least `max_overlap` of its n-grams with (a problem
    equal to a benchmark problem shares all), or None."""
    grams = word_ngrams(text, n)
    if not grams:
        return None
    matched: dict[str, int] = {}
    for gram in grams:
        bench = index.get(gram)
        if bench is not None:
            matched[bench] = matched.get(bench, 0) + 1
    for bench, count in matched.items():
        if count / len(grams) >= max_overlap:
            return bench
    return None


def run(cfg: ExperimentConfig, *, force: bool = False) -> Path:
    """Build `<run>/problems/`; skipped when its manifest matches the config.

    The source streams through once: each row is checked (malformed, duplicate, contaminated)
    as it comes and written to a scratch table; only ids are held. The seeded sample is drawn
    from the sorted ids, then its rows are read back from the scratch table."""
    pc = cfg.problems
    config_hash = cfg.section_hash("problems")
    if pc.decontaminate:  # the benchmarks decontaminated against, not the rest of evaluation
        config_hash += ":" + stable_hash(result_view(cfg.evaluation.benchmarks))
    stage = Stage(RunDir.for_config(cfg).root / "problems", config_hash, force=force)
    if stage.is_done():
        return stage.dir
    if pc.source.kind == "hub":  # a missing source is named before the benchmarks are loaded
        hub_folder(pc.source)
    with stage.running():
        index = None
        if pc.decontaminate and cfg.evaluation.benchmarks:
            with stage.timed("decontaminate"):
                index = ngram_index(
                    {name: load_problems(bench.source, benchmark=name)[0]
                     for name, bench in cfg.evaluation.benchmarks.items()},
                    pc.ngram_size,
                )  # fmt: skip
        scratch = stage.shard_dir  # removed by stage.finish
        scratch.mkdir(parents=True, exist_ok=True)
        # Rejections in the order the whole-table code listed them: malformed, duplicates,
        # contaminated (each in source order).
        parts = [scratch / f"{k}.parquet" for k in ("malformed", "duplicates", "contaminated")]
        seen: set[str] = set()
        pool: list[str] = []  # ids of the usable, unique, clean problems
        counts = Counter()
        with (
            stage.timed("load"),
            table_writer(scratch / "usable.parquet", PROBLEM_SCHEMA) as usable,
            table_writer(parts[0], REJECTED_SCHEMA) as malformed,
            table_writer(parts[1], REJECTED_SCHEMA) as duplicate,
            table_writer(parts[2], REJECTED_SCHEMA) as contaminated,
        ):
            for row, bad in tqdm(iter_problems(pc.source), desc="problems", unit="row",
                                 mininterval=2, leave=False):  # fmt: skip
                counts["loaded"] += 1
                if row is None:
                    counts["rejected_malformed"] += 1
                    malformed(bad)
                    continue
                pid = row["problem_id"]
                if pid in seen:
                    counts["duplicates"] += 1
                    duplicate(_rejection(row, f"duplicate of {pid}"))
                    continue
                seen.add(pid)
                bench = (
                    overlapping_benchmark(row["problem"], index, pc.ngram_size, pc.max_overlap)
                    if index is not None
                    else None
                )
                if bench is not None:
                    counts["contaminated"] += 1
                    contaminated(_rejection(row, f"contaminated: overlaps {bench}"))
                    continue
                usable(row)
                pool.append(pid)

        # Sample from a canonical order so the result depends only on the data and the seed.
        pool.sort()
        if len(pool) < pc.num_problems:
            logger.warning(
                "only %d usable problems, fewer than the %d asked for", len(pool), pc.num_problems
            )
        sampled = random.Random(pc.seed).sample(pool, min(pc.num_problems, len(pool)))
        stage.write_table("problems", sampled_rows(scratch / "usable.parquet", sampled))
        stage.write_table("rejected", iter_batches(parts), schema=REJECTED_SCHEMA)
        counts = {
            "loaded": counts["loaded"],
            "rejected_malformed": counts["rejected_malformed"],
            "duplicates": counts["duplicates"],
            "contaminated": counts["contaminated"],
            "not_sampled": len(pool) - len(sampled),
            "sampled": len(sampled),
        }
        logger.info("problems: %s", counts)
        num_rejected = counts["rejected_malformed"] + counts["duplicates"] + counts["contaminated"]
        stage.finish(row_counts={"problems": len(sampled), "rejected": num_rejected}, counts=counts)
    return stage.dir


def sampled_rows(usable_path: Path, sampled: list[str]) -> pa.Table:
    """The rows of the `sampled` ids, in sample order: filtered in Arrow a batch at a time."""
    value_set = pa.array(sampled, pa.string())
    parts = [
        pa.Table.from_batches([b]).filter(
            compute.is_in(b.column("problem_id"), value_set=value_set)
        )
        for b in iter_batches(usable_path)
    ]
    table = pa.concat_tables(parts) if parts else PROBLEM_SCHEMA.empty_table()
    position = {pid: i for i, pid in enumerate(table.column("problem_id").to_pylist())}
    return table.take(pa.array([position[pid] for pid in sampled], pa.int64())).cast(PROBLEM_SCHEMA)


def _rejection(row: dict, reason: str) -> dict:
    return {"row_index": -1, "benchmark": row["benchmark"], "reason": f"{reason} ({row['problem_id']})",
            "raw": row["problem"][:2000]}  # fmt: skip
