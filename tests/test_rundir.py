"""The run directory: atomic tables, manifests written last, skip/force, shard resume, status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qup_ray.config import CONFIGS_DIR, load_config
from qup_ray.rundir import (
    MANIFEST,
    RunDir,
    Stage,
    StageError,
    expected_stage_dirs,
    read_json,
    stage_state,
    write_parquet,
)


def visible_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_write_parquet_roundtrip_from_rows_table_and_batches(tmp_path: Path):
    rows = [{"problem_id": f"p{i}", "x": i} for i in range(5)]
    a = write_parquet(tmp_path / "a.parquet", rows)
    b = write_parquet(tmp_path / "b.parquet", pa.Table.from_pylist(rows))
    c = write_parquet(tmp_path / "c.parquet", iter(pa.Table.from_pylist(rows).to_batches(2)))
    for path in (a, b, c):
        assert pq.read_table(path).to_pylist() == rows
    assert visible_files(tmp_path) == ["a.parquet", "b.parquet", "c.parquet"]
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_that_raises_midway_leaves_nothing(tmp_path: Path):
    def batches():
        for i in range(3):
            yield pa.RecordBatch.from_pylist([{"x": i}])
        raise RuntimeError("generator died")

    target = tmp_path / "t.parquet"
    with pytest.raises(RuntimeError):
        write_parquet(target, batches())
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_visible_partial_table(tmp_path: Path):
    """SIGKILL a process in the middle of streaming a large table: the target never appears."""
    script = textwrap.dedent(f"""
        import pyarrow as pa, sys
        from qup_ray.rundir import write_parquet
        def batches():
            for i in range(10**6):
                if i == 3:
                    print("writing", flush=True)
                yield pa.RecordBatch.from_pylist([{{"x": j, "text": "y" * 200}} for j in range(2000)])
        write_parquet({str(tmp_path / "big.parquet")!r}, batches())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert visible_files(tmp_path) == []
    assert any(p.name.startswith(".big.parquet.") for p in tmp_path.iterdir())  # only the temp


def toy_stage(run_dir: Path, config_hash: str, *, force: bool = False, inputs=(), calls=None):
    """A minimal stage in the shape every real stage has."""
    stage = Stage(run_dir / "toy", config_hash=config_hash, inputs=list(inputs), force=force)
    if stage.is_done():
        return stage.dir
    with stage.running():
        calls.append(1) if calls is not None else None
        stage.write_table("out", [{"v": config_hash}])
        stage.finish(row_counts={"out": 1})
    return stage.dir


def test_finished_stage_is_skipped_and_redone_with_force(tmp_path: Path):
    calls: list[int] = []
    out = toy_stage(tmp_path, "h1", calls=calls)
    manifest = read_json(out / MANIFEST)
    assert manifest["row_counts"] == {"out": 1} and manifest["config_hash"] == "h1"
    assert {"packages", "timings", "git_commit", "inputs"} <= set(manifest)
    assert manifest["packages"]["pyarrow"] == pa.__version__
    toy_stage(tmp_path, "h1", calls=calls)
    assert len(calls) == 1  # skipped
    toy_stage(tmp_path, "h1", calls=calls, force=True)
    assert len(calls) == 2  # redone
    toy_stage(tmp_path, "h2", calls=calls)
    assert len(calls) == 3  # config changed
    assert pq.read_table(out / "out.parquet").to_pylist() == [{"v": "h2"}]


def test_stage_redone_when_an_input_changes_and_refused_without_inputs(tmp_path: Path):
    upstream = Stage(tmp_path / "up", config_hash="a")
    with upstream.running():
        upstream.finish(row_counts={})
    calls: list[int] = []
    toy_stage(tmp_path, "h", inputs=[upstream.dir], calls=calls)
    toy_stage(tmp_path, "h", inputs=[upstream.dir], calls=calls)
    assert len(calls) == 1
    time.sleep(0.01)
    with upstream.running():  # upstream rerun with the same result: new manifest, same content
        upstream.finish(row_counts={"n": 2})
    toy_stage(tmp_path, "h", inputs=[upstream.dir], calls=calls)
    assert len(calls) == 1  # identity is content, not timings: finished work is kept
    with upstream.running():  # upstream rerun that produced something else
        upstream.write_table("t", [{"x": 1}])
        upstream.finish(row_counts={"t": 1})
    toy_stage(tmp_path, "h", inputs=[upstream.dir], calls=calls)
    assert len(calls) == 2
    with pytest.raises(StageError, match="run these stages first"):
        toy_stage(tmp_path, "h", inputs=[tmp_path / "never_ran"], calls=calls, force=True)


class Crash(Exception):
    pass


