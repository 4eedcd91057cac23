"""One small training cell (tiny-qwen, slm_rft, DFT) run as `qup run train` in a process of its
own: the run the kill-and-resume tests (test_train_stage, test_faults) interrupt and compare with
the unbroken run of the session fixture `unbroken_train_cell` (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from qup_ray.bench.train import write_synthetic_streams
from qup_ray.config import CONFIGS_DIR, load_config

# Two epochs of 48 problems in batches of 8: a kill after the checkpoint of step 2 lands inside
# the first epoch and the resumed run crosses into the second.
NUM_PROBLEMS, NUM_STEPS = 48, 12


def one_cell_config(tmp: Path, name: str) -> Path:
    """A config with one cell and enough steps to kill one midway, its stream written."""
    data = yaml.safe_load((CONFIGS_DIR / "dryrun.yaml").read_text())
    data["students"].pop("tiny-llama")
    data["output_dir"] = str(tmp / name)
    data["training"].update(
        objectives=["dft"], streams=["slm_rft"], global_batch_size=8, num_epochs=2,
        checkpoint_every_steps=1,
    )  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    write_synthetic_streams(load_config(path).run_dir, ["tiny-qwen"], {"slm_rft": "native"},
                            num_problems=NUM_PROBLEMS, seed=7)  # fmt: skip
    return path


def start(config: Path) -> subprocess.Popen:
    """`qup run train` in a new session (so a test can kill its whole process group)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "qup_ray.cli", "run", "train", "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip


def cell_dir(config: Path) -> Path:
    return load_config(config).run_dir / "train" / "tiny-qwen" / "slm_rft" / "dft"


def weights_of(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def weights(cell: Path) -> dict:
    return weights_of(cell / "model" / "model.safetensors")
