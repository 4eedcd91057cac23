"""The score stage with one trace longer than its engines' limit among normal ones: the stage
finishes, the long trace is a rejected row (with reason and lengths) for each engine that could
not take it, and every other trace is scored."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from qup_ray.config import CONFIGS_DIR, load_config
from qup_ray.rundir import RunDir, Stage, read_json

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _one_student_config(tmp_path: Path):
    data = yaml.safe_load((CONFIGS_DIR / "dryrun.yaml").read_text())
    data["output_dir"] = str(tmp_path)
    del data["students"]["tiny-llama"]
    data["streams"] = {"enabled": ["slm_rft"]}
    data["reward_models"] = {"tiny-qwen-rm": data["reward_models"]["tiny-qwen-rm"]}
    data["scoring"]["reward_models"] = ["tiny-qwen-rm"]
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_overlong_trace_is_rejected_and_the_stage_finishes(tmp_path: Path, cpu_world):
    from qup_ray.cpu_world import generate_problems
    from qup_ray.stages import score

    cfg = _one_student_config(tmp_path)
    run = RunDir.for_config(cfg)
    problems = generate_problems(4, seed=3, solution_style="native")
    rows = [
        {"problem_id": f"p{i}", "problem": p["problem"], "answer": p["answer"],
         "trace": p["solution"], "student": "tiny-qwen", "stream": "slm_rft", "sample_idx": 0,
         "num_tokens": 0, "retention": None}
        for i, p in enumerate(problems)
    ]  # fmt: skip
    rows[2]["trace"] = "We add one more step. " * 400  # far over the engines' 1024 tokens
    final = Stage(run.root / "streams" / "tiny-qwen" / "final", "test")
    with final.running():
        pq.write_table(pa.Table.from_pylist(rows), final.dir / "slm_rft.parquet")
        final.finish(row_counts={"slm_rft": len(rows)})

    score.run(cfg)

    folder = run.root / "scores" / "tiny-qwen" / "slm_rft"
    ppl = pq.read_table(folder / "ppl.parquet").to_pylist()
    reward = pq.read_table(folder / "reward-tiny-qwen-rm.parquet").to_pylist()
    rejected = pq.read_table(folder / "rejected.parquet").to_pylist()
    assert sorted(r["problem_id"] for r in ppl) == ["p0", "p1", "p3"]
    assert sorted(r["problem_id"] for r in reward) == ["p0", "p1", "p3"]
    assert sorted(r["table"] for r in rejected) == ["ppl", "reward-tiny-qwen-rm"]
    for r in rejected:
        assert r["problem_id"] == "p2" and r["reason"] == "sequence_over_context"
        assert r["limit"] == 1024 and r["num_tokens"] > r["limit"]
    counts = read_json(folder / "_manifest.json")["row_counts"]
    assert counts["ppl"] == 3 and counts["rejected"] == 2
