"""The train stage end to end on the CPU world's tiny students (Ray Train + DeepSpeed ZeRO-2 over
gloo, two workers): every cell lowers its stream's cross-entropy, exports a folder vLLM loads
and generates from, and a run killed after a checkpoint (SIGKILL, SIGTERM) resumes to the same
weights as an unbroken run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_cell import NUM_STEPS, cell_dir, one_cell_config, start, weights, weights_of

from qup_ray.bench.train import write_synthetic_streams
from qup_ray.config import CONFIGS_DIR, load_config
from qup_ray.rundir import RunDir, StageError, read_json, read_parquet

pytestmark = pytest.mark.slow

STREAMS = {"slm_rft": "native", "oracle_refined": "compact"}
METRIC_COLUMNS = ["step", "loss", "ce", "token_acc", "lr", "grad_norm", "tokens_per_s",
                  "padding_frac"]  # fmt: skip


def _stream_fit(model_dir: Path, fmt_dir: Path, stream_path: Path) -> tuple[float, float]:
    """(mean token cross-entropy, mean target probability) of a model over a stream's training
    sequences, by a plain transformers float32 forward pass (independent of the training code)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from qup_ray.encoding import ChatFormat

    fmt = ChatFormat.for_model(fmt_dir, "tiny")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nlls: list[float] = []
    with torch.no_grad():
        for row in read_parquet(stream_path).to_pylist():
            ids, start = fmt.example(row["problem"], row["trace"])
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            nlls += [-logp[t - 1, ids[t]].item() for t in range(start, len(ids))]
    return sum(nlls) / len(nlls), sum(math.exp(-v) for v in nlls) / len(nlls)


def _mean_ce(model_dir: Path, fmt_dir: Path, stream_path: Path) -> float:
    return _stream_fit(model_dir, fmt_dir, stream_path)[0]


