"""Scores of traces under a model, each computed once: perplexity, reward, style.

Shared by the score stage and the streams stage (whose learner-compatibility streams select by
the same PPL and reward the score stage reports). Engine results go through a content-addressed
cache in `<run>/score_cache/<kind>-<model name>/shard-XXXXX.parquet`:
- the key of a result is the hash of the model's identity (resolved path, dtype, table kind) and
  of the exact engine input (token ids, and where the response starts for PPL), so a trace that
  appears in several streams, or twice in one call, is scored once;
- shards are appended as engine batches complete and never rewritten, so an interrupted scoring
  resumes: a rerun reads every shard and sends the engine only the keys it lacks.
Style statistics need no engine: one table of decoded vocabulary pieces per tokenizer, then
array lookups (the same rows as decoding every token one at a time).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qup_ray.config import EngineConfig, ExperimentConfig
from qup_ray.encoding import ChatFormat
from qup_ray.engines import PoolEvents, VLLMPromptLogprobs, VLLMRewardScorer, engine_pool
from qup_ray.models import engine_max_len, resolve_model
from qup_ray.prompts import load_prompt, render_chat
from qup_ray.rundir import RunDir, rejected_row, write_parquet
from qup_ray.style import CATEGORIES, stats_from_counts, token_category

logger = logging.getLogger(__name__)

PPL_FIELDS = ("mean_nll", "ppl", *(f"q{q}_{m}" for q in range(1, 5) for m in ("mean_nll", "ppl")))
PPL_CACHE_SCHEMA = pa.schema(
    [("cache_key", pa.string()), ("num_tokens", pa.int64())]
    + [(f, pa.float64()) for f in PPL_FIELDS]
)
REWARD_CACHE_SCHEMA = pa.schema([("cache_key", pa.string()), ("reward", pa.float64())])


class ScoreCache:
    """Engine results of one (table kind, model), keyed by content; append-only shards."""

    def __init__(self, folder: Path, identity: dict[str, Any], schema: pa.Schema) -> None:
        self.folder, self.schema = folder, schema
        self.identity = repr(sorted(identity.items())).encode()
        folder.mkdir(parents=True, exist_ok=True)
        paths = sorted(folder.glob("shard-*.parquet"))
        self.next_shard = int(paths[-1].stem.split("-")[1]) + 1 if paths else 0
        self.rows: dict[str, dict] = {}
        for path in paths:
            for row in pq.read_table(path).to_pylist():
                self.rows[row.pop("cache_key")] = row

    def key(self, input_ids: Sequence[int] | np.ndarray, *extra: int) -> str:
        """The cache key of one engine input under this model."""
        h = hashlib.sha256(self.identity)
        h.update(np.asarray([*extra, -1], dtype=np.int64).tobytes())
        h.update(np.asarray(input_ids, dtype=np.int64).tobytes())
        return h.hexdigest()

    def add(self, table: pa.Table) -> None:
        """Store one finished engine batch as the next shard (written atomically)."""
        table = table.select(self.schema.names).cast(self.schema)
        write_parquet(self.folder / f"shard-{self.next_shard:05d}.parquet", table)
        self.next_shard += 1
        for row in table.to_pylist():
            self.rows[row.pop("cache_key")] = row


def _cache(cfg: ExperimentConfig, kind: str, name: str, identity: dict, schema: pa.Schema):
    folder = RunDir.for_config(cfg).root / "score_cache" / f"{kind}-{name}"
    return ScoreCache(folder, {"kind": kind, **identity}, schema)


def engine_batches(
    rows: list[dict], actor: type, kwargs: dict, engine: EngineConfig, role: str,
    events_dir: Path | None = None,
) -> Iterator[pa.Table]:  # fmt: skip
    """Run rows through one engine pool (`engines.engine_pool`, its actors' starts and batches
    recorded in `events_dir`), yielding each finished batch as it completes (in completion
    order: results are addressed by their cache key)."""
    import ray

    ds = engine_pool(ray.data.from_items(rows), actor, kwargs, engine, role=role,
                     events_dir=events_dir)  # fmt: skip
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def _score_missing(cache: ScoreCache, cache_keys: list[str], missing: dict[str, dict],
                   actor: type, kwargs: dict, engine: EngineConfig, role: str) -> int:  # fmt: skip
    """Send the engine each distinct input the cache lacks (`missing`, by cache key); returns
    how many were sent."""
    distinct = len(set(cache_keys))
    logger.info("%s: %d inputs, %d distinct, %d cached, %d to score", cache.folder.name,
                len(cache_keys), distinct, distinct - len(missing), len(missing))  # fmt: skip
    if missing:
        events = PoolEvents.fresh(cache.folder / "engine_events")
        for batch in engine_batches(
            list(missing.values()), actor, kwargs, engine, role, events.path
        ):
            cache.add(batch)
    return len(missing)


def engine_input(ids: Sequence[int], **extra: Any) -> dict[str, Any]:
    """One engine input row. Its ids are int32, not a list of Python ints (a ninth of the
    memory): the driver holds the inputs still to score, and only those."""
    return {"input_ids": np.asarray(ids, dtype=np.int32), **extra}


def chunks(rows: Iterable[dict], size: int = 1024) -> Iterator[list[dict]]:
    """`rows` in lists of `size`: tokenizers batch, and only a chunk of texts is held."""
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def score_ppl(
    cfg: ExperimentConfig, student: str, traces: Iterable[dict], rejected: list[dict]
) -> list[dict]:
    """PPL rows (key, num_tokens, mean_nll, ppl, q1..q4) under `student`, in input order: each
    trace encoded exactly as training encodes it (`ChatFormat.example`). Sequences longer than
    the engine's limit go to `rejected` instead of the engine. `traces` may stream (rows of
    `key`, `problem_id`, `problem`, `trace`): no text is kept."""
    model = cfg.students[student]
    path = resolve_model(model.path, cfg)
    fmt = ChatFormat.for_model(path, model.prompt)
    limit = engine_max_len(model.engine, path)
    dtype = None if cfg.scoring.ppl_dtype == "auto" else cfg.scoring.ppl_dtype
    cache = _cache(cfg, "ppl", student, {"path": path, "dtype": dtype}, PPL_CACHE_SCHEMA)
    keys: list[tuple[str, str]] = []  # (key, cache key) of each scored trace, in input order
    missing: dict[str, dict] = {}
    for t in traces:
        ids, start = fmt.example(t["problem"], t["trace"])
        if len(ids) > limit:
            rejected.append({"key": t["key"], **rejected_row(
                t["problem_id"], "sequence_over_context", len(ids), limit, "ppl")})  # fmt: skip
            continue
        cache_key = cache.key(ids, start)
        keys.append((t["key"], cache_key))
        if cache_key not in cache.rows and cache_key not in missing:
            missing[cache_key] = engine_input(ids, cache_key=cache_key, response_start=start)
    kwargs = {"model_path": path, "engine": model.engine.model_dump(), "dtype": dtype,
              "cache_dir": str(cfg.cache_root()), "metric_tags": {"student": student, "stage": "score"}}  # fmt: skip
    _score_missing(cache, [c for _, c in keys], missing, VLLMPromptLogprobs, kwargs, model.engine,
                   "score")  # fmt: skip
    return [{"key": key, **cache.rows[cache_key]} for key, cache_key in keys]


def score_reward(
    cfg: ExperimentConfig, rm_name: str, traces: Iterable[dict], rejected: list[dict]
) -> list[dict]:
    """Reward rows (key, reward) of one reward model over all traces, in input order;
    conversations longer than the reward model's limit go to `rejected`. `traces` may stream:
    they are rendered and tokenized a chunk at a time."""
    from transformers import AutoTokenizer

    rm = cfg.reward_models[rm_name]
    path = resolve_model(rm.path, cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    system = load_prompt(rm.prompt)["system"] if rm.prompt else None
    limit = engine_max_len(rm.engine, path)
    identity = {"path": path, "dtype": rm.engine.dtype, "rm_kind": rm.kind, "token_id": rm.token_id}
    cache = _cache(cfg, "reward", rm_name, identity, REWARD_CACHE_SCHEMA)
    keys: list[tuple[str, str]] = []
    missing: dict[str, dict] = {}
    for chunk in chunks(traces):
        texts = []
        for t in chunk:
            messages = [{"role": "system", "content": system}] if system else []
            messages += [
                {"role": "user", "content": t["problem"]},
                {"role": "assistant", "content": t["trace"]},
            ]
            texts.append(render_chat(tokenizer, messages, add_generation_prompt=False))
        # The template already holds the special tokens: none added on top (see VLLMRewardScorer).
        all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for t, ids in zip(chunk, all_ids, strict=True):
            if len(ids) > limit:
                rejected.append({"key": t["key"], **rejected_row(
                    t["problem_id"], "sequence_over_context", len(ids), limit, f"reward-{rm_name}")})  # fmt: skip
                continue
            cache_key = cache.key(ids)
            keys.append((t["key"], cache_key))
            if cache_key not in cache.rows and cache_key not in missing:
                missing[cache_key] = engine_input(ids, cache_key=cache_key)
    kwargs = {"model_path": path, "engine": rm.engine.model_dump(), "kind": rm.kind, "token_id": rm.token_id,
              "cache_dir": str(cfg.cache_root()), "metric_tags": {"reward_model": rm_name, "stage": "score"}}  # fmt: skip
    _score_missing(cache, [c for _, c in keys], missing, VLLMRewardScorer, kwargs, rm.engine,
                   "score")  # fmt: skip
    return [{"key": key, **cache.rows[cache_key]} for key, cache_key in keys]


@lru_cache(maxsize=8)
def _tokenizer_and_categories(
    path: str, symbol_chars: str, scaffolding: frozenset[str]
) -> tuple[Any, np.ndarray]:
    """A tokenizer and the style category (index into CATEGORIES) of every id of its vocabulary:
    each piece decoded once, exactly as `tokenizer.decode([i])` decodes it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    index = {c: i for i, c in enumerate(CATEGORIES)}
    categories = [index[token_category(p, symbol_chars, scaffolding)] for p in pieces]
    return tokenizer, np.asarray(categories, dtype=np.int64)


