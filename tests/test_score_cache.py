"""The score cache (`qup_ray.scoring`): scoring the same traces twice sends the engine nothing
the second time, a trace repeated within one call is scored once, and cached results equal an
independent float32 transformers forward pass over the same token ids. (Reward caching is
checked on the dry run's cache in test_pipeline.py.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from qup_ray.config import CONFIGS_DIR, load_config

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _config(tmp_path: Path):
    data = yaml.safe_load((CONFIGS_DIR / "dryrun.yaml").read_text())
    data["output_dir"] = str(tmp_path)
    del data["students"]["tiny-llama"]
    data["streams"] = {"enabled": ["slm_rft"]}
    data["reward_models"], data["scoring"]["reward_models"] = {}, []
    # Batches of 2: several shards, so "nothing new" is seen shard by shard.
    data["students"]["tiny-qwen"]["engine"]["batch_size"] = 2
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def _shard_rows(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("shard-*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_traces_are_scored_once_and_equal_an_uncached_forward(tmp_path: Path, cpu_world):
    import torch
    from transformers import AutoModelForCausalLM

    from qup_ray.cpu_world import generate_problems
    from qup_ray.encoding import ChatFormat
    from qup_ray.ray_session import init_ray
    from qup_ray.scoring import cache_size, score_ppl

    cfg = _config(tmp_path)
    init_ray(cfg.ray)
    problems = generate_problems(5, seed=11, solution_style="native")
    traces = [{"key": f"k{i}", "problem_id": f"p{i}", "problem": p["problem"], "trace": p["solution"]}
              for i, p in enumerate(problems)]  # fmt: skip
    # The same trace under two more keys (as when one trace is in several streams).
    traces += [dict(traces[0], key="dup-a"), dict(traces[3], key="dup-b", problem_id="other")]
    folder = cfg.run_dir / "score_cache" / "ppl-tiny-qwen"

    first = score_ppl(cfg, "tiny-qwen", traces, [])
    assert [r["key"] for r in first] == [t["key"] for t in traces]  # input order, every key
    assert cache_size(cfg, "ppl", "tiny-qwen") == 5  # 7 traces, 5 distinct inputs
    shards = sorted(folder.glob("shard-*.parquet"))
    assert len(shards) >= 2
    assert len({r["cache_key"] for r in _shard_rows(folder)}) == 5
    by_key = {r["key"]: r for r in first}
    assert by_key["dup-a"] | {"key": "k0"} == by_key["k0"]
    assert by_key["dup-b"] | {"key": "k3"} == by_key["k3"]

    again = score_ppl(cfg, "tiny-qwen", list(reversed(traces)), [])
    assert sorted(folder.glob("shard-*.parquet")) == shards  # nothing sent to the engine
    assert {r["key"]: r for r in again} == by_key

    # Uncached: a float32 transformers forward over the same ids (the one encoding).
    path = cpu_world["tiny-qwen2"]
    fmt = ChatFormat.for_model(path, cfg.students["tiny-qwen"].prompt)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for t in traces[:5]:
        ids, start = fmt.example(t["problem"], t["trace"])
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")[start - 1 :]
        assert by_key[t["key"]]["num_tokens"] == len(ids) - start
        assert abs(by_key[t["key"]]["mean_nll"] - nll.mean().item()) < 1e-4
