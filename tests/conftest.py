"""Shared test set-up: nothing reaches the network, expensive things are built once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Tests never download: the CPU world builds its own tiny models and data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Clusters the tests start bind to 127.0.0.1; Ray's token auth would otherwise switch on by itself.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

if importlib.util.find_spec("qup_ray.cpu_world.pytest_plugin") is not None:
    pytest_plugins = ["qup_ray.cpu_world.pytest_plugin"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def layout_tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One small BPE trained on synthetic problems, saved in each family's tokenizer layout
    (Qwen2.5-Math base, Llama-3, DeepSeek-R1-Distill): layout name -> folder. Seconds to build."""
    from qup_ray.cpu_world.synthetic import sample_problems
    from qup_ray.cpu_world.tokenizer import (
        COT_INSTRUCTION,
        LAYOUTS,
        as_layout,
        save_tokenizer,
        train_tokenizer,
    )

    problems = sample_problems(300, seed=0)
    texts = [COT_INSTRUCTION, *(t for p in problems for t in (p.problem, p.native, p.compact))]
    bpe = train_tokenizer(texts, 512)
    out = {}
    for name, layout in LAYOUTS.items():
        path = Path(tmp_path_factory.mktemp(name))
        save_tokenizer(as_layout(bpe, layout), path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="session")
def unbroken_train_cell(tmp_path_factory: pytest.TempPathFactory, cpu_world) -> tuple[dict, list]:
    """The one-cell training run of `train_cell`, unbroken: (exported weights, metrics rows), the
    reference of the kill-and-resume tests of test_train_stage and test_faults (one run for both)."""
    from train_cell import NUM_STEPS, cell_dir, one_cell_config, start, weights

    from qup_ray.rundir import read_parquet

    config = one_cell_config(tmp_path_factory.mktemp("unbroken-train"), "run")
    proc = start(config)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    metrics = read_parquet(cell_dir(config) / "metrics.parquet").to_pylist()
    assert len(metrics) == NUM_STEPS
    return weights(cell_dir(config)), metrics
