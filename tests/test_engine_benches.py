"""`qup bench rollouts|ppl --quick --json` through the CLI: stdout is one JSON object (logs go to
stderr), both sides did the same work, and the PPL pipeline agrees with transformers float32.
Throughput itself is not asserted: it is measured by the benchmark, on a quiet machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def bench(name: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "qup_ray.cli", "bench", name, "--quick", "--json"],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout[-3000:]
    return json.loads(lines[0])


def test_rollouts_bench_pipeline_generates_what_the_bare_engine_generates(cpu_world):
    r = bench("rollouts")
    assert r["bench"] == "rollouts" and r["rounds"] == 1
    # Same prompts, same seeds: the streamed pipeline produced the very same tokens.
    assert r["pipeline_tokens"] == r["baseline_tokens"] > r["num_prompts"]
    assert r["ratio"] == r["round_ratios"][0] > 0
    assert abs(r["ratio"] - r["pipeline_per_s"] / r["baseline_per_s"]) < 0.002


def test_ppl_bench_agrees_with_transformers(cpu_world):
    r = bench("ppl")
    assert r["bench"] == "ppl" and r["num_traces"] == 64
    assert r["nll_checked_traces"] == 32
    assert 0 <= r["max_abs_nll_diff"] < 1e-4
    assert r["ratio"] > 0
