"""Loaders in each benchmark's own layout (with bad rows) and the problems stage."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qup_ray.config import CONFIGS_DIR, DatasetSource, load_config
from qup_ray.data import DataSourceError, load_problems, problem_id
from qup_ray.stages import problems as problems_stage


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def paper_fields(benchmark: str) -> dict[str, str]:
    cfg = load_config(CONFIGS_DIR / "paper.yaml")
    return cfg.evaluation.benchmarks[benchmark].source.fields


NUMINA_ROWS = [
    {"source": "olympiads", "problem": "Compute 1+1.",
     "solution": "We add: $1+1=2$. So \\boxed{2}.",
     "messages": [{"role": "user", "content": "Compute 1+1."}]},
    {"source": "cn_k12", "problem": "Halve one.",
     "solution": "First \\boxed{1} is wrong; half is \\boxed{\\frac{1}{2}}",
     "messages": [{"role": "user", "content": "Halve one."}]},
    {"source": "amc_aime", "problem": "No boxed here.", "solution": "The answer is 3.",
     "messages": []},
    {"source": "synthetic_math", "problem": "  ", "solution": "\\boxed{4}", "messages": []},
]  # fmt: skip


def test_numinamath_layout_gold_is_last_boxed(tmp_path: Path):
    path = tmp_path / "numina.parquet"
    pq.write_table(pa.Table.from_pylist(NUMINA_ROWS), path)
    rows, rejected = load_problems(DatasetSource(kind="local", path=str(path)))
    assert [(r["problem"], r["answer"], r["source"]) for r in rows] == [
        ("Compute 1+1.", "2", "olympiads"),
        ("Halve one.", "\\frac{1}{2}", "cn_k12"),
    ]
    assert rows[0]["problem_id"] == problem_id("compute   1+1.")
    assert sorted((r["row_index"], r["reason"]) for r in rejected) == [
        (2, "no \\boxed{} answer in the solution"),
        (3, "no problem text in field 'problem'"),
    ]


def test_math500_jsonl_and_hub_path(tmp_path: Path):
    rows = [
        {"problem": "What is $2^3$?", "solution": "\\boxed{8}", "answer": "8",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "Empty answer", "solution": "", "answer": "", "subject": "x", "level": 2,
         "unique_id": "u2"},
    ]  # fmt: skip
    folder = tmp_path / "MATH-500"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", rows)
    fields = paper_fields("math500")
    local, rej = load_problems(
        DatasetSource(kind="local", path=str(folder), fields=fields), "math500"
    )
    assert [(r["answer"], r["benchmark"]) for r in local] == [("8", "math500")]
    assert rej[0]["reason"] == "no gold answer in field 'answer'"
    # The hub code path (datasets.load_dataset(id, config, split)) on a local mirror folder.
    hub, _ = load_problems(
        DatasetSource(kind="hub", dataset=str(folder), split="test", fields=fields), "math500"
    )
    assert hub == local


def test_aime_amc_minerva_layouts(tmp_path: Path):
    aime = tmp_path / "aime.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": 60, "problem": "AIME q", "answer": "204"}]), aime)
    amc = write_jsonl(tmp_path / "amc.jsonl", [{"question": "AMC q", "answer": 27.0, "id": 0},
                                              {"question": "AMC q2", "answer": 0.5, "id": 1}])  # fmt: skip
    minerva = write_jsonl(
        tmp_path / "minerva.jsonl",
        [{"question": "Minerva q", "answer": "3.5 \\times 10^{4}"}, {"answer": "no question"}],
    )
    got = {}
    for name, path in [("aime24", aime), ("amc23", amc), ("minerva_math", minerva)]:
        src = DatasetSource(kind="local", path=str(path), fields=paper_fields(name))
        got[name] = load_problems(src, name)
    assert [r["answer"] for r in got["aime24"][0]] == ["204"]
    assert [r["answer"] for r in got["amc23"][0]] == ["27", "0.5"]
    assert [r["answer"] for r in got["minerva_math"][0]] == ["3.5 \\times 10^{4}"]
    assert got["minerva_math"][1][0]["reason"] == "no problem text in field 'question'"


def test_olympiadbench_save_to_disk_list_answers(tmp_path: Path):
    ds = datasets.Dataset.from_list(
        [
            {"id": 1, "question": "Find x.", "final_answer": ["$3$"]},
            {"id": 2, "question": "Find all pairs.", "final_answer": ["$(1,2)$", "$(2,1)$"]},
            {"id": 3, "question": "Broken.", "final_answer": []},
        ]
    )
    ds.save_to_disk(str(tmp_path / "olympiad"))
    src = DatasetSource(
        kind="local", path=str(tmp_path / "olympiad"), fields=paper_fields("olympiadbench")
    )
    rows, rejected = load_problems(src, "olympiadbench")
    assert [r["answer"] for r in rows] == ["3", "(1,2), (2,1)"]
    assert [r["reason"] for r in rejected] == ["no gold answer in field 'final_answer'"]


def test_missing_local_source_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DataSourceError, match="no such file"):
        load_problems(DatasetSource(kind="local", path=str(tmp_path / "nope.parquet")))


def test_synthetic_source_goes_through_the_same_path():
    rows, rejected = load_problems(DatasetSource(kind="synthetic", num_synthetic=30, seed=3))
    assert len(rows) == 30 and rejected == []
    assert all(r["answer"] and r["problem_id"] == problem_id(r["problem"]) for r in rows)


def test_problems_stage_counts_dedup_decontaminate_and_sample(tmp_path: Path):
    pool = load_problems(DatasetSource(kind="synthetic", num_synthetic=60, seed=0))[0]
    numina = [
        {"source": "synthetic", "problem": r["problem"], "solution": f"so \\boxed{{{r['answer']}}}"}
        for r in pool
    ]
    numina += [dict(numina[0]), dict(numina[1], problem=numina[1]["problem"].upper())]  # 2 dups
    numina.append({"source": "x", "problem": "no answer", "solution": "none"})  # malformed
    train = tmp_path / "train.jsonl"
    write_jsonl(train, numina)
    bench = write_jsonl(
        tmp_path / "bench.jsonl",
        [{"question": r["problem"], "answer": r["answer"]} for r in pool[:5]],
    )
    cfg = load_config(
        CONFIGS_DIR / "dryrun.yaml",
        [f"output_dir={tmp_path}", "problems.source.kind=local", f"problems.source.path={train}",
         "problems.num_problems=40", "problems.seed=7", "evaluation.benchmarks={}",
         f"evaluation.benchmarks.b.source={{kind: local, path: '{bench}', fields: {{problem: question}}}}"],
    )  # fmt: skip
    out = problems_stage.run(cfg)
    manifest = json.loads((out / "_manifest.json").read_text())
    counts = manifest["counts"]
    assert counts == {"loaded": 63, "rejected_malformed": 1, "duplicates": 2, "contaminated": 5,
                      "not_sampled": 15, "sampled": 40}  # fmt: skip
    assert sum(v for k, v in counts.items() if k != "loaded") == counts["loaded"]
    sampled = pq.read_table(out / "problems.parquet").to_pylist()
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    assert len(rejected) == 1 + 2 + 5
    contaminated = {r["problem_id"] for r in pool[:5]}
    assert not contaminated & {r["problem_id"] for r in sampled}
    assert len({r["problem_id"] for r in sampled}) == 40
    # A seeded random sample, not the first N, and the same on a rerun with --force.
    first_40 = {r["problem_id"] for r in pool[5:45]}
    assert {r["problem_id"] for r in sampled} != first_40
    mtime = (out / "_manifest.json").stat().st_mtime_ns
    problems_stage.run(cfg)
    assert (out / "_manifest.json").stat().st_mtime_ns == mtime  # skipped
    problems_stage.run(cfg, force=True)
    assert pq.read_table(out / "problems.parquet").to_pylist() == sampled
