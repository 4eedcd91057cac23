"""The `qup` command line: subcommands, exit codes, no tracebacks for user mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SUBCOMMANDS = ("dryrun", "run", "grid", "status", "validate", "grade", "bench")


def qup(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qup_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_subcommand():
    result = qup("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


def test_unknown_stage_is_a_user_error():
    result = qup("run", "nonsense", "-c", "configs/dryrun.yaml")
    assert result.returncode == 2 and "unknown stage" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_benchmark_says_so():
    result = qup("bench", "no-such-bench")
    assert result.returncode == 3 and "not built yet" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_of_a_folder_that_is_not_a_run_dir(tmp_path: Path):
    result = qup("status", str(tmp_path))
    assert result.returncode == 2 and "not a run directory" in result.stderr


def test_grade_missing_input_is_a_user_error(tmp_path: Path):
    result = qup("grade", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and "input file not found" in result.stderr
