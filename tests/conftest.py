"""Shared test set-up: nothing reaches the network, expensive things are built once per session."""

from __future__ import annotations

import importlib.util
import os

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
