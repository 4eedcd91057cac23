"""The Ray Train worker loop: every pending cell of a run trained one after the other by the same
worker group, with DeepSpeed ZeRO, resumable checkpoints and a Hugging Face export.

`train_loop_per_worker(config)` is what `TorchTrainer` runs on every worker; `config` is plain
JSON-able data built by the train stage (`cells`: one `CellSpec` dict each). One worker group
serves all the cells of a run, so Ray, torch, DeepSpeed and its compiled CPU op start once,
not once per cell.

A step: each rank runs its accumulation micro-batches of the shared plan (see
`qup_ray.training.data`), each loss scaled *before* `backward` (`qup_ray.losses`;
`scale_wrt_gas=False`, so DeepSpeed only sums micro-batches and averages ranks), then
DeepSpeed clips, steps AdamW and the schedule. Metrics are reduced over ranks and reported
through `ray.train.report`; rank 0 keeps them for `metrics.parquet` and TensorBoard.

Stopping early: when the stop file named in the config appears (the driver creates it on
SIGTERM/SIGUSR2), the ranks agree at the next step boundary, save a checkpoint and return; a
rerun loads the latest checkpoint (weights, optimizer, schedule, metrics so far) and continues
with the same plan, ending with the same weights as an unbroken run.

A dying worker: Ray Train restarts the whole worker group (`training.max_failures`) and runs
this loop again; it skips the cells already exported and resumes the current one from its
latest checkpoint in the same way (the checkpoints live in the cell's folder, not in Ray's
storage, so `ray.train.get_checkpoint()` is not needed: a rerun by hand and a restart by Ray
resume alike). Steps after that checkpoint are recomputed with the same plan, so the weights
equal an unbroken run's. `qup_ray.faults` can kill a worker at a chosen step to drill this.
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import math
import os
import resource
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qup_ray import faults

logger = logging.getLogger(__name__)

CHECKPOINT_KEEP = 2
STATE_FILE = "qup_state.json"


@dataclass(frozen=True)
class CellSpec:
    """Everything a worker needs to train one cell (plain data, sent to the workers)."""

    cell_id: str
    cell_dir: str
    checkpoint_dir: str
    model_path: str
    prompt: str
    stream_path: str
    objective: str
    learning_rate: float
    global_batch_size: int
    seed: int
    """Training seed of the cell (`training.seeds`): data order and torch's RNG."""
    config_hash: str


