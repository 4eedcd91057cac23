"""`qup bench scale`: the stage driver's peak memory and wall time at 1x and 10x the problems.

The data stages (problems, rollouts, streams with the rule oracle, score) and one training and
one evaluation cell run on the CPU world twice in the same benchmark, over `num_problems` and
10 x `num_problems` synthetic problems (short generations, so it stays quick). Each size runs
in a fresh process of its own, as a stage driver on a cluster does, and reports that process's
peak resident memory (`ru_maxrss`: the driver only; engines, training workers and Ray's own
processes are other processes). At dry-run size the imports (torch, vLLM, Ray) dominate the
driver's memory, so the figure to watch is the growth per problem,
(peak_10x - peak_1x) / (problems_10x - problems_1x): a driver that holds whole tables grows
with the run, a streaming one does not. Also reported: each stage's wall time and growth
factor, and the bytes per problem of each stage's outputs on disk (what the README's
paper-size estimate is computed from).

    qup bench scale --json
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from qup_ray.bench.common import run_in_subprocess
from qup_ray.config import CONFIGS_DIR, ExperimentConfig, load_yaml, validate_data

logger = logging.getLogger(__name__)

STAGES = ("problems", "rollouts", "streams", "score", "train", "eval")
FACTOR = 10


def scale_config(output_dir: str, num_problems: int, overrides: list[str] | tuple[str, ...] = ()
                 ) -> ExperimentConfig:  # fmt: skip
    """The dry-run config cut down to what the benchmark measures: one student, the rule
    oracle's streams, one reward model, one SFT cell and its evaluation, short generations;
    `num_problems` training problems and a benchmark a quarter that size."""
    data = load_yaml(CONFIGS_DIR / "dryrun.yaml")
    anchor = data["anchor_student"]
    data["output_dir"] = output_dir
    data["experiment"] = f"scale-{num_problems}"
    data["students"] = {anchor: data["students"][anchor]}
    data["problems"]["source"]["num_synthetic"] = num_problems + num_problems // 4
    data["problems"]["num_problems"] = num_problems
    data["rollouts"] |= {"num_samples_per_problem": 4, "max_new_tokens": 64, "shard_size": 200}
    data["streams"]["enabled"] = ["slm_rft", "oracle_refined", "oracle_synthesized",
                                  "numina_subset", "style_aligned"]  # fmt: skip
    first_rm = data["scoring"]["reward_models"][0]
    data["reward_models"] = {first_rm: data["reward_models"][first_rm]}
    data["scoring"] |= {"reward_models": [first_rm], "num_bootstrap": 50}
    data["training"] |= {"objectives": ["sft"], "streams": ["slm_rft"], "robustness": [],
                         "num_workers": 1, "tensorboard": False}  # fmt: skip
    data["evaluation"] |= {"num_samples": 2, "max_new_tokens": 64, "evaluate_base": False,
                           "shard_size": 200}  # fmt: skip
    data["evaluation"]["benchmarks"]["synthetic_test"]["source"]["num_synthetic"] = max(
        num_problems // 4, 10
    )
    return validate_data(ExperimentConfig, data, "qup bench scale", overrides)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_parts_mb() -> dict[str, float]:
    """This process's resident memory now, by kind (Linux `/proc/self/status`): `anon` is its
    own heap; `shmem` includes pages of Ray's object store it has touched."""
    fields = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[fields[key]] = int(value.split()[0]) / 1024  # "   172 kB"
    return out


