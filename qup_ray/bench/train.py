"""`qup bench train`: tokens/s of the train stage (Ray Train + DeepSpeed) against a bare
single-process torch loop: same student, same batches, same loss, same optimizer and schedule.

The pipeline is the stage itself (`qup_ray.stages.train.run`) on a synthetic stream of the dry
run's anchor student; its tokens/s is read from the cell's `metrics.parquet` (every step but the
first, which warms up), and its fixed overhead (Ray workers, DeepSpeed set-up, export) is
reported apart as `fixed_overhead_s`. The baseline runs in a process of its own with as many
torch threads as a worker has CPUs. Both report peak resident memory.
"""

from __future__ import annotations

import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from qup_ray.bench.common import run_in_subprocess
from qup_ray.config import CONFIGS_DIR, ExperimentConfig, load_config
from qup_ray.rundir import Stage, read_json, read_parquet, write_parquet

logger = logging.getLogger(__name__)

STREAM = "slm_rft"


def write_synthetic_streams(
    run_root: Path, students: list[str], streams: dict[str, str], num_problems: int, seed: int
) -> None:
    """`streams/<student>/final/<stream>.parquet` (+ manifest) holding synthetic problems with
    the CPU world's solutions in each stream's style (`native` or `compact`)."""
    from qup_ray.cpu_world.synthetic import sample_problems

    problems = sample_problems(num_problems, seed=seed)
    for student in students:
        stage = Stage(run_root / "streams" / student / "final", config_hash="synthetic")
        with stage.running():
            for stream, style in streams.items():
                rows = [
                    {"problem_id": f"p{i:05d}", "problem": p.problem, "answer": p.answer,
                     "trace": p.render(style), "student": student, "stream": stream,
                     "sample_idx": 0, "num_tokens": 0, "retention": None}
                    for i, p in enumerate(problems)
                ]  # fmt: skip
                write_parquet(stage.dir / f"{stream}.parquet", rows)
            stage.finish(row_counts=dict.fromkeys(streams, num_problems))


