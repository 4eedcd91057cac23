"""The README is a user's guide: every repository path it names exists, and every `qup` command
and `make` target it shows is one the project has."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from qup_ray.config import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
TOP_DIRS = ("configs/", "slurm/", "qup_ray/", "tests/", "docs/", ".ci/")


def _named_paths() -> list[str]:
    """Repository paths in backticks or links: no placeholders (<...>), globs or run-dir paths."""
    found = set(re.findall(r"`([^`\s]+)`", README)) | set(re.findall(r"\]\(([^)\s]+)\)", README))
    paths = set()
    for item in found:
        item = item.split(":", 1)[0] if item.startswith("qup_ray/") else item
        if not item.startswith(TOP_DIRS) or any(c in item for c in "<>*{}$"):
            continue
        paths.add(item.rstrip(".,;"))
    return sorted(paths)


def _qup_commands() -> list[str]:
    return sorted(set(re.findall(r"^\s*(?:HF_HUB_OFFLINE=1 )?qup (?:-v )?([a-z-]+)", README, re.M)))


def test_the_readme_names_paths_and_commands():
    assert len(_named_paths()) >= 15 and "configs/clusters/local.yaml" in _named_paths()
    assert {"dryrun", "run", "grid", "status", "validate", "report", "bench"} <= set(
        _qup_commands()
    )


@pytest.mark.parametrize("path", _named_paths())
def test_every_named_path_exists(path: str):
    assert (REPO_ROOT / path).exists(), f"README names {path}, which is not in the repository"


@pytest.mark.parametrize("command", _qup_commands())
def test_every_qup_command_exists(command: str):
    result = subprocess.run(
        [sys.executable, "-m", "qup_ray.cli", command, "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_two_make_targets_exist():
    makefile = (REPO_ROOT / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", README, re.M):
        assert re.search(rf"^{target}:", makefile, re.M), target