def sharded_stage(run_dir: Path, num_items: int, shard_size: int, *, crash_at=None, log=None):
    """A long stage that squares numbers shard by shard and may crash midway."""
    stage = Stage(run_dir / "sq", config_hash=f"n{num_items}-s{shard_size}")
    if stage.is_done():
        return stage.dir
    with stage.running():
        num_shards = -(-num_items // shard_size)
        done = stage.plan_shards(num_shards)
        for k in range(num_shards):
            if k in done:
                continue
            if k == crash_at:
                raise Crash(f"killed at shard {k}")
            items = range(k * shard_size, min((k + 1) * shard_size, num_items))
            stage.write_shard(k, [{"i": i, "sq": i * i} for i in items])
            log.append(k) if log is not None else None
        stage.write_table("squares", stage.read_shards())
        stage.finish(row_counts={"squares": num_items})
    return stage.dir


def test_interrupted_stage_resumes_from_its_shards(tmp_path: Path):
    log: list[int] = []
    with pytest.raises(Crash):
        sharded_stage(tmp_path / "a", 100, 10, crash_at=6, log=log)
    assert log == [0, 1, 2, 3, 4, 5]
    state, detail = stage_state(tmp_path / "a" / "sq")
    assert (state, detail) == ("failed", "Crash: killed at shard 6")
    sharded_stage(tmp_path / "a", 100, 10, log=log)
    assert log == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # shards 0-5 were not redone
    sharded_stage(tmp_path / "b", 100, 10)  # an uninterrupted run
    resumed = pq.read_table(tmp_path / "a" / "sq" / "squares.parquet")
    unbroken = pq.read_table(tmp_path / "b" / "sq" / "squares.parquet")
    assert resumed.equals(unbroken) and resumed.num_rows == 100
    assert not (tmp_path / "a" / "sq" / "_shards").exists()
    assert stage_state(tmp_path / "a" / "sq")[0] == "done"


def test_shards_of_another_plan_are_discarded(tmp_path: Path):
    with pytest.raises(Crash):
        sharded_stage(tmp_path, 100, 10, crash_at=3)
    assert stage_state(tmp_path / "sq") == ("failed", "Crash: killed at shard 3")
    log: list[int] = []
    sharded_stage(tmp_path, 100, 25, log=log)  # another shard size: a different plan
    assert log == [0, 1, 2, 3]
    assert pq.read_table(tmp_path / "sq" / "squares.parquet").column("sq").to_pylist() == [
        i * i for i in range(100)
    ]


def test_status_lists_every_stage_and_grid_cell(tmp_path: Path):
    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", [f"output_dir={tmp_path}"])
    run = RunDir.for_config(cfg)
    run.save_config(cfg)
    (run.root / "problems").mkdir(parents=True)
    done = Stage(run.root / "problems", config_hash="x")
    with done.running():
        done.finish(row_counts={"problems": 160})
    partial = Stage(run.root / "rollouts" / "tiny-qwen", config_hash="y")
    with partial.running():
        partial.plan_shards(4)
        partial.write_shard(0, [{"a": 1}])
    rows = {r["path"]: r for r in run.status(cfg)}
    assert rows["problems"]["state"] == "done" and "problems=160" in rows["problems"]["detail"]
    assert rows["rollouts/tiny-qwen"]["state"] == "partial"
    assert rows["rollouts/tiny-qwen"]["detail"] == "1/4 shards"
    assert rows["rollouts/tiny-llama"]["state"] == "missing"
    # 2 students x 8 streams x 2 objectives grid cells for train and eval.
    assert sum(1 for r in rows if r.startswith("train/")) == 32
    assert "eval/tiny-llama/style_aligned_rule/dft" in rows
    assert len(rows) == len(expected_stage_dirs(cfg))

    result = subprocess.run(
        [sys.executable, "-m", "qup_ray.cli", "status", str(run.root)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1/4 shards" in result.stdout and "done: 1" in result.stdout
    assert "partial: 1" in result.stdout


def test_write_parquet_streams_batches_and_tables_and_an_empty_stream_keeps_its_schema(
    tmp_path: Path,
):
    from qup_ray.rundir import iter_batches, iter_rows

    schema = pa.schema([("problem_id", pa.string()), ("x", pa.int64())])
    parts = [pa.Table.from_pylist([{"problem_id": f"p{i}", "x": i}], schema=schema)
             for i in range(3)]  # fmt: skip
    for i, part in enumerate(parts):
        write_parquet(tmp_path / f"shard-{i}.parquet", part)
    shards = sorted(tmp_path.glob("shard-*.parquet"))
    out = write_parquet(tmp_path / "all.parquet", iter_batches(shards, batch_rows=1), schema)
    assert pq.read_table(out).to_pylist() == [{"problem_id": f"p{i}", "x": i} for i in range(3)]
    assert [r["x"] for r in iter_rows(out, ["x"])] == [0, 1, 2]
    empty = write_parquet(tmp_path / "empty.parquet", iter([]), schema)
    assert pq.read_table(empty).schema == schema and pq.read_table(empty).num_rows == 0