class AnonPeak:
    """The peak of `rss_parts_mb()["anon"]`, sampled every `interval_s` on a thread: the
    driver's own memory, without the object-store pages ru_maxrss also counts."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_parts_mb().get("anon", 0.0))
            self._stop.wait(interval_s)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_parts_mb().get("anon", 0.0))


def folder_bytes(folder: Path) -> int:
    """Bytes of the Parquet tables under `folder` (outputs, not shards: those are gone)."""
    return sum(p.stat().st_size for p in folder.rglob("*.parquet")) if folder.is_dir() else 0


def one_size(output_dir: str, num_problems: int, overrides: list[str]) -> dict[str, Any]:
    """Every measured stage at one size, in this (fresh) process: wall time per stage, the
    driver's peak memory after each, rows and output bytes."""
    import ray

    from qup_ray.rundir import read_json
    from qup_ray.stages import run_stage

    # Stdout carries the benchmark's one JSON line (written by the parent); this process's
    # stdout, where Ray echoes its workers' output, goes to stderr with the logs.
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(  # a spawned process: the parent's logging set-up is not inherited
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )  # fmt: skip
    cfg = scale_config(output_dir, num_problems, overrides)
    student = cfg.anchor_student
    cell = f"{student}/slm_rft/sft"
    out: dict[str, Any] = {"num_problems": num_problems, "wall_s": {}, "peak_rss_mb_after": {}}
    out["rss_mb_at_start"] = round(peak_rss_mb(), 1)
    out["peak_anon_mb_after"] = {}
    try:
        with AnonPeak() as anon:
            for stage in STAGES:
                t0 = time.perf_counter()
                run_stage(stage, cfg, cells=[cell] if stage in ("train", "eval") else None)
                out["wall_s"][stage] = round(time.perf_counter() - t0, 2)
                out["peak_rss_mb_after"][stage] = round(peak_rss_mb(), 1)
                out["peak_anon_mb_after"][stage] = round(anon.peak_mb, 1)
            logger.info("bench scale: %d problems, %s: %.1f s, driver peak %.1f MB",
                        num_problems, stage, out["wall_s"][stage], peak_rss_mb())  # fmt: skip
    finally:
        ray.shutdown()
    root = cfg.run_dir
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["peak_anon_mb"] = round(anon.peak_mb, 1)
    rollouts = read_json(root / "rollouts" / student / "_manifest.json")
    out["rows"] = {
        "problems": read_json(root / "problems" / "_manifest.json")["row_counts"]["problems"],
        "rollouts": rollouts["row_counts"]["rollouts"],
        "generated_tokens": rollouts["generated_tokens"],
        "problem_set": read_json(root / "problem_set" / "_manifest.json")["row_counts"][
            "problem_set"
        ],
        "common": read_json(root / "streams" / student / "final" / "_manifest.json")["counts"][
            "common"
        ],
    }
    out["bytes"] = {
        "problems": folder_bytes(root / "problems"),
        "rollouts": folder_bytes(root / "rollouts"),
        "streams": folder_bytes(root / "streams"),
        "oracle_cache": folder_bytes(root / "oracle_cache"),
        "scores": folder_bytes(root / "scores") + folder_bytes(root / "score_cache"),
        "eval": folder_bytes(root / "eval"),
    }
    return out


def summarize(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's figures from the two sizes' results."""
    # Per problem the stages actually got (the synthetic pool may hold fewer than asked for).
    added = large["rows"]["problems"] - small["rows"]["problems"]
    growth = {
        s: round(large["wall_s"][s] / small["wall_s"][s], 2) if small["wall_s"][s] else None
        for s in small["wall_s"]
    }
    n = large["rows"]["problems"]
    return {
        "bench": "scale",
        "unit": "driver peak RSS (MB)",
        "problems_1x": small["rows"]["problems"],
        "problems_10x": large["rows"]["problems"],
        "peak_rss_mb_1x": small["peak_rss_mb"],
        "peak_rss_mb_10x": large["peak_rss_mb"],
        "ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "rss_growth_kb_per_problem": round(
            (large["peak_rss_mb"] - small["peak_rss_mb"]) * 1024 / added, 2
        ),
        "rss_mb_at_start": [small["rss_mb_at_start"], large["rss_mb_at_start"]],
        # The driver's own heap (sampled), without the object-store pages ru_maxrss counts.
        "peak_anon_mb_1x": small.get("peak_anon_mb"),
        "peak_anon_mb_10x": large.get("peak_anon_mb"),
        "anon_growth_kb_per_problem": round(
            (large["peak_anon_mb"] - small["peak_anon_mb"]) * 1024 / added, 2
        )
        if "peak_anon_mb" in small and "peak_anon_mb" in large
        else None,
        "peak_anon_mb_after_1x": small.get("peak_anon_mb_after"),
        "peak_anon_mb_after_10x": large.get("peak_anon_mb_after"),
        "peak_rss_mb_after_1x": small["peak_rss_mb_after"],
        "peak_rss_mb_after_10x": large["peak_rss_mb_after"],
        "wall_s_1x": small["wall_s"],
        "wall_s_10x": large["wall_s"],
        "wall_growth": growth,
        "wall_growth_total": round(
            sum(large["wall_s"].values()) / sum(small["wall_s"].values()), 2
        ),
        "rows_1x": small["rows"],
        "rows_10x": large["rows"],
        "disk_bytes_per_problem_10x": {k: round(v / n, 1) for k, v in large["bytes"].items()},
        # What a paper-size estimate scales by: rollouts on disk per generated token.
        "rollouts_disk_bytes_per_token_10x": round(
            large["bytes"]["rollouts"] / max(large["rows"]["generated_tokens"], 1), 2
        ),
    }


def run(*, quick: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Both sizes, each in a fresh process, smaller first; their figures side by side."""
    num_problems = 40 if quick else 300
    results = []
    with tempfile.TemporaryDirectory(prefix="qup-bench-scale-") as tmp:
        for size in (num_problems, FACTOR * num_problems):
            logger.info("bench scale: %d problems", size)
            results.append(run_in_subprocess(one_size, tmp, size, list(overrides),
                                             timeout_s=3600))  # fmt: skip
    return summarize(*results)
