"""The `vllm` oracle backend: an open model as batch vLLM actors, through the same cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from qup_ray.config import CONFIGS_DIR, load_config
from qup_ray.oracle.batch_engine import run_engine_requests
from qup_ray.oracle.client import OracleRequest
from qup_ray.oracle.prompts import synthesize_messages

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_batch_engine_oracle_answers_every_request_and_caches(tmp_path: Path, cpu_world):
    # The tiny student stands in for an open-weights oracle such as Qwen2.5-72B-Instruct.
    cfg = load_config(
        CONFIGS_DIR / "dryrun.yaml",
        [f"output_dir={tmp_path}",
         "oracles.open={backend: vllm, model: 'cpu-world:tiny-qwen2', max_tokens: 64, temperature: 0.0, "
         "engine: {dtype: float32, max_model_len: 1024, kv_cache_memory_bytes: 268435456, "
         "enforce_eager: true, max_num_batched_tokens: 16384, batch_size: 4}}"],
    )  # fmt: skip
    from qup_ray.cpu_world import generate_problems

    problems = generate_problems(6, seed=11)
    requests = [
        OracleRequest(f"p{i}:synthesize", synthesize_messages(p["problem"]))
        for i, p in enumerate(problems)
    ]
    requests.append(requests[0])  # a duplicate: the same reply, one generation
    # One prompt longer than the engine's 1024 tokens: a failed row with its reason, never a
    # crash of the whole batch (a style-align prompt with exemplars can do this to a 72B oracle).
    requests.insert(3, OracleRequest("long:synthesize", synthesize_messages("1 + " * 1200 + "1")))
    first = run_engine_requests(cfg.oracles["open"], requests, tmp_path / "cache", cfg)
    assert [r.key for r in first] == [r.key for r in requests]
    long = first[3]
    assert long.status == "failed" and long.content is None and "limit of 1024 tokens" in long.error
    others = first[:3] + first[4:]
    assert all(r.status in ("done", "failed") for r in others)
    assert all(r.content for r in others if r.status == "done") and any(
        r.status == "done" for r in others
    )
    assert not any(r.cached for r in first[:-1])
    again = run_engine_requests(cfg.oracles["open"], requests, tmp_path / "cache", cfg)
    done = [i for i, r in enumerate(first) if r.status == "done"]
    assert all(again[i].cached and again[i].content == first[i].content for i in done)