def lr_lambda(total_steps: int, warmup_steps: int, kind: str):
    """The multiplier of the peak learning rate at optimizer step s (0-based): linear warm-up
    over `warmup_steps`, then cosine/linear decay to zero at the end, or constant."""

    def f(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def deepspeed_config(
    template: dict, training: dict, global_batch_size: int, world_size: int
) -> dict:
    """The DeepSpeed JSON with its `auto` values filled from the training section."""
    ds = json.loads(json.dumps(template))
    micro = training["micro_batch_size_per_worker"]
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = global_batch_size // (micro * world_size)
    ds["train_batch_size"] = global_batch_size
    ds["gradient_clipping"] = training["max_grad_norm"]
    ds.setdefault("bf16", {})["enabled"] = bool(training["use_gpu"])
    ds.setdefault("optimizer", {}).setdefault("params", {})["lr"] = 0.0  # set by the schedule
    ds["optimizer"]["params"]["lr"] = training["learning_rate"]
    return ds


def _set_worker_env(cache_dir: str, use_gpu: bool) -> None:
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed's CPU op is compiled once (40-65 s) and cached here, shared by every run.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(cache_dir) / "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


CANNOT_TRAIN = "_cannot_train.json"
"""Written into a cell's folder by a cell whose stream makes no full global batch."""


def train_loop_per_worker(config: dict) -> None:
    """Train every cell in `config["cells"]` (the Ray Train entry point)."""
    _set_worker_env(config["cache_dir"], config["training"]["use_gpu"])
    import ray.train

    # Ray logs every metrics report at INFO; the progress bar and metrics.parquet carry them.
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    if ctx.get_world_rank() == 0 and config.get("events_dir"):
        events = Path(config["events_dir"])
        events.mkdir(parents=True, exist_ok=True)
        (events / f"start-{uuid.uuid4().hex}").touch()
    for spec in (CellSpec(**s) for s in config["cells"]):
        if _trained(spec):  # a restarted worker group skips the cells already exported
            continue
        outcome = train_cell(spec, config, ctx.get_world_rank(), ctx.get_world_size())
        if outcome == "stopped":
            return


def _trained(spec: CellSpec) -> bool:
    """The cell's model is exported (its summary, written after the export, is there)."""
    summary = Path(spec.cell_dir) / "_train_summary.json"
    return (
        summary.is_file() and json.loads(summary.read_text()).get("config_hash") == spec.config_hash
    )


def _stop_requested(stop_file: str | None, device: Any) -> bool:
    """All ranks agree: stop when rank 0 (or any rank) sees the stop file."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if stop_file and os.path.exists(stop_file) else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_cell(spec: CellSpec, config: dict, rank: int, world_size: int) -> str:
    """Train one cell to the end (returns "done") or until a stop request ("stopped")."""
    import deepspeed
    import pyarrow.parquet as pq
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from qup_ray.encoding import ChatFormat
    from qup_ray.losses import Denominators, micro_batch_loss, token_terms
    from qup_ray.training.data import collate, encode_stream, plan_steps, step_denominator_counts

    training = config["training"]
    use_gpu = training["use_gpu"]
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)  # DeepSpeed places the model on the current device
    if not use_gpu:  # as many compute threads as the worker has CPUs (Ray may have set 1)
        torch.set_num_threads(max(1, int(training["cpus_per_worker"])))
    fmt = ChatFormat.for_model(spec.model_path, spec.prompt)
    rows = pq.read_table(spec.stream_path, columns=["problem_id", "problem", "trace"]).to_pylist()
    examples, counts = encode_stream(rows, fmt, training["max_seq_len"])
    plan = plan_steps(
        [len(e.input_ids) for e in examples],
        global_batch_size=spec.global_batch_size,
        micro_batch_size=training["micro_batch_size_per_worker"],
        world_size=world_size,
        num_epochs=training["num_epochs"],
        seed=spec.seed,
    )
    if len(plan) == 0:  # a user's sizing, not a fault: no retry, the other cells go on
        if rank == 0:
            per_step = training["micro_batch_size_per_worker"] * world_size
            reason = (
                f"{len(examples)} examples make no training step (one takes at least "
                f"micro_batch_size_per_worker x workers = {per_step}): use more problems"
            )
            Path(spec.cell_dir).mkdir(parents=True, exist_ok=True)
            (Path(spec.cell_dir) / CANNOT_TRAIN).write_text(json.dumps({"reason": reason}))
        return "cannot_train"
    tokenizer = fmt.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fmt.turn_end_ids[0]

    torch.manual_seed(spec.seed)
    dtype = torch.bfloat16 if use_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=dtype)
    if training["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    total_steps = len(plan)
    warmup = int(training["warmup_ratio"] * total_steps)
    schedule = lr_lambda(total_steps, warmup, training["lr_scheduler"])
    ds_config = deepspeed_config(
        config["deepspeed"], {**training, "learning_rate": spec.learning_rate},
        spec.global_batch_size, world_size,
    )  # fmt: skip
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        dist_init_required=False,
    )
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)

    # One trainer per cell at a time: the workers of a killed run outlive their driver for a
    # few seconds (Ray reaps them), and a rerun must not write checkpoints beside them.
    lock = _lock_cell(spec) if rank == 0 else None
    if dist.is_initialized():
        dist.barrier()
    start_step, rows_so_far = _resume(engine, spec)
    writer = _tensorboard(spec, training) if rank == 0 else None
    bar = _progress(spec, total_steps, start_step) if rank == 0 else None
    every = training["checkpoint_every_steps"]
    normalization = training["loss_normalization"]
    metrics_rows: list[dict] = rows_so_far
    stopped = False
    for step in range(start_step, total_steps):
        if _stop_requested(config.get("stop_file"), device):
            stopped = True
            break
        t0 = time.perf_counter()
        num_tokens, num_seqs = step_denominator_counts(examples, plan, step)
        micro = plan.micro_batches(step, rank)
        den = Denominators(num_tokens, num_seqs, len(micro), world_size)
        lr = scheduler.get_last_lr()[0]
        sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, nll, hit, tok, pad, all
        for k, indices in enumerate(micro):
            # Boundaries set explicitly: a short last step has fewer accumulation micro-batches.
            engine.set_gradient_accumulation_boundary(k == len(micro) - 1)
            batch = {
                k: v.to(device) for k, v in collate([examples[i] for i in indices], pad_id).items()
            }
            logits = engine(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            terms = token_terms(logits, batch["labels"])
            loss = micro_batch_loss(terms, spec.objective, normalization, den)
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
            real = batch["attention_mask"].sum()
            sums += torch.stack([
                loss.detach().double() / world_size, terms.nll.detach().sum().double(),
                terms.correct.sum().double(), terms.mask.sum().double(),
                (batch["attention_mask"].numel() - real).double(), real.double(),
            ])  # fmt: skip
        if dist.is_initialized():
            dist.all_reduce(sums)
        seconds = time.perf_counter() - t0
        loss_v, nll, hits, tokens, pad, real_tokens = sums.tolist()
        grad_norm = engine.get_global_grad_norm()
        row = {
            "step": step + 1, "loss": loss_v, "ce": nll / max(tokens, 1),
            "token_acc": hits / max(tokens, 1), "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": real_tokens / seconds, "padding_frac": pad / max(pad + real_tokens, 1),
            "label_tokens": int(tokens), "seconds": seconds, "finished_at": time.time(),
        }  # fmt: skip
        ray.train.report({"cell": spec.cell_id, **row})
        if rank == 0:
            metrics_rows.append(row)
            if writer is not None:
                for key, value in row.items():
                    if key != "step":
                        writer.add_scalar(f"train/{key}", value, row["step"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ce=f"{row['ce']:.3f}", loss=f"{row['loss']:.4f}")
        if every and (step + 1) % every == 0 and step + 1 < total_steps:
            _save_checkpoint(engine, spec, step + 1, metrics_rows, rank)
        faults.train_step(config.get("fault_spec"), rank, step + 1, spec.cell_dir)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if stopped:
        _save_checkpoint(engine, spec, step, metrics_rows, rank)
        logger.warning("%s: stop requested, checkpoint saved at step %d", spec.cell_id, step)
        if lock is not None:
            lock.close()
        return "stopped"
    _export(engine, spec, tokenizer, zero_stage, rank)
    if rank == 0:
        from qup_ray.rundir import write_json, write_parquet

        write_parquet(Path(spec.cell_dir) / "metrics.parquet", metrics_rows)
        write_json(
            Path(spec.cell_dir) / "_train_summary.json",
            {**counts, "steps": total_steps, "warmup_steps": warmup,
             "dropped_tail": plan.dropped_tail, "world_size": world_size, "zero_stage": zero_stage,
             "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
             "dtype": str(dtype).removeprefix("torch."), "resumed_from_step": start_step,
             "config_hash": spec.config_hash, "objective": spec.objective,
             "learning_rate": spec.learning_rate, "global_batch_size": spec.global_batch_size,
             "final_ce": metrics_rows[-1]["ce"] if metrics_rows else None,
             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if use_gpu else None},
        )  # fmt: skip
    if dist.is_initialized():
        dist.barrier()
    if lock is not None:
        lock.close()
    if hasattr(engine, "destroy"):
        engine.destroy()  # frees optimizer state and hooks before the next cell
    del engine, model
    gc.collect()
    return "done"


# ---- checkpoints ------------------------------------------------------------------------------


def _lock_cell(spec: CellSpec) -> Any:
    """An exclusive lock on the cell's checkpoint folder, released when the handle closes or
    its process dies."""
    root = Path(spec.checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    handle = (root / ".lock").open("a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _resume(engine: Any, spec: CellSpec) -> tuple[int, list[dict]]:
    """Load the latest checkpoint of this cell (same config hash); (next step, metrics rows)."""
    root = Path(spec.checkpoint_dir)
    if not (root / "latest").is_file():
        return 0, []
    state = json.loads((root / STATE_FILE).read_text()) if (root / STATE_FILE).is_file() else {}
    if state.get("config_hash") != spec.config_hash:
        logger.warning("%s: checkpoint of another config, starting over", spec.cell_id)
        return 0, []
    path, client = engine.load_checkpoint(str(root))
    if path is None:
        return 0, []
    logger.info("%s: resumed from %s (step %d)", spec.cell_id, path, client["step"])
    return int(client["step"]), list(client.get("metrics", []))


def _save_checkpoint(engine: Any, spec: CellSpec, step: int, rows: list[dict], rank: int) -> None:
    """Every rank writes its shard; DeepSpeed writes `latest` once all are saved."""
    import torch.distributed as dist

    root = Path(spec.checkpoint_dir)
    tag = f"step-{step:06d}"
    engine.save_checkpoint(
        str(root), tag=tag, client_state={"step": step, "metrics": rows}, save_latest=True
    )
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        from qup_ray.rundir import write_json

        write_json(root / STATE_FILE, {"config_hash": spec.config_hash, "step": step, "tag": tag})
        tags = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in tags[:-CHECKPOINT_KEEP]:
            shutil.rmtree(old, ignore_errors=True)


# ---- export -----------------------------------------------------------------------------------


def _export(engine: Any, spec: CellSpec, tokenizer: Any, zero_stage: int, rank: int) -> None:
    """`model/`: save_pretrained (safetensors), tokenizer with chat template, generation
    config; written under a temporary name and renamed. ZeRO-3 weights are gathered first
    (saved without gathering, they come out empty)."""
    import torch.distributed as dist

    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank == 0:
        module = engine.module
        if state is None:
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        out = Path(spec.cell_dir) / "model"
        tmp = Path(spec.cell_dir) / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        base_gen = Path(spec.model_path) / "generation_config.json"
        if base_gen.is_file():
            shutil.copy(base_gen, tmp / "generation_config.json")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()


# ---- rank 0 reporting ---------------------------------------------------------------------------


def _tensorboard(spec: CellSpec, training: dict) -> Any:
    if not training["tensorboard"]:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(Path(spec.cell_dir) / "tensorboard"))


def _progress(spec: CellSpec, total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=spec.cell_id, mininterval=5)


def cell_spec_dict(spec: CellSpec) -> dict:
    return asdict(spec)
