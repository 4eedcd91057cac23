"""Problem and benchmark loaders, normalised to one schema.

Every source (the Hugging Face hub, local Parquet/JSONL/`save_to_disk` folders for offline
clusters, the CPU world's synthetic generator) comes out as rows of:

    problem_id  stable hash of the normalised problem text
    problem     the problem text
    answer      gold final answer as a string (several answers joined by ", ")
    solution    reference solution, "" when the source has none
    source      where the row came from (NuminaMath's own `source` field when present)
    benchmark   the benchmark's name, or "" for training problems

A row that cannot be used (no problem, no gold answer, wrong types) goes to the rejected list
with a reason; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from qup_ray.config import DatasetSource

logger = logging.getLogger(__name__)

PROBLEM_SCHEMA = pa.schema(
    [
        (name, pa.string())
        for name in ("problem_id", "problem", "answer", "solution", "source", "benchmark")
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),
        ("benchmark", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)


class DataSourceError(Exception):
    """A configured data source that cannot be read (missing file, unknown format)."""


def normalize_text(text: str) -> str:
    """Lower-case, NFKC, whitespace collapsed: what dedup and decontamination compare."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"\s+", " ", text).strip()


def problem_id(text: str) -> str:
    """Stable id of a problem: the same text (up to case and spacing) gets the same id."""
    return hashlib.sha256(normalize_text(text).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Raw rows
# --------------------------------------------------------------------------------------------


def _load_local(path: Path, split: str) -> Iterable[dict]:
    import datasets

    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(path))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json"))
        if not files:
            raise DataSourceError(f"{path}: no save_to_disk folder, Parquet or JSONL files in it")
        suffixes = {p.suffix for p in files}
    elif path.is_file():
        files, suffixes = [path], {path.suffix}
    else:
        raise DataSourceError(f"{path}: no such file or folder")
    if suffixes == {".parquet"}:
        builder = "parquet"
    elif suffixes <= {".jsonl", ".json"}:
        builder = "json"
    else:
        raise DataSourceError(f"{path}: mixed or unknown file types {sorted(suffixes)}")
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")


def load_raw_rows(source: DatasetSource, cache_root: Path | None = None) -> Iterable[dict]:
    """The rows of a source as dicts, before normalisation. `cache_root` holds `qup fetch`'s
    lock of hub revisions (default: `config.default_cache_root()`)."""
    if source.kind == "synthetic":
        from qup_ray.cpu_world.synthetic import generate_problems

        return generate_problems(source.num_synthetic, seed=source.seed)
    if source.kind == "local":
        if not source.path:
            raise DataSourceError("kind 'local' needs `path`")
        return _load_local(Path(source.path).expanduser(), source.split)
    import datasets

    folder = hub_folder(source, cache_root)
    return datasets.load_dataset(str(folder), source.config, split=source.split)


def hub_folder(source: DatasetSource, cache_root: Path | None = None) -> Path:
    """The folder a hub source loads from: a local mirror it names, else the snapshot `qup fetch`
    put in the Hugging Face cache at the pinned revision (missing under HF_HUB_OFFLINE=1: one
    error naming it, not a traceback from `datasets`)."""
    from qup_ray.fetch import local_snapshot

    if not source.dataset:
        raise DataSourceError("kind 'hub' needs `dataset`")
    if Path(source.dataset).expanduser().is_dir():  # a local mirror of a hub dataset
        return Path(source.dataset).expanduser()
    return local_snapshot(source.dataset, "dataset", source.revision, cache_root=cache_root)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def _as_answer(value: Any) -> str | None:
    """Gold answer as one string: numbers printed exactly, text trimmed, lists joined.

    AMC23 stores its integer answers as floats: `27.0` is the integer 27, written "27" (the
    shortest exact form otherwise, never a rounded one). OlympiadBench's `final_answer` is a
    list whose items are all required: each item loses its own `$...$` or `\\boxed{}` before
    the items are joined with ", " (joined first, "$a$, $b$" would lose only its outer `$`)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, list | tuple):
        from qup_ray.answers import gold_text

        parts = [_as_answer(v) for v in value]
        parts = [p for p in parts if p]
        return (gold_text(parts) or None) if parts else None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        value = value.strip()
        if "\\boxed" in value or "\\fbox" in value:
            # Some mirrors store the gold as the solution's boxed line (Minerva Math).
            from qup_ray.answers import last_boxed

            value = (last_boxed(value) or "").strip()
        return value or None
    return None


_UNIT_SPACING_RE = re.compile(r"(?:\\[,;: !]|~|\\quad|\s)+$")


def strip_unit(answer: str, unit: str | None) -> str:
    """The gold answer without its unit: OlympiadBench keeps the unit in a `unit` column and
    its answers come with or without it (`$5 \\mathrm{~m}$`). The answer checker already ignores
    units written in a response's box, so the gold is compared as the bare quantity."""
    if not unit or not unit.strip().strip("$").strip():
        return answer
    unit_text = unit.strip().strip("$").strip()
    items = []
    for item in re.split(r"(?<!\\), ", answer):  # items, not the thin space `\,`
        bare = item.strip()
        delimited = len(bare) > 2 and bare.startswith("$") and bare.endswith("$")
        body = bare[1:-1].strip() if delimited else bare
        if body.endswith(unit_text) and len(body) > len(unit_text):
            body = _UNIT_SPACING_RE.sub("", body[: -len(unit_text)])
        items.append(body)
    return ", ".join(items)


