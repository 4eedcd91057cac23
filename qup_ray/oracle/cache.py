"""The oracle's response cache: every successful reply, on disk, keyed by what was asked.

A reply is stored the moment it arrives (one SQLite transaction per reply), so a crash loses at
most the requests in flight, and a rerun of the same requests sends no HTTP request for them.
Only successes are stored: failures and budget-skipped rows are retried on the next run.

The key is a hash of the model, the messages and the sampling parameters (``cache_key``), so a
changed prompt file, model or temperature asks again, and identical requests share one reply.

The database lives at ``<cache_dir>/responses.sqlite`` (WAL mode). Several asyncio tasks of one
process may write at once (each write is one synchronous transaction on the event-loop thread),
and several processes on one host may share it. WAL needs a filesystem with working locks and
shared memory: put the cache on node-local or POSIX-locking storage, not on an NFS mount
without locks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_FILE_NAME = "responses.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    cache_key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    content TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    request_key TEXT,
    created_at REAL NOT NULL
)
"""
# SQLite limits the number of `?` variables in one statement (999 in old builds).
_LOOKUP_CHUNK = 500


def cache_key(model: str, messages: Sequence[dict], params: dict) -> str:
    """The cache key of one request: sha256 of the canonical JSON of model, messages and params."""
    blob = json.dumps(
        {"model": model, "messages": list(messages), "params": params},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class CachedResponse:
    """One stored oracle reply and what it cost when it was first paid for."""

    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    model: str
    request_key: str | None = None
    created_at: float = 0.0


class ResponseCache:
    """SQLite store of successful oracle replies under ``cache_dir`` (see the module docstring).

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.cache_dir / CACHE_FILE_NAME
        # Autocommit mode: each `put` is its own transaction, committed before it returns.
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed reply survives a killed or crashed process (the WAL is
        # in the OS page cache); only an OS crash or power loss can drop the last commits, which
        # are then asked again. FULL would fsync per reply (~4 ms), too slow at 100+ replies/s.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedResponse]:
        """The stored replies among ``keys`` (missing keys are simply absent)."""
        unique = list(dict.fromkeys(keys))
        found: dict[str, CachedResponse] = {}
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            chunk = unique[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT cache_key, content, finish_reason, prompt_tokens, completion_tokens,"
                f" cost_usd, model, request_key, created_at FROM responses WHERE cache_key IN ({marks})",
                chunk,
            )
            for key, *fields in rows:
                found[key] = CachedResponse(*fields)
        return found

    def get(self, key: str) -> CachedResponse | None:
        """The stored reply for ``key``, or ``None``."""
        return self.get_many([key]).get(key)

    def put(self, key: str, response: CachedResponse) -> None:
        """Store one reply durably (committed when this returns). A key already stored is kept."""
        self._db.execute(
            "INSERT OR IGNORE INTO responses (cache_key, model, content, finish_reason,"
            " prompt_tokens, completion_tokens, cost_usd, request_key, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                response.model,
                response.content,
                response.finish_reason,
                response.prompt_tokens,
                response.completion_tokens,
                response.cost_usd,
                response.request_key,
                response.created_at or time.time(),
            ),
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def total_cost_usd(self) -> float:
        """What every stored reply cost when it was paid for."""
        return float(
            self._db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM responses").fetchone()[0]
        )

    def close(self) -> None:
        """Close the database (idempotent)."""
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
