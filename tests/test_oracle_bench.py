"""`qup bench oracle`: the benchmark runs, reports its fields, and its rerun sends nothing."""

from __future__ import annotations

from qup_ray.bench import BENCHES
from qup_ray.bench.oracle import run


def test_oracle_bench_quick():
    assert BENCHES["oracle"] == "qup_ray.bench.oracle"
    result = run(quick=True)
    assert result["bench"] == "oracle"
    assert result["num_done"] == result["num_requests"] == result["first_run_http_requests"]
    assert result["rerun_requests"] == 0 and result["rerun_cached"] == result["num_requests"]
    assert result["baseline_per_s"] == result["concurrency"] / result["latency_s"]
    # Throughput depends on the machine; it must at least beat one request at a time.
    assert result["pipeline_per_s"] > 1 / result["latency_s"]
    assert abs(result["ratio"] - result["pipeline_per_s"] / result["baseline_per_s"]) < 0.002