def normalize_row(raw: dict, fields: dict[str, str], benchmark: str) -> tuple[dict | None, str]:
    """One raw row in the project's schema, or (None, reason) when it cannot be used.

    `fields` maps the project's names (problem, answer, solution, source, unit) to the
    dataset's columns. Without an answer column the gold is the solution's last `\\boxed{}`
    (NuminaMath-CoT; Minerva Math in its original problem/solution layout); a row whose answer
    field is empty falls back to its solution's `\\boxed{}` the same way."""
    from qup_ray.answers import gold_from_solution

    name = {k: fields.get(k, k) for k in ("problem", "answer", "solution", "source", "unit")}
    problem = raw.get(name["problem"])
    if not isinstance(problem, str) or not problem.strip():
        return None, f"no problem text in field {name['problem']!r}"
    solution = raw.get(name["solution"])
    if isinstance(solution, list) and all(isinstance(s, str) for s in solution):
        solution = "\n\n".join(solution)  # OlympiadBench: a list of reference solutions
    if solution is not None and not isinstance(solution, str):
        return None, f"field {name['solution']!r} is not text"
    if "answer" in fields or name["answer"] in raw:
        answer = _as_answer(raw.get(name["answer"])) or gold_from_solution(solution or "")
        if answer is None:
            return None, f"no gold answer in field {name['answer']!r}"
    else:
        # NuminaMath-CoT has no answer column: the gold is the solution's last \boxed{}.
        answer = gold_from_solution(solution or "")
        if not answer:
            return None, "no \\boxed{} answer in the solution"
    unit = raw.get(name["unit"])
    answer = strip_unit(answer, unit if isinstance(unit, str) else None)
    source = raw.get(name["source"])
    return {
        "problem_id": problem_id(problem),
        "problem": problem.strip(),
        "answer": answer,
        "solution": solution or "",
        "source": source if isinstance(source, str) and source else benchmark or "unknown",
        "benchmark": benchmark,
    }, ""


def iter_problems(
    source: DatasetSource, benchmark: str = "", cache_root: Path | None = None
) -> Iterator[tuple[dict | None, dict | None]]:
    """A source's rows one at a time, in order: `(row, None)` for a usable row in the
    project's schema, `(None, rejected)` (with its reason) for one that is not."""
    num_loaded = num_rejected = 0
    for i, raw in enumerate(load_raw_rows(source, cache_root)):
        num_loaded += 1
        row, reason = normalize_row(dict(raw), source.fields, benchmark)
        if row is None:
            num_rejected += 1
            yield None, {"row_index": i, "benchmark": benchmark, "reason": reason,
                         "raw": repr(raw)[:2000]}  # fmt: skip
        else:
            yield row, None
    if num_rejected:
        logger.warning(
            "%s: %d of %d rows rejected", benchmark or "problems", num_rejected, num_loaded
        )


def load_problems(
    source: DatasetSource, benchmark: str = "", cache_root: Path | None = None
) -> tuple[list[dict], list[dict]]:
    """Load and normalise a source: (rows, rejected rows with reasons). For benchmarks and
    tests; the problems stage streams a source with `iter_problems`."""
    rows, rejected = [], []
    for row, bad in iter_problems(source, benchmark, cache_root):
        if row is None:
            rejected.append(bad)
        else:
            rows.append(row)
    return rows, rejected
