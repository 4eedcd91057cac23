"""`qup fetch`: every model and dataset a config names, downloaded once, before any GPU job.

    qup fetch -c configs/paper.yaml          download into the Hugging Face cache
    qup fetch -c configs/paper.yaml --plan   one line per item: kind, repo id, revision, size

What is fetched: the students, the reward models `scoring.reward_models` uses, the open
(`vllm`) oracles without a `base_url`, the problem source and the evaluation benchmarks, each at
its configured `revision`. Downloads go through huggingface_hub with hf_xet's high-performance
mode into the Hugging Face cache (`HF_HOME`; shared storage on a cluster), so later jobs run
with `HF_HUB_OFFLINE=1`. A branch, tag or unset revision is resolved to the commit sha that was
downloaded and recorded in `<cache_root>/fetch_lock.json`; later runs load that sha, so a run
stays reproducible when the branch moves. CPU-world references and local folders are listed,
never fetched.

On a cluster the grid runs this as its first job (`fetch_for_run`, CPU only, no Ray) whenever the
config names a hub item; `<run>/fetch/_manifest.json` then records the commit of each.

Stages find their files here too (`local_snapshot`): a model or dataset missing from the cache
under `HF_HUB_OFFLINE=1` is one `NotFetched` error naming it, which the CLI prints as one line.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from qup_ray.config import DatasetSource, ExperimentConfig, default_cache_root
from qup_ray.rundir import Stage, StageError, read_json, stable_hash, write_json

logger = logging.getLogger(__name__)

LOCK_NAME = "fetch_lock.json"
# Weights and tokenizer files vLLM and transformers read; other formats of the same weights
# (PyTorch .bin, Flax, TF, GGUF, Meta's `original/` checkpoints) are skipped.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# A repository without safetensors ships its weights as PyTorch .bin files.
MODEL_PATTERNS_BIN = [*MODEL_PATTERNS, "*.bin"]
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")

RepoType = Literal["model", "dataset"]


class NotFetched(StageError):
    """A model or dataset a stage needs is not in the Hugging Face cache and the hub is off."""


@dataclass(frozen=True)
class FetchItem:
    """One thing a config names: a hub repository to fetch, or a local one to list."""

    kind: str
    """student, reward_model, oracle, problems or benchmark."""
    name: str
    """Its key in the config (the benchmark's or model's name; `source` for problems)."""
    repo_id: str
    """Hub id, local path or `cpu-world:` reference."""
    repo_type: RepoType
    revision: str | None
    local: str | None = None
    """Why it is not fetched (`built locally`, `local folder`); None for hub items."""


def fetch_items(cfg: ExperimentConfig) -> list[FetchItem]:
    """Every model and dataset of the config, in the order the stages need them."""
    items: list[FetchItem] = []

    def model(kind: str, name: str, path: str, revision: str | None) -> None:
        if path.startswith("cpu-world:"):
            items.append(FetchItem(kind, name, path, "model", None, "built locally, not fetched"))
        elif Path(path).expanduser().exists():
            items.append(FetchItem(kind, name, path, "model", None, "local folder, not fetched"))
        else:
            items.append(FetchItem(kind, name, path, "model", revision))

    def dataset(kind: str, name: str, source: DatasetSource) -> None:
        if source.kind == "synthetic":
            items.append(
                FetchItem(kind, name, "synthetic", "dataset", None, "built locally, not fetched")
            )
        elif source.kind == "local":
            items.append(
                FetchItem(kind, name, str(source.path), "dataset", None, "local file, not fetched")
            )
        elif source.dataset and Path(source.dataset).expanduser().is_dir():
            items.append(
                FetchItem(kind, name, source.dataset, "dataset", None, "local folder, not fetched")
            )
        else:
            items.append(FetchItem(kind, name, str(source.dataset), "dataset", source.revision))

    dataset("problems", "source", cfg.problems.source)
    for name, bench in cfg.evaluation.benchmarks.items():
        dataset("benchmark", name, bench.source)
    for name, student in cfg.students.items():
        model("student", name, student.path, student.revision)
    for name in cfg.scoring.reward_models:
        rm = cfg.reward_models[name]
        model("reward_model", name, rm.path, rm.revision)
    for name, oracle in cfg.oracles.items():
        if oracle.backend == "vllm" and oracle.base_url is None:
            model("oracle", name, oracle.model, oracle.revision)
    return items


# --------------------------------------------------------------------------------------------
# The lock: branch or tag -> the commit sha that was downloaded
# --------------------------------------------------------------------------------------------


def _lock_key(repo_type: RepoType, repo_id: str, revision: str | None) -> str:
    return f"{repo_type}:{repo_id}@{revision or 'main'}"


def read_lock(cache_root: Path) -> dict[str, str]:
    """`{"model:Qwen/Qwen2.5-Math-1.5B@main": "<sha>", ...}`; empty before the first fetch."""
    path = cache_root / LOCK_NAME
    return read_json(path) if path.is_file() else {}


def pinned_revision(
    repo_type: RepoType, repo_id: str, revision: str | None, cache_root: Path
) -> str | None:
    """The commit sha to load: `revision` itself when it is one, else what `qup fetch` locked
    for it, else `revision` unchanged (the cache's own branch pointer decides)."""
    if revision is not None and _SHA_RE.match(revision):
        return revision
    return read_lock(cache_root).get(_lock_key(repo_type, repo_id, revision), revision)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def local_snapshot(
    repo_id: str,
    repo_type: RepoType,
    revision: str | None,
    *,
    cache_root: Path | None = None,
    download: bool = True,
) -> Path:
    """The folder of a hub repository's snapshot in the Hugging Face cache.

    Missing with `HF_HUB_OFFLINE=1` (or `download=False`): `NotFetched` naming the repository.
    Missing with the hub reachable: downloaded here, once, by the calling process (a stage's
    driver, never each engine actor), with a warning that `qup fetch` should have done it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_root = cache_root or default_cache_root()
    pinned = pinned_revision(repo_type, repo_id, revision, cache_root)
    try:
        return Path(
            snapshot_download(repo_id, repo_type=repo_type, revision=pinned, local_files_only=True)
        )
    except LocalEntryNotFoundError:
        pass
    what = f"{repo_type} {repo_id} (revision {pinned or 'main'})"
    if _hub_offline() or not download:
        raise NotFetched(
            f"{what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is "
            f"off (HF_HUB_OFFLINE): run `qup fetch -c <this run's config>` where the hub is "
            f"reachable first"
        ) from None
    logger.warning(
        "%s is not in the Hugging Face cache: downloading it now (use `qup fetch`)", what
    )
    return download_one(FetchItem(repo_type, repo_id, repo_id, repo_type, revision), cache_root)


# --------------------------------------------------------------------------------------------
# Download and plan
# --------------------------------------------------------------------------------------------


def _patterns(item: FetchItem, filenames: list[str] | None) -> list[str] | None:
    """allow_patterns of a download: every file of a dataset; a model's safetensors (or its
    .bin weights when it has no safetensors), configs and tokenizer files."""
    if item.repo_type == "dataset":
        return None
    if filenames is not None and not any(f.endswith(".safetensors") for f in filenames):
        return MODEL_PATTERNS_BIN
    return MODEL_PATTERNS


def _hub_info(item: FetchItem):
    from huggingface_hub import HfApi

    api = HfApi()
    info = api.model_info if item.repo_type == "model" else api.dataset_info
    return info(item.repo_id, revision=item.revision, files_metadata=True)


def download_one(item: FetchItem, cache_root: Path, *, force: bool = False) -> Path:
    """Download one hub item into the Hugging Face cache and lock its revision to the sha."""
    from fnmatch import fnmatch

    from huggingface_hub import snapshot_download

    info = _hub_info(item)
    filenames = [s.rfilename for s in info.siblings or []]
    patterns = _patterns(item, filenames)
    # hf_xet (huggingface_hub 2.x's download path) reads this when it starts a transfer;
    # hf-transfer and HF_HUB_ENABLE_HF_TRANSFER are no longer used.
    previous = os.environ.get("HF_XET_HIGH_PERFORMANCE")
    os.environ["HF_XET_HIGH_PERFORMANCE"] = "1"
    try:
        folder = snapshot_download(
            item.repo_id,
            repo_type=item.repo_type,
            # The branch or tag itself, so the cache also records where it pointed (refs/).
            revision=item.revision,
            allow_patterns=patterns,
            force_download=force,
        )
    finally:
        if previous is None:
            os.environ.pop("HF_XET_HIGH_PERFORMANCE", None)
        else:
            os.environ["HF_XET_HIGH_PERFORMANCE"] = previous
    num_files = sum(
        1 for f in filenames if patterns is None or any(fnmatch(f, p) for p in patterns)
    )
    sha = Path(folder).name  # a snapshot folder is named by the commit it holds
    lock = read_lock(cache_root)
    lock[_lock_key(item.repo_type, item.repo_id, item.revision)] = sha
    write_json(cache_root / LOCK_NAME, lock)
    logger.info("%s %s: %d files at %s -> %s", item.kind, item.repo_id, num_files, sha, folder)
    return Path(folder)


def _size_text(item: FetchItem) -> str:
    """Bytes the download would take, from the hub's file metadata."""
    from fnmatch import fnmatch

    info = _hub_info(item)
    files = info.siblings or []
    patterns = _patterns(item, [s.rfilename for s in files])
    total = sum(
        s.size or 0
        for s in files
        if patterns is None or any(fnmatch(s.rfilename, p) for p in patterns)
    )
    return f"{total / 1e9:.2f} GB"