def style_rows(
    tokenizer_path: str, texts: list[str], symbol_chars: str, scaffolding: frozenset[str]
) -> list[dict]:
    """Token-category statistics (`style.style_stats`) of each text with one tokenizer."""
    tokenizer, categories = _tokenizer_and_categories(tokenizer_path, symbol_chars, scaffolding)
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    rows = []
    for text, ids in zip(texts, all_ids, strict=True):
        counts = np.bincount(categories[np.asarray(ids, dtype=np.int64)], minlength=len(CATEGORIES))
        by_name = {c: int(n) for c, n in zip(CATEGORIES, counts, strict=True)}
        rows.append(stats_from_counts(by_name, len(ids), text))
    return rows


def score_style(cfg: ExperimentConfig, student: str, traces: Iterable[dict]) -> list[dict]:
    """Style rows (key and token-category statistics with the student's tokenizer), in input
    order; `traces` may stream (tokenized a chunk at a time)."""
    path = resolve_model(cfg.students[student].path, cfg)
    scaffolding = frozenset(w.lower() for w in cfg.scoring.scaffolding_words)
    out = []
    for chunk in chunks(traces):
        stats = style_rows(path, [t["trace"] for t in chunk], cfg.scoring.symbol_chars, scaffolding)
        out += [{"key": t["key"], **row} for t, row in zip(chunk, stats, strict=True)]
    return out


def cache_size(cfg: ExperimentConfig, kind: str, name: str) -> int:
    """Results stored in one score cache (`kind` is `ppl` or `reward`); 0 when it is empty."""
    folder = RunDir.for_config(cfg).root / "score_cache" / f"{kind}-{name}"
    paths = sorted(folder.glob("shard-*.parquet")) if folder.is_dir() else []
    return sum(pq.read_metadata(p).num_rows for p in paths)


def pool_faults(cfg: ExperimentConfig, since: float) -> dict[str, int]:
    """Actor restarts and retried batches of every score engine pool that ran since `since`
    (a stage's start), summed over models: what the score stage's manifest reports."""
    total = {"actor_restarts": 0, "retried_batches": 0}
    for events in sorted(cfg.run_dir.glob("score_cache/*/engine_events/*")):
        if not events.is_dir() or events.stat().st_mtime < since:
            continue
        kind, _, name = events.parents[1].name.partition("-")
        models = cfg.students if kind == "ppl" else cfg.reward_models
        num_actors = models[name].engine.num_actors if name in models else 1
        for key, value in PoolEvents(events).summary(num_actors).items():
            total[key] += value
    return total
