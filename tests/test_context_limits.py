"""Context limits: a `max_model_len` above the checkpoint's context is one clear config error;
generations are fitted into the context; over-long prompts become rejected rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Qwen2Config

from qup_ray.config import CONFIGS_DIR, ConfigError, load_config
from qup_ray.encoding import count_bos, fit_generation
from qup_ray.models import checkpoint_context_len


@pytest.fixture
def checkpoint_512(tmp_path: Path) -> Path:
    """A (weightless) checkpoint folder whose config allows 512 positions."""
    folder = tmp_path / "ckpt"
    Qwen2Config(max_position_embeddings=512, hidden_size=64, num_attention_heads=2).save_pretrained(
        folder
    )
    return folder


def test_checkpoint_context_is_read_from_its_config(checkpoint_512: Path):
    assert checkpoint_context_len(checkpoint_512) == 512
    assert checkpoint_context_len(checkpoint_512.parent / "nowhere") is None


def test_max_model_len_above_the_checkpoint_is_one_clear_error(checkpoint_512: Path):
    overrides = [
        f"students.tiny-qwen.path={checkpoint_512}",
        "students.tiny-qwen.engine.max_model_len=1024",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS_DIR / "dryrun.yaml", overrides)
    assert err.value.problems == [
        "students.tiny-qwen.engine.max_model_len: above the checkpoint's context of 512 tokens "
        f"(max_position_embeddings in {checkpoint_512}/config.json); lower it or set "
        "allow_long_context: true (got 1024)"
    ]
    # Allowed explicitly, or within the context: fine.
    load_config(
        CONFIGS_DIR / "dryrun.yaml",
        [*overrides, "students.tiny-qwen.engine.allow_long_context=true"],
    )
    load_config(
        CONFIGS_DIR / "dryrun.yaml", [overrides[0], "students.tiny-qwen.engine.max_model_len=512"]
    )


def test_validate_command_exits_2_without_traceback(checkpoint_512: Path):
    result = subprocess.run(
        [sys.executable, "-m", "qup_ray.cli", "validate", "-c", str(CONFIGS_DIR / "dryrun.yaml"),
         f"students.tiny-llama.path={checkpoint_512}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    out = result.stdout + result.stderr
    assert "students.tiny-llama.engine.max_model_len: above the checkpoint's context of 512" in out
    assert "Traceback" not in out


def test_paper_config_still_validates():
    load_config(CONFIGS_DIR / "paper.yaml")


@pytest.mark.parametrize(
    ("prompt_len", "max_new", "limit", "expected"),
    [(100, 50, 1024, 50), (1000, 50, 1024, 24), (1023, 50, 1024, 1), (1024, 50, 1024, None),
     (2000, 50, 1024, None)],
)  # fmt: skip
def test_fit_generation(prompt_len: int, max_new: int, limit: int, expected: int | None):
    assert fit_generation(prompt_len, max_new, limit) == expected


def test_count_bos():
    assert count_bos([1, 1, 5], 1) == 2
    assert count_bos([1, 5, 1], 1) == 1
    assert count_bos([5, 1], 1) == 0
    assert count_bos([1, 5], None) == 0