def plan(cfg: ExperimentConfig) -> list[str]:
    """One line per item: kind, repo id, revision, and its size when the hub is reachable
    ("size unknown (offline)" otherwise: the plan works without network)."""
    import httpx
    from huggingface_hub.errors import OfflineModeIsEnabled

    offline = _hub_offline()
    cache_root = cfg.cache_root()
    lines = []
    for item in fetch_items(cfg):
        head = f"{item.kind:<13} {item.repo_id:<45}"
        if item.local:
            lines.append(f"{head} {item.local}")
            continue
        size = "size unknown (offline)"
        if not offline:
            try:
                size = _size_text(item)
            except (httpx.TransportError, OfflineModeIsEnabled):
                offline = True  # no hub from here: the other items would only time out too
            except Exception as e:  # a gated or missing repo: the plan still lists it
                size = f"size unknown ({type(e).__name__})"
        revision = item.revision or "main (not pinned)"
        locked = pinned_revision(item.repo_type, item.repo_id, item.revision, cache_root)
        if locked and locked != item.revision:
            revision += f" (locked to {locked})"
        lines.append(f"{head} revision {revision}  {size}")
    return lines


def run(cfg: ExperimentConfig, *, force: bool = False) -> Path:
    """Download every hub item of the config, skipping those already in the cache at a commit
    sha (pinned or locked) unless `force`; returns the lock file. With `HF_HUB_OFFLINE=1` it
    only checks: the first missing item is a `NotFetched` error."""
    cache_root = cfg.cache_root()
    for item in fetch_items(cfg):
        if item.local:
            logger.info("%s %s: %s", item.kind, item.repo_id, item.local)
            continue
        pinned = pinned_revision(item.repo_type, item.repo_id, item.revision, cache_root)
        if not force and (_hub_offline() or (pinned and _SHA_RE.match(pinned))):
            try:
                local_snapshot(item.repo_id, item.repo_type, item.revision,
                               cache_root=cache_root, download=False)  # fmt: skip
                logger.info("%s %s: in the cache at %s", item.kind, item.repo_id, pinned)
                continue
            except NotFetched:
                if _hub_offline():
                    raise
        download_one(item, cache_root, force=force)
    return cache_root / LOCK_NAME


def needs_fetch(cfg: ExperimentConfig) -> bool:
    """True when the config names a hub model or dataset (the grid then starts with a fetch
    job); the dry run's CPU world and local files need none."""
    return any(item.local is None for item in fetch_items(cfg))


def fetch_for_run(cfg: ExperimentConfig, *, force: bool = False) -> Path:
    """The grid's fetch job: `run`, then `<run>/fetch/_manifest.json` with the commit of every
    hub item, so the jobs after it (and a rerun of the grid) know it is done."""
    items = fetch_items(cfg)
    stage = Stage(cfg.run_dir / "fetch", stable_hash([asdict(i) for i in items]), force=force)
    if stage.is_done():
        return stage.dir
    with stage.running():
        cache_root = cfg.cache_root()
        run(cfg, force=force)
        # The snapshot folder of each item is named by the commit it holds.
        commits = {
            f"{i.repo_type}:{i.repo_id}": local_snapshot(
                i.repo_id, i.repo_type, i.revision, cache_root=cache_root, download=False
            ).name
            for i in items
            if i.local is None
        }
        stage.finish(row_counts={"items": len(commits)}, commits=commits)
    return stage.dir
