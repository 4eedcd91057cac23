"""GPU-hours of a grid's jobs: work counted from the config, throughputs measured where possible.

Work per job comes from the config's sizes (students, problems, samples, streams, cells,
benchmarks) and, where a finished stage already says so, from the run directory (the size of the
problem set). Each throughput comes from the first source that has it:

1. `qup bench NAME --json` lines measured on the cluster (`estimate.bench_json`);
2. earlier grid runs on the cluster (`estimate.calibration_runs`): a finished stage's manifest
   (tokens, duration) and the GPUs its job held (`grid/jobs.json`);
3. the defaults in the cluster YAML's `estimate` section.

The plan prints, per throughput, which source it used. API oracles cost dollars, not GPU-hours.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from qup_ray.config import ClusterConfig, ExperimentConfig
from qup_ray.rundir import MANIFEST, read_json
from qup_ray.selection import SELECTION_STREAMS

logger = logging.getLogger(__name__)

# Which throughput each bench measures (its `pipeline_per_s`, per engine actor = per GPU).
BENCH_RATES = {"rollouts": "generate_tokens_per_gpu_s", "ppl": "score_tokens_per_gpu_s"}
RATES = (
    "generate_tokens_per_gpu_s", "oracle_tokens_per_gpu_s", "score_tokens_per_gpu_s",
    "train_tokens_per_gpu_s",
)  # fmt: skip


@dataclass
class Throughputs:
    """Tokens per GPU-second by kind of work, with where each figure came from."""

    rates: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: float, source: str) -> None:
        if key not in self.rates and value > 0:
            self.rates[key] = value
            self.sources[key] = source


def job_gpus(record: dict) -> int:
    res = record.get("resources", {})
    return int(res.get("nodes", 1)) * int(res.get("gpus_per_node", 0))


def _from_bench(path: Path, out: Throughputs) -> None:
    for line in path.read_text().splitlines():
        if not line.strip().startswith("{"):
            continue
        row = json.loads(line)
        key = BENCH_RATES.get(row.get("bench", ""))
        actors = max(int(row.get("actors", 1) or 1), 1)
        if key and row.get("pipeline_per_s"):
            out.set(
                key, float(row["pipeline_per_s"]) / actors, f"qup bench {row['bench']} ({path})"
            )


def _from_run(run: Path, out: Throughputs) -> None:
    """Tokens per GPU-second of the finished rollouts, train and eval jobs of an earlier run."""
    jobs_file = run / "grid" / "jobs.json"
    if not jobs_file.is_file():
        logger.warning("calibration run %s has no grid/jobs.json: skipped", run)
        return
    totals: dict[str, list[float]] = {}  # rate key -> [tokens, gpu seconds]
    for record in read_json(jobs_file)["jobs"]:
        gpus = job_gpus(record)
        key = {"rollouts": "generate_tokens_per_gpu_s", "train": "train_tokens_per_gpu_s",
               "eval": "generate_tokens_per_gpu_s"}.get(record["stage"])  # fmt: skip
        if not gpus or key is None:
            continue
        for folder in record["outputs"]:
            manifest_path = run / folder / MANIFEST
            if not manifest_path.is_file():
                continue
            tokens, seconds = _tokens_and_seconds(run / folder, read_json(manifest_path))
            if tokens and seconds:
                acc = totals.setdefault(key, [0.0, 0.0])
                acc[0] += float(tokens)
                acc[1] += float(seconds) * gpus
    for key, (tokens, gpu_s) in totals.items():
        if gpu_s > 0:
            out.set(key, tokens / gpu_s, f"manifests of {run}")


def _tokens_and_seconds(folder: Path, manifest: dict) -> tuple[float | None, float | None]:
    """Tokens a finished stage folder processed and the seconds it took: generated tokens of
    rollouts and eval, label tokens of training steps (its `metrics.parquet`)."""
    metrics = folder / "metrics.parquet"
    if metrics.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(metrics)
        if {"label_tokens", "seconds"} <= set(table.column_names):
            return (float(sum(table.column("label_tokens").to_pylist())),
                    float(sum(table.column("seconds").to_pylist())))  # fmt: skip
    return manifest.get("generated_tokens"), manifest.get("timings", {}).get("duration_s")


def throughputs(cluster: ClusterConfig) -> Throughputs:
    """Every throughput the estimate needs, measured ones first."""
    out = Throughputs()
    for path in cluster.estimate.bench_json:
        if Path(path).is_file():
            _from_bench(Path(path), out)
        else:
            logger.warning("estimate.bench_json: %s not found", path)
    for run in cluster.estimate.calibration_runs:
        _from_run(Path(run), out)
    for key in RATES:
        out.set(key, getattr(cluster.estimate, key), f"default (cluster YAML estimate.{key})")
    return out


def problem_set_size(cfg: ExperimentConfig, cluster: ClusterConfig, run_root: Path) -> int:
    """The shared problem set's size: measured if the rollouts stage finished, else estimated."""
    path = run_root / "problem_set" / MANIFEST
    if path.is_file():
        return int(read_json(path)["row_counts"]["problem_set"])
    return round(cfg.problems.num_problems * cluster.estimate.problem_set_fraction)


