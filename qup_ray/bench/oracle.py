"""Benchmark of the oracle client: `qup bench oracle`.

Sends synthesis requests for distinct synthetic problems through `OracleClient` (response cache
on, progress bar off) to the rule oracle, which holds every reply back by a fixed latency, the
stand-in for a remote API's round trip:

- pipeline: requests per second of `complete_many` at `max_concurrency` workers, from a cold
  cache (everything is sent);
- baseline: the ideal for that endpoint, `concurrency / latency_s` (every slot busy all the
  time, zero client overhead). `ratio` is how close the client comes to it.
- rerun: the same requests again with the same cache; `rerun_requests` is the number of HTTP
  requests the server received for it (it must be 0).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time

from qup_ray.config import OracleConfig
from qup_ray.cpu_world import FaultConfig, generate_problems, start_rule_oracle
from qup_ray.oracle.cache import ResponseCache
from qup_ray.oracle.client import OracleClient, OracleRequest
from qup_ray.oracle.prompts import synthesize_messages

logger = logging.getLogger(__name__)

CONCURRENCY = 32
LATENCY_S = 0.2


def make_requests(num_requests: int, seed: int = 0) -> list[OracleRequest]:
    """`num_requests` synthesis requests for distinct synthetic problems."""
    problems = generate_problems(num_requests, seed=seed)
    return [
        OracleRequest(f"bench-{i}:synthesize", synthesize_messages(p["problem"]))
        for i, p in enumerate(problems)
    ]


def run(*, quick: bool = False) -> dict:
    """Throughput of the oracle client against the ideal, and the HTTP requests of a rerun."""
    # Multiples of the concurrency, so that the last wave of requests is full.
    requests = make_requests(4 * CONCURRENCY if quick else 20 * CONCURRENCY)
    cfg = OracleConfig(
        backend="rule",
        model="rule-oracle",
        max_concurrency=CONCURRENCY,
        timeout_s=30.0,
        max_retries=2,
        temperature=0.0,
        max_tokens=1024,
    )
    with (
        tempfile.TemporaryDirectory(prefix="qup-bench-oracle-") as cache_dir,
        start_rule_oracle(faults=FaultConfig(latency_s=LATENCY_S)) as server,
        ResponseCache(cache_dir) as cache,
    ):
        client = OracleClient(cfg, cache, base_url=server.base_url)
        started = time.perf_counter()
        results = asyncio.run(client.complete_many(requests, progress=False))
        elapsed_s = time.perf_counter() - started

        sent_before_rerun = server.num_requests
        rerun = asyncio.run(client.complete_many(requests, progress=False))
        rerun_requests = server.num_requests - sent_before_rerun

    num_done = sum(r.status == "done" for r in results)
    pipeline_per_s = len(requests) / elapsed_s
    baseline_per_s = CONCURRENCY / LATENCY_S
    return {
        "bench": "oracle",
        "pipeline_per_s": round(pipeline_per_s, 1),
        "baseline_per_s": round(baseline_per_s, 1),
        "ratio": round(pipeline_per_s / baseline_per_s, 3),
        "rerun_requests": rerun_requests,
        "rerun_cached": sum(r.cached for r in rerun),
        "concurrency": CONCURRENCY,
        "latency_s": LATENCY_S,
        "num_requests": len(requests),
        "num_done": num_done,
        "first_run_http_requests": sent_before_rerun,
    }