def _vllm_generate(model_dir: str, prompt_ids: list[int], cache_dir: str) -> dict:
    """In a process of its own (one engine per process): load the export and generate."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from qup_ray.config import load_config
    from qup_ray.engines import shutdown_llm, start_llm

    engine = load_config(CONFIGS_DIR / "dryrun.yaml").students["tiny-qwen"].engine
    llm = start_llm(model_dir, engine, dtype="float32", cache_dir=cache_dir)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)],
                       SamplingParams(max_tokens=64, temperature=0.0), use_tqdm=False)  # fmt: skip
    result = {"text": out[0].outputs[0].text, "token_ids": list(out[0].outputs[0].token_ids)}
    shutdown_llm(llm)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cpu_world):
    """Both tiny students x two streams x {sft, dft}: 8 cells in one stage run."""
    from qup_ray.stages import run_stage

    out = tmp_path_factory.mktemp("train")
    cfg = load_config(
        CONFIGS_DIR / "dryrun.yaml",
        [f"output_dir={out}", "training.streams=[slm_rft, oracle_refined]"],
    )
    write_synthetic_streams(cfg.run_dir, list(cfg.students), STREAMS, num_problems=48, seed=7)
    t0 = time.perf_counter()
    run_stage("train", cfg)
    return cfg, time.perf_counter() - t0


def test_every_cell_trains_lowers_ce_and_exports(trained, cpu_world):
    cfg, seconds = trained
    root = cfg.run_dir
    cells = [(s, st, o) for s in cfg.students for st in STREAMS for o in ("sft", "dft")]
    print(f"\n8 cells trained in {seconds:.1f} s")
    for student, stream, objective in cells:
        cell = root / "train" / student / stream / objective
        manifest = read_json(cell / "_manifest.json")
        assert manifest["objective"] == objective
        assert manifest["loss_normalization"] == "token"
        assert manifest["row_counts"]["examples"] == 48
        assert manifest["row_counts"]["steps"] == 3  # 48 // 16
        metrics = read_parquet(cell / "metrics.parquet").to_pandas()
        assert list(metrics.columns[: len(METRIC_COLUMNS)]) == METRIC_COLUMNS
        assert metrics["step"].tolist() == [1, 2, 3]
        assert metrics[["loss", "ce", "grad_norm", "tokens_per_s"]].notna().all().all()
        assert ((metrics["padding_frac"] >= 0) & (metrics["padding_frac"] < 0.5)).all()
        assert list((cell / "tensorboard").glob("events.out.tfevents.*"))
        assert not (cell / "checkpoints").exists()
        model = cell / "model"
        for name in ("model.safetensors", "config.json", "generation_config.json",
                     "tokenizer.json", "tokenizer_config.json"):  # fmt: skip
            assert (model / name).is_file(), name
        base_dir = cpu_world["tiny-qwen2" if student == "tiny-qwen" else "tiny-llama"]
        stream_path = root / "streams" / student / "final" / f"{stream}.parquet"
        base_ce, base_p = _stream_fit(base_dir, base_dir, stream_path)
        tuned_ce, tuned_p = _stream_fit(model, base_dir, stream_path)
        print(f"{student}/{stream}/{objective}: CE {base_ce:.4f} -> {tuned_ce:.4f}, "
              f"mean p(target) {base_p:.4f} -> {tuned_p:.4f}")  # fmt: skip
        # What each objective descends: SFT the cross-entropy; DFT's gradient sg(p) * d(-log p)
        # = -dp ascends the mean target probability. On the native stream (close to the
        # student) DFT lowers the cross-entropy too; on the compact stream (CE ~10: p ~ 0 for
        # nearly every token) it learns from the few likely tokens and CE need not fall.
        if objective == "sft" or stream == "slm_rft":
            assert tuned_ce < base_ce
        if objective == "dft":
            assert tuned_p > base_p


def test_status_shows_the_cells(trained):
    cfg, _ = trained
    rows = {r["path"]: r["state"] for r in RunDir.for_config(cfg).status(cfg)}
    train_rows = {p: s for p, s in rows.items() if p.startswith("train/")}
    assert len(train_rows) == 8 and set(train_rows.values()) == {"done"}


def test_rerun_skips_finished_cells_and_trains_a_new_seed_alone(trained):
    from qup_ray.stages import run_stage

    cfg, _ = trained
    before = read_json(cfg.run_dir / "train/tiny-qwen/slm_rft/dft/_manifest.json")
    t0 = time.perf_counter()
    run_stage("train", cfg)
    assert time.perf_counter() - t0 < 5
    assert read_json(cfg.run_dir / "train/tiny-qwen/slm_rft/dft/_manifest.json") == before

    # A second training seed: the finished cells are seed 0's and stay finished; only seed 1's
    # cells are pending, and one of them trains to other weights (another data order).
    from safetensors.torch import load_file

    from qup_ray.stages.train import plan_cells

    seeded = load_config(
        CONFIGS_DIR / "dryrun.yaml",
        [f"output_dir={cfg.output_dir}", "training.streams=[slm_rft, oracle_refined]",
         "training.seeds=[0, 1]"],
    )  # fmt: skip
    pending, asked = plan_cells(seeded, False, None)
    assert asked == 16 and {spec.cell_id.split("/")[2] for _, spec in pending} == {
        "sft-seed1", "dft-seed1"}  # fmt: skip
    assert {spec.seed for _, spec in pending} == {1} and len(pending) == 8
    run_stage("train", seeded, cells=["tiny-qwen/slm_rft/dft-seed1"])
    assert read_json(cfg.run_dir / "train/tiny-qwen/slm_rft/dft/_manifest.json") == before
    seed1 = cfg.run_dir / "train/tiny-qwen/slm_rft/dft-seed1"
    manifest = read_json(seed1 / "_manifest.json")
    assert manifest["seed"] == 1 and manifest["objective"] == "dft"
    assert manifest["config_hash"] != before["config_hash"]
    weights = [load_file(d / "model" / "model.safetensors") for d in (seed1, seed1.parent / "dft")]
    assert any(not t.equal(weights[1][name]) for name, t in weights[0].items())


def test_a_cell_too_small_for_one_step_fails_alone_with_its_reason_and_no_retry(
    tmp_path, cpu_world
):
    """A stream that makes no training step is the user's sizing, not a fault: Ray Train does
    not restart the worker group for it, the other cells train, and the error names it."""
    import pyarrow.parquet as pq

    from qup_ray.stages import run_stage

    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", [f"output_dir={tmp_path}"])
    write_synthetic_streams(cfg.run_dir, list(cfg.students), STREAMS, num_problems=48, seed=7)
    final = cfg.run_dir / "streams" / "tiny-qwen" / "final" / "oracle_refined.parquet"
    pq.write_table(pq.read_table(final).slice(0, 5), final)  # 5 < micro batch 4 x 2 workers
    small = "tiny-qwen/oracle_refined/sft"
    with pytest.raises(StageError) as caught:
        run_stage("train", cfg, cells=["tiny-qwen/slm_rft/sft", small])
    assert str(caught.value).startswith("1 of 2 cells cannot train (1 trained)")
    assert f"{small}: 5 examples make no training step" in str(caught.value)
    train = cfg.run_dir / "train" / "tiny-qwen"
    assert read_json(train / "slm_rft" / "sft" / "_manifest.json")["row_counts"]["examples"] == 48
    assert not (train / "oracle_refined" / "sft" / "_manifest.json").exists()
    starts = list((cfg.run_dir / "train" / "_ray").glob("events-*/start-*"))
    assert len(starts) == 1  # one worker group start: no retry for a sizing error


@pytest.mark.parametrize("student", ["tiny-qwen", "tiny-llama"])
def test_exported_models_load_in_vllm_and_generate(trained, cpu_world, student):
    from qup_ray.bench.common import run_in_subprocess
    from qup_ray.encoding import ChatFormat

    cfg, _ = trained
    model = cfg.run_dir / "train" / student / "slm_rft" / "dft" / "model"
    fmt = ChatFormat.for_model(model, "tiny")
    prompt = fmt.prompt_ids("What is 17 + 25?")
    out = run_in_subprocess(
        _vllm_generate, str(model), prompt, str(cfg.cpu_world.cache_root()), timeout_s=600
    )
    assert out["token_ids"], out
    assert out["text"].strip()


# ---- kill and resume ------------------------------------------------------------------------


def _wait_for_checkpoint(cell: Path, proc: subprocess.Popen, min_step: int = 2) -> None:
    state = cell / "checkpoints" / "qup_state.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if state.is_file() and read_json(state)["step"] >= min_step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError("no checkpoint")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, unbroken_train_cell, how):
    import torch

    want, want_metrics = unbroken_train_cell
    config = one_cell_config(tmp_path, "run")
    cell = cell_dir(config)
    proc = start(config)
    _wait_for_checkpoint(cell, proc)
    if how == "SIGKILL":
        # The whole job, no warning, as SLURM kills a job's cgroup: the driver's group and every
        # process it started. Ray's workers run in a group of their own; left alone they can
        # finish a cell this small before Ray reaps them, and the rerun has nothing to resume.
        import psutil

        everything = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        for child in everything:
            with contextlib.suppress(psutil.Error):
                child.kill()
        proc.communicate(timeout=120)
    else:
        os.kill(proc.pid, signal.SIGTERM)  # the driver only, as SLURM/submitit signal it
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        # Ray's actors log under a "(Name pid=N)" prefix (their own tracebacks included, e.g. a
        # controller timeout under load); the command itself ends with one message, no traceback
        own = [line for line in err.splitlines() if "pid=" not in line and line.strip()]
        assert not any("Traceback" in line for line in own), err
        # (progress bars of model loading may still trail it on a loaded machine)
        messages = [line for line in own if line.startswith("error:")]
        assert messages and messages[-1].startswith("error: training stopped by SIGTERM"), err
        assert messages[-1].endswith("checkpoints saved, rerun the same command to resume"), err
    assert not (cell / "_manifest.json").exists()
    stopped_at = read_json(cell / "checkpoints" / "qup_state.json")["step"]
    assert 2 <= stopped_at < NUM_STEPS
    cfg = load_config(config)
    status = {r["path"]: r for r in RunDir.for_config(cfg).status(cfg)}
    assert status["train/tiny-qwen/slm_rft/dft"]["state"] == "partial"
    assert status["train/tiny-qwen/slm_rft/dft"]["detail"] == f"checkpoint at step {stopped_at}"

    proc = start(config)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    got = weights(cell)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    summary = read_json(cell / "_manifest.json")["training"]
    # SIGKILL: a worker may have checkpointed one more step before it died; the rerun resumes
    # from the latest checkpoint.
    assert stopped_at <= summary["resumed_from_step"] < NUM_STEPS
    if how == "SIGTERM":
        assert summary["resumed_from_step"] == stopped_at
    metrics = read_parquet(cell / "metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == list(range(1, NUM_STEPS + 1))
    assert [r["ce"] for r in metrics] == pytest.approx([r["ce"] for r in want_metrics], rel=1e-6)


def test_zero3_export_is_complete_and_trained(tmp_path, cpu_world):
    """ZeRO-3 shards every parameter over the workers: the export gathers them (saved without
    gathering they would come out empty)."""
    from qup_ray.stages import run_stage

    cfg = load_config(
        CONFIGS_DIR / "dryrun.yaml",
        [f"output_dir={tmp_path}", "training.streams=[slm_rft]", "training.objectives=[sft]",
         "training.deepspeed_config=configs/deepspeed/zero3.json"],
    )  # fmt: skip
    write_synthetic_streams(cfg.run_dir, ["tiny-qwen"], {"slm_rft": "native"}, 48, seed=7)
    run_stage("train", cfg, cells=["tiny-qwen/slm_rft/sft"])
    cell = cfg.run_dir / "train" / "tiny-qwen" / "slm_rft" / "sft"
    assert read_json(cell / "_manifest.json")["training"]["zero_stage"] == 3
    base = weights_of(cpu_world["tiny-qwen2"] / "model.safetensors")
    got = weights_of(cell / "model" / "model.safetensors")
    assert got.keys() == base.keys()
    assert all(got[k].shape == base[k].shape for k in base)
    stream = cfg.run_dir / "streams" / "tiny-qwen" / "final" / "slm_rft.parquet"
    base_ce = _mean_ce(cpu_world["tiny-qwen2"], cpu_world["tiny-qwen2"], stream)
    assert _mean_ce(cell / "model", cpu_world["tiny-qwen2"], stream) < base_ce
