"""Stage `train`: SFT and DFT of every student on every stream, on Ray Train + DeepSpeed.

    qup run train -c configs/paper.yaml
    run_stage("train", cfg, cells=["qwen/slm_rft/dft"])     # one cell (a SLURM grid job)

One cell per student x stream x objective x variant x seed (`rundir.train_cell_settings`), in
`train/<student>/<stream>/<cell>/`:
- `model/`: the trained student as a Hugging Face folder (safetensors, tokenizer with its chat
  template, generation config) that vLLM and transformers load;
- `metrics.parquet`: one row per optimizer step (step, loss, ce, token_acc, lr, grad_norm,
  tokens_per_s, padding_frac); `tensorboard/` event files;
- `_manifest.json`, written last: config hash, the stream's manifest, row counts (examples,
  truncated, dropped), steps, the loss normalisation, timings.

Every pending cell of a run is trained by one `TorchTrainer` whose workers go through the cells
in turn (`qup_ray.training.loop`): Ray, the worker processes and DeepSpeed's compiled CPU op
start once per run, not per cell. A finished cell is skipped. SIGTERM or SIGUSR2 (what SLURM
sends before preemption or the time limit) makes the workers save a checkpoint at the next step
and stop; the stage then raises `TrainingInterrupted`, and a rerun resumes from the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

from qup_ray import faults
from qup_ray.config import REPO_ROOT, ExperimentConfig, cpu_world_identity
from qup_ray.models import resolve_model
from qup_ray.rundir import RunDir, Stage, StageError, read_json, train_cell_settings, train_streams
from qup_ray.training.loop import CANNOT_TRAIN, CellSpec, train_loop_per_worker

logger = logging.getLogger(__name__)

# Fields that change how fast training runs or where files go, never its result.
_NOT_HASHED = {"checkpoint_every_steps", "checkpoint_dir", "tensorboard", "cpus_per_worker",
               "gpus_per_worker", "streams", "objectives", "robustness", "seeds", "max_failures"}  # fmt: skip


class TrainingInterrupted(StageError):
    """Training stopped on SIGTERM/SIGUSR2 after saving checkpoints; rerun to resume."""


def deepspeed_template(cfg: ExperimentConfig) -> dict:
    path = Path(cfg.training.deepspeed_config)
    path = path if path.is_absolute() else REPO_ROOT / path
    if not path.is_file():
        raise StageError(f"training.deepspeed_config: no file {path}")
    return json.loads(path.read_text())


def cell_config_hash(cfg: ExperimentConfig, student: str, settings: dict, ds: dict) -> str:
    """What decides a cell's weights: the training section (minus throughput and file-location
    knobs and the grid's shape), the cell's objective/lr/batch and seed, the student and the
    DeepSpeed JSON. The cell's seed stands in for `training.seed`, so a one-seed run hashes as
    it did before `training.seeds` existed."""
    from qup_ray.rundir import stable_hash

    training = {
        k: v for k, v in cfg.training.model_dump(mode="json").items() if k not in _NOT_HASHED
    }
    training["seed"] = settings["seed"]
    settings = {k: v for k, v in settings.items() if k != "seed"}
    model = cfg.students[student].model_dump(mode="json", exclude={"engine"})
    world = cpu_world_identity(cfg.cpu_world)
    world = world if model["path"].startswith("cpu-world:") else None
    return stable_hash(training, settings, model, ds, world)


def plan_cells(
    cfg: ExperimentConfig, force: bool, cells: list[str] | None
) -> tuple[list[tuple[Stage, CellSpec]], int]:
    """The (stage, spec) of every cell still to train, and how many cells were asked for."""
    run_dir = RunDir.for_config(cfg)
    settings = train_cell_settings(cfg)
    ds = deepspeed_template(cfg)
    all_ids = [f"{s}/{st}/{c}" for s in cfg.students for st in train_streams(cfg) for c in settings]
    wanted = all_ids if cells is None else list(cells)
    unknown = [c for c in wanted if c not in all_ids]
    if unknown:
        raise StageError(f"not training cells of this config: {unknown} (cells: {all_ids})")
    pending, pending_manifests = [], []
    for cell_id in wanted:
        student, stream, cell = cell_id.split("/")
        final = run_dir.root / "streams" / student / "final"
        if not (final / "_manifest.json").is_file():
            raise StageError(f"{final} is not finished: run `qup run streams` first")
        config_hash = cell_config_hash(cfg, student, settings[cell], ds)
        cell_dir = run_dir.root / "train" / student / stream / cell
        stage = Stage(cell_dir, config_hash, inputs=[final], force=force)
        if stage.is_done():
            continue
        if _trained_before(cell_dir, config_hash):  # the driver died before the manifest
            pending_manifests.append((stage, cell_id))
            continue
        ckpt = (
            Path(cfg.training.checkpoint_dir) / cfg.experiment / student / stream / cell
            if cfg.training.checkpoint_dir
            else cell_dir / "checkpoints"
        )
        model = cfg.students[student]
        spec = CellSpec(
            cell_id=cell_id, cell_dir=str(cell_dir.resolve()), checkpoint_dir=str(ckpt.resolve()),
            model_path=_local(resolve_model(model.path, cfg)),
            prompt=model.prompt, stream_path=str((final / f"{stream}.parquet").resolve()),
            objective=settings[cell]["objective"], learning_rate=settings[cell]["learning_rate"],
            global_batch_size=settings[cell]["global_batch_size"], seed=settings[cell]["seed"],
            config_hash=config_hash,
        )  # fmt: skip
        pending.append((stage, spec))
    for stage, cell_id in pending_manifests:
        _finish_cell(cfg, stage, cell_id, None)
    return pending, len(wanted)


def _trained_before(cell_dir: Path, config_hash: str) -> bool:
    summary = cell_dir / "_train_summary.json"
    return (
        (cell_dir / "model").is_dir()
        and summary.is_file()
        and read_json(summary).get("config_hash") == config_hash
    )


def _local(path: str) -> str:
    """An absolute path for local folders (workers may run elsewhere), hub ids unchanged."""
    return str(Path(path).resolve()) if Path(path).exists() else path


@contextlib.contextmanager
def stop_on_signals(stop_file: Path) -> Iterator[dict]:
    """SIGTERM/SIGUSR2 create `stop_file`, which the workers poll at every step boundary; they
    save a checkpoint and stop. Once they have, the handler that was there before (submitit's
    USR2 handler checkpoints and requeues the job) is called too, unless it is Ray's own
    driver handler (a plain exit, which would hide the message saying how to resume)."""
    seen: dict = {"signal": None, "signum": None}

    def handler(signum: int, _frame: object) -> None:
        seen["signal"], seen["signum"] = signal.Signals(signum).name, signum
        logger.warning("%s received: checkpointing at the next step, then stopping", seen["signal"])
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.touch()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        yield seen
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        with contextlib.suppress(FileNotFoundError):
            stop_file.unlink()
    chained = previous.get(seen["signum"]) if seen["signum"] else None
    if callable(chained) and not getattr(chained, "__module__", "").startswith("ray"):
        logger.info("passing %s on to %r", seen["signal"], chained)
        chained(seen["signum"], None)


def trainer_for(cfg: ExperimentConfig, loop_config: dict, storage: Path):
    """The one TorchTrainer of a run (workers and resources from `training`)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # The controller takes one metrics report per worker per health check (2 s by default) and
    # a worker's report blocks until it is taken: per-step reports would pace training at 2 s
    # a step. Ray passes this variable on to the controller it starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    t = cfg.training
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"train-{uuid.uuid4().hex[:8]}",
            storage_path=str(storage.resolve()),
            # A dead worker restarts the whole group; the loop resumes from the checkpoint.
            failure_config=FailureConfig(max_failures=cfg.training.max_failures),
        ),
    )