def stage_gpu_hours(
    stage: str, cfg: ExperimentConfig, cluster: ClusterConfig, rates: Throughputs, ps: int
) -> float:
    """GPU-hours of one job of `stage` (one cell for train/eval) on a problem set of `ps`."""
    est = cluster.estimate
    tokens = est.mean_sample_tokens
    gen, score = rates.rates["generate_tokens_per_gpu_s"], rates.rates["score_tokens_per_gpu_s"]
    students, streams = len(cfg.students), len(cfg.stream_names())
    if stage == "rollouts":
        work = students * cfg.problems.num_problems * cfg.rollouts.num_samples_per_problem
        return work * tokens / gen / 3600
    if stage == "streams":
        # Only open-weights oracles run on the cluster's GPUs; each writes one trace per
        # problem of each student's stream it produces.
        local = [name for name, o in cfg.oracles.items() if o.backend == "vllm"]
        uses = [cfg.streams.refine_oracle, cfg.streams.synthesize_oracle,
                *cfg.streams.style_oracles]  # fmt: skip
        calls = sum(1 for u in uses if u in local) * students * ps
        oracle_h = calls * tokens / rates.rates["oracle_tokens_per_gpu_s"] / 3600
        # Selection streams score their pool (the student's samples and the other streams'
        # traces) by PPL, and by the first reward model for reward_select.
        selected = [s for s in cfg.stream_names() if s in SELECTION_STREAMS]
        if not selected:
            return oracle_h
        pool = cfg.rollouts.num_samples_per_problem + streams - len(selected)
        rm = cfg.scoring.reward_models[0] if "reward_select" in selected else None
        factor = 1 + (cfg.reward_models[rm].engine.tensor_parallel_size if rm else 0)
        return oracle_h + students * pool * ps * tokens * factor / score / 3600
    if stage == "score":
        # Perplexity under the student plus every reward model; a model spanning several GPUs
        # (tensor parallel) costs that many GPU-seconds per token.
        gpu_factor = 1 + sum(
            cfg.reward_models[rm].engine.tensor_parallel_size for rm in cfg.scoring.reward_models
        )
        return students * streams * ps * tokens * gpu_factor / score / 3600
    if stage == "train":
        epochs = cfg.training.num_epochs
        return ps * tokens * epochs / rates.rates["train_tokens_per_gpu_s"] / 3600
    if stage == "eval":
        per_benchmark = cfg.evaluation.max_problems_per_benchmark or est.problems_per_benchmark
        work = len(cfg.evaluation.benchmarks) * per_benchmark * cfg.evaluation.num_samples
        return work * tokens / gen / 3600
    return 0.0  # problems, report: CPU only
