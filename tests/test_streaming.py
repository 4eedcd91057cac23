"""The data stages stream their tables (issue 21) and still write what the whole-table code wrote.

`tests/data/streaming/` holds a small run of the scale benchmark's config: its `inputs/`
(problems and the anchor student's rollouts, from real vLLM generation on the CPU world) and
`expected/`, the problem set, SLM-RFT and every stream of the rule oracle as the code before
the streaming rewrite wrote them from those inputs. The test rebuilds them with the current
code and compares every table row by row, and the manifests' counts.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from qup_ray.bench.scale import scale_config
from qup_ray.rundir import MANIFEST, RunDir, read_json
from qup_ray.stages import rollouts, streams

FROZEN = Path(__file__).parent / "data" / "streaming"
COUNT_KEYS = ("row_counts", "counts", "filters", "missing_by_stream", "statuses", "reasons",
              "no_solution", "pass_histograms", "cost_usd", "retention_judged")  # fmt: skip


def tables(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.parquet"))


def test_streamed_stages_write_the_whole_table_codes_tables_row_by_row(tmp_path: Path):
    cfg = scale_config(str(tmp_path), 300)
    root = cfg.run_dir
    shutil.copytree(FROZEN / "inputs", root)
    run = RunDir(root)
    student = cfg.anchor_student
    rollouts.run_problem_set(cfg, run, root / "problems" / "problems.parquet", force=False)
    rollouts.run_slm_rft(cfg, run, student, force=False)
    streams.run(cfg)

    expected_root = FROZEN / "expected"
    expected = tables(expected_root)
    written = [p for p in tables(root) if not str(p).startswith(("problems", "rollouts"))]
    assert [p for p in written if "oracle_cache" not in str(p)] == expected
    for rel in expected:
        want = pq.read_table(expected_root / rel).to_pylist()
        got = pq.read_table(root / rel).to_pylist()
        assert len(got) == len(want), rel
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"{rel} row {i}"
    assert sum(1 for _ in expected_root.rglob(MANIFEST)) == 7  # problem set, 5 streams, final
    for manifest in expected_root.rglob(MANIFEST):
        want = read_json(manifest)
        got = read_json(root / manifest.relative_to(expected_root))
        for key in COUNT_KEYS:
            assert got.get(key) == want.get(key), f"{manifest.parent.name}: {key}"


def test_streamed_problems_stage_writes_the_whole_table_codes_tables(tmp_path: Path):
    """The problems stage (source streamed once, only ids held) writes the rows, rejections
    and counts the whole-table code wrote from the same source and seed."""
    from qup_ray.stages import problems

    cfg = scale_config(str(tmp_path), 300)
    out = problems.run(cfg)
    for name in ("problems", "rejected"):
        want = pq.read_table(FROZEN / "inputs" / "problems" / f"{name}.parquet")
        got = pq.read_table(out / f"{name}.parquet")
        assert got.schema == want.schema
        assert got.to_pylist() == want.to_pylist(), name
    want = read_json(FROZEN / "inputs" / "problems" / MANIFEST)
    got = read_json(out / MANIFEST)
    assert (got["row_counts"], got["counts"]) == (want["row_counts"], want["counts"])
    assert got["counts"]["contaminated"] + got["counts"]["duplicates"] > 0  # both paths ran


def test_rollout_tally_counts_what_the_rows_say():
    """The rollouts manifest's counts, read batch by batch from the bookkeeping columns, equal
    the same counts taken over the rows in Python."""
    cfg = scale_config("unused", 300)
    path = FROZEN / "inputs" / "rollouts" / cfg.anchor_student / "rollouts.parquet"
    rows = pq.read_table(path).to_pylist()
    tally = rollouts.rollout_tally(path)
    assert tally["rows"] == len(rows) > 0
    assert tally["statuses"] == dict(Counter(r["status"] for r in rows))
    assert tally["num_correct"] == sum(1 for r in rows if r["correct"]) > 0
    assert tally["num_truncated"] == sum(1 for r in rows if r["finish_reason"] == "length")
    assert tally["generated_tokens"] == sum(r["num_tokens"] for r in rows)
    assert tally["correct_by_problem"] == Counter(r["problem_id"] for r in rows if r["correct"])
    # ... and the counts the whole-table code wrote in this run's manifest.
    old = read_json(path.parent / MANIFEST)
    assert (tally["rows"], tally["statuses"], tally["num_correct"]) == (
        old["row_counts"]["rollouts"], old["statuses"], old["num_correct"])  # fmt: skip
    problem_ids = pq.read_table(FROZEN / "inputs" / "problems" / "problems.parquet")
    histogram = rollouts.pass_histogram(
        tally["correct_by_problem"], problem_ids.column("problem_id").to_pylist(),
        cfg.rollouts.num_samples_per_problem,
    )  # fmt: skip
    assert histogram == old["pass_histogram"]


def test_scale_bench_reports_the_drivers_growth_per_problem():
    """The figures of `qup bench scale` from two sizes' results (values of a real run's shape)."""
    from qup_ray.bench.scale import summarize

    def size(n: int, peak: float, wall: float) -> dict:
        return {"num_problems": n, "peak_rss_mb": peak, "rss_mb_at_start": 200.0,
                "peak_rss_mb_after": {"problems": 210.0}, "wall_s": {"problems": wall},
                "rows": {"problems": n, "generated_tokens": 10 * n},
                "bytes": {"rollouts": 30 * n}}  # fmt: skip

    out = summarize(size(300, 1000.0, 2.0), size(3000, 1100.0, 10.0))
    assert out["ratio"] == 1.1
    assert out["rss_growth_kb_per_problem"] == round(100 * 1024 / 2700, 2)
    assert out["wall_growth"] == {"problems": 5.0}
    assert out["rollouts_disk_bytes_per_token_10x"] == 3.0


def test_anon_peak_sees_a_transient_allocation():
    """The bench's sampled heap peak catches memory held for a moment and then freed."""
    import time

    from qup_ray.bench.scale import AnonPeak, rss_parts_mb

    before = rss_parts_mb()["anon"]
    with AnonPeak(interval_s=0.01) as peak:
        block = bytearray(64 << 20)  # 64 MiB, touched
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(0.2)
        del block
    assert peak.peak_mb >= before + 60