def run(cfg: ExperimentConfig, *, force: bool = False, cells: list[str] | None = None) -> Path:
    """Train every pending cell (or those of `cells`); finished cells are skipped."""
    from qup_ray.ray_session import init_ray

    out = RunDir.for_config(cfg).root / "train"
    pending, asked = plan_cells(cfg, force, cells)
    logger.info("train: %d of %d cells to train", len(pending), asked)
    if not pending:
        return out
    init_ray(cfg.ray)
    stop_file = out / f".stop-{uuid.uuid4().hex[:12]}"
    loop_config = {
        "cells": [spec.__dict__ for _, spec in pending],
        "training": cfg.training.model_dump(mode="json"),
        "deepspeed": deepspeed_template(cfg),
        "cache_dir": str(cfg.cache_root().resolve()),
        "stop_file": str(stop_file.resolve()),
        # Each start of the worker group leaves a file here: starts beyond the first are restarts.
        "events_dir": str((out / "_ray" / f"events-{uuid.uuid4().hex[:12]}").resolve()),
        "fault_spec": faults.from_env(),
    }
    with contextlib.ExitStack() as stack:
        for stage, spec in pending:
            # clears stale outputs (not checkpoints, unless --force); records a failure
            stack.enter_context(stage.running())
            Path(spec.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            (Path(spec.cell_dir) / CANNOT_TRAIN).unlink(missing_ok=True)
        seen = stack.enter_context(stop_on_signals(stop_file))
        trainer_for(cfg, loop_config, out / "_ray").fit()
    restarts = max(0, len(list(Path(loop_config["events_dir"]).glob("start-*"))) - 1)
    finished, cannot = 0, []
    for stage, spec in pending:
        if (Path(spec.cell_dir) / "_train_summary.json").is_file():
            _finish_cell(cfg, stage, spec.cell_id, spec.checkpoint_dir, restarts)
            finished += 1
        elif (Path(spec.cell_dir) / CANNOT_TRAIN).is_file():
            cannot.append(
                f"{spec.cell_id}: {read_json(Path(spec.cell_dir) / CANNOT_TRAIN)['reason']}"
            )
    if cannot:
        raise StageError(
            f"{len(cannot)} of {len(pending)} cells cannot train ({finished} trained):\n  "
            + "\n  ".join(cannot)
        )
    if finished < len(pending):
        raise TrainingInterrupted(
            f"training stopped by {seen['signal'] or 'a stop request'} after {finished} of "
            f"{len(pending)} cells; checkpoints saved, rerun the same command to resume"
        )
    shutil.rmtree(out / "_ray", ignore_errors=True)
    return out


def _finish_cell(
    cfg: ExperimentConfig, stage: Stage, cell_id: str, checkpoint_dir: str | None,
    worker_restarts: int = 0,
) -> None:  # fmt: skip
    """The cell's manifest (written last, with the worker-group restarts of the run that
    trained it); its checkpoints are no longer needed."""
    summary = read_json(stage.dir / "_train_summary.json")
    if checkpoint_dir:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    shutil.rmtree(stage.dir / "checkpoints", ignore_errors=True)
    objective, _, _ = cell_id.split("/")[2].partition("-")
    stage.finish(
        row_counts={k: summary[k] for k in ("rows", "examples", "truncated", "dropped_too_long",
                                             "dropped_tail", "steps")},
        cell=cell_id, objective=objective,
        seed=train_cell_settings(cfg)[cell_id.split("/")[2]]["seed"],
        loss_normalization=cfg.training.loss_normalization, training=summary,
        faults={"worker_restarts": worker_restarts},
    )  # fmt: skip
