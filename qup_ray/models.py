"""Model references: where a configured model's files are, and what its checkpoint allows.

A model is a hub id, a local folder, or `cpu-world:<name>` (the project's tiny models, built on
first use). Every stage resolves models here, so the CPU world stays a plug-in: nothing else in a
real run refers to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qup_ray.config import EngineConfig, ExperimentConfig

# Checkpoint config keys that hold the context length, by architecture family.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def resolve_model(path: str, cfg: ExperimentConfig, revision: str | None = None) -> str:
    """The local directory of a model: a `cpu-world:` ref's build (made on first use, under
    `cfg.cache_root()`), a local folder as given, or a hub id's snapshot in the Hugging Face
    cache at its pinned revision (`qup_ray.fetch.local_snapshot`). Engines load that folder, so
    actors never download. `revision` defaults to the one configured for `path` (a student,
    reward model or oracle). A hub model missing under `HF_HUB_OFFLINE=1` raises `NotFetched`
    naming it."""
    if path.startswith("cpu-world:"):
        from qup_ray.cpu_world import resolve_model_ref

        world = cfg.cpu_world
        if world.cache_dir is None:  # where it is cached is not hashed: the world stays the same
            world = world.model_copy(update={"cache_dir": str(cfg.cache_root())})
        return resolve_model_ref(path, world)
    if Path(path).expanduser().exists():
        return path
    from qup_ray.fetch import local_snapshot

    if revision is None:
        revision = configured_revision(path, cfg)
    return str(local_snapshot(path, "model", revision, cache_root=cfg.cache_root()))


def configured_revision(path: str, cfg: ExperimentConfig) -> str | None:
    """The `revision` the config gives the model at `path` (student, reward model or open
    oracle), None when none does."""
    models = [*cfg.students.values(), *cfg.reward_models.values()]
    for model in models:
        if model.path == path and model.revision is not None:
            return model.revision
    for oracle in cfg.oracles.values():
        if oracle.model == path and oracle.revision is not None:
            return oracle.revision
    return None


def checkpoint_config(path: str | Path, revision: str | None = None) -> dict[str, Any] | None:
    """The checkpoint's config.json from a local folder or the local Hugging Face cache; None
    when it is not on this machine (nothing is downloaded here)."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(path).exists() or str(path).startswith("cpu-world:"):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(path), "config.json", revision=revision)
    except Exception:  # not a valid repo id, or no cache: the check cannot be made here
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def checkpoint_context_len(path: str | Path, revision: str | None = None) -> int | None:
    """The checkpoint's context length in tokens (`max_position_embeddings`), None if unknown."""
    config = checkpoint_config(path, revision)
    if config is None:
        return None
    for key in _CONTEXT_KEYS:
        if isinstance(config.get(key), int):
            return int(config[key])
    text = config.get("text_config")
    if isinstance(text, dict):
        for key in _CONTEXT_KEYS:
            if isinstance(text.get(key), int):
                return int(text[key])
    return None


def engine_max_len(engine: EngineConfig, model_path: str | Path) -> int:
    """The token limit of an engine: its `max_model_len`, else the checkpoint's context."""
    if engine.max_model_len is not None:
        return engine.max_model_len
    context = checkpoint_context_len(model_path)
    if context is None:
        raise ValueError(
            f"{model_path}: max_model_len is unset and the checkpoint's context length is unknown"
        )
    return context


def context_problems(cfg_data: dict) -> list[str]:
    """Config problems of engines whose `max_model_len` exceeds their checkpoint's context
    (checked where the checkpoint's config.json is on this machine; vLLM would refuse to start)."""
    problems: list[str] = []
    for section, path_key in (
        ("students", "path"),
        ("reward_models", "path"),
        ("oracles", "model"),
    ):
        models = cfg_data.get(section)
        for name, model in (models or {}).items() if isinstance(models, dict) else []:
            if not isinstance(model, dict) or not isinstance(model.get("engine"), dict):
                continue
            engine, path = model["engine"], model.get(path_key)
            wanted = engine.get("max_model_len")
            if not isinstance(path, str) or not isinstance(wanted, int):
                continue
            if engine.get("allow_long_context"):
                continue
            context = checkpoint_context_len(path, model.get("revision"))
            if context is not None and wanted > context:
                problems.append(
                    f"{section}.{name}.engine.max_model_len: above the checkpoint's context of "
                    f"{context} tokens (max_position_embeddings in {path}/config.json); lower it "
                    f"or set allow_long_context: true (got {wanted})"
                )
    return problems