def _bare(cfg_dump: dict, model_path: str, prompt: str, stream_path: str, objective: str) -> dict:
    """The baseline in its own process: a plain torch loop over the plan of one worker."""
    import torch
    from transformers import AutoModelForCausalLM

    from qup_ray.config import ExperimentConfig
    from qup_ray.encoding import ChatFormat
    from qup_ray.losses import Denominators, micro_batch_loss, token_terms
    from qup_ray.training.data import collate, encode_stream, plan_steps, step_denominator_counts
    from qup_ray.training.loop import lr_lambda

    cfg = ExperimentConfig.model_validate(cfg_dump)
    t = cfg.training
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    fmt = ChatFormat.for_model(model_path, prompt)
    examples, _ = encode_stream(read_parquet(stream_path).to_pylist(), fmt, t.max_seq_len)
    plan = plan_steps([len(e.input_ids) for e in examples], global_batch_size=t.global_batch_size,
                      micro_batch_size=t.micro_batch_size_per_worker, world_size=1,
                      num_epochs=t.num_epochs, seed=t.seed)  # fmt: skip
    pad_id = fmt.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else fmt.turn_end_ids[0]
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(0.9, 0.95),
                            eps=1e-8, weight_decay=0.0)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(len(plan), int(t.warmup_ratio * len(plan)), t.lr_scheduler)
    )
    step_rows = []
    for step in range(len(plan)):
        t0 = time.perf_counter()
        num_tokens, num_seqs = step_denominator_counts(examples, plan, step)
        micro = plan.micro_batches(step, 0)
        den = Denominators(num_tokens, num_seqs, len(micro), 1)
        real = 0
        for indices in micro:
            batch = collate([examples[i] for i in indices], pad_id)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            loss = micro_batch_loss(token_terms(logits, batch["labels"]), objective,
                                    t.loss_normalization, den)  # fmt: skip
            loss.backward()
            real += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_rows.append({"tokens": real, "seconds": time.perf_counter() - t0})
    timed = step_rows[1:] or step_rows
    return {
        "tokens": sum(r["tokens"] for r in timed),
        "seconds": sum(r["seconds"] for r in timed),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _pipeline(cfg: ExperimentConfig, student: str) -> dict:
    """One run of the train stage on the synthetic cell; its figures from the cell's files."""
    import shutil

    from qup_ray.stages import run_stage

    cell = cfg.run_dir / "train" / student / STREAM / "sft"
    shutil.rmtree(cell, ignore_errors=True)
    t0 = time.perf_counter()
    run_stage("train", cfg, cells=[f"{student}/{STREAM}/sft"])
    wall = time.perf_counter() - t0
    metrics = read_parquet(cell / "metrics.parquet").to_pylist()
    # Steps 2..N by the wall clock between the first and the last step's end: per-step
    # reporting (ray.train.report, TensorBoard, the stop check) counts, start-up does not.
    timed = metrics[1:]
    return {
        "tokens": sum(r["tokens_per_s"] * r["seconds"] for r in timed),
        "seconds": metrics[-1]["finished_at"] - metrics[0]["finished_at"],
        "compute_seconds": sum(r["seconds"] for r in timed),
        "wall": wall,
        "metrics": metrics,
        "summary": read_json(cell / "_manifest.json")["training"],
    }


def run(
    *, quick: bool = False, rounds: int | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Measure both sides on one synthetic stream of the anchor student (one cell, SFT), in
    alternating rounds (a shared machine swings one round by 2x); medians are reported."""
    import statistics

    from qup_ray.models import resolve_model

    num_problems = 64 if quick else 256  # 4 or 16 steps of 16 sequences
    rounds = rounds or (1 if quick else 3)
    with tempfile.TemporaryDirectory(prefix="qup-bench-train-") as tmp:
        cfg: ExperimentConfig = load_config(
            CONFIGS_DIR / "dryrun.yaml",
            [f"output_dir={tmp}", "training.num_workers=1", "training.cpus_per_worker=1",
             "training.global_batch_size=16", "training.micro_batch_size_per_worker=4",
             "training.checkpoint_every_steps=0", "training.tensorboard=false",
             f"training.streams=[{STREAM}]", "training.objectives=[sft]", "training.robustness=[]",
             *(overrides or [])],
        )  # fmt: skip
        student = cfg.anchor_student
        write_synthetic_streams(cfg.run_dir, [student], {STREAM: "native"}, num_problems, seed=4242)
        model_path = resolve_model(cfg.students[student].path, cfg)
        stream_path = cfg.run_dir / "streams" / student / "final" / f"{STREAM}.parquet"
        args = (cfg.model_dump(mode="json"), model_path, cfg.students[student].prompt,
                str(stream_path), "sft")  # fmt: skip
        pairs = []
        for i in range(rounds):
            bare = run_in_subprocess(_bare, *args)
            pipe = _pipeline(cfg, student)
            pairs.append((bare, pipe))
            logger.info("round %d/%d: ratio %.3f", i + 1, rounds,
                        (pipe["tokens"] / pipe["seconds"]) / (bare["tokens"] / bare["seconds"]))  # fmt: skip
    bare_rates = [b["tokens"] / b["seconds"] for b, _ in pairs]
    pipe_rates = [p["tokens"] / p["seconds"] for _, p in pairs]
    ratios = [p / b for p, b in zip(pipe_rates, bare_rates, strict=True)]
    bare, pipe = pairs[-1]
    metrics, summary = pipe["metrics"], pipe["summary"]
    return {
        "bench": "train",
        "unit": "tokens",
        "pipeline_per_s": round(statistics.median(pipe_rates), 1),
        "baseline_per_s": round(statistics.median(bare_rates), 1),
        "ratio": round(statistics.median(ratios), 3),
        "round_ratios": [round(r, 3) for r in ratios],
        "rounds": rounds,
        "padding_frac": round(sum(r["padding_frac"] for r in metrics) / len(metrics), 4),
        "steps": len(metrics),
        "examples": summary["examples"],
        "num_workers": cfg.training.num_workers,
        "threads_per_worker": max(1, int(cfg.training.cpus_per_worker)),
        "zero_stage": summary["zero_stage"],
        "pipeline_peak_rss_mb": round(summary.get("peak_rss_mb", 0.0), 1),
        "baseline_peak_rss_mb": round(bare["peak_rss_mb"], 1),
        "pipeline_wall_s": [round(p["wall"], 2) for _, p in pairs],
        "fixed_overhead_s": round(pipe["wall"] - pipe["seconds"] - metrics[0]["seconds"], 2),
        "pipeline_compute_share": round(pipe["compute_seconds"] / pipe["seconds"], 3),
        "final_ce": round(metrics[-1]["ce"], 4),
    }
