"""The `qup` command line: subcommands, exit codes, no tracebacks for user mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qup_ray.rundir import MANIFEST
from qup_ray.stages import STAGE_ORDER, is_built

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


@pytest.mark.slow
def test_dryrun_runs_every_built_stage_and_names_the_rest(tmp_path: Path):
    result = qup("dryrun", "--out", str(tmp_path), timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    built = [s for s in STAGE_ORDER if is_built(s)]
    missing = [s for s in STAGE_ORDER if not is_built(s)]
    if missing:
        assert f"not built yet in this version: {', '.join(missing)}" in result.stdout
    run_dir = tmp_path / "dryrun"
    assert (run_dir / "config.yaml").is_file()
    if "problems" in built:
        assert (run_dir / "problems" / MANIFEST).is_file()
