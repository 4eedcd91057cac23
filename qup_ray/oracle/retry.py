"""When an oracle request is retried, and how long to wait first.

Pure functions over the ``openai`` package's exceptions, so the policy can be read (and tested)
apart from the client:

- ``retry``: 429 (rate limit), 408, 409, 5xx, timeouts and connection errors. The wait is the
  server's ``Retry-After`` when it sends one, else exponential backoff with full jitter.
- ``malformed``: a 200 reply without a usable message (no choices, empty content, or content the
  caller's check rejects). Retried ``malformed_retries`` times, since a paid reply is at stake.
- ``fatal``: the endpoint refuses every request alike (bad key 401, 403, unknown model 404, quota
  exhausted 429 ``insufficient_quota``); the run stops sending instead of failing 100k rows one by
  one.
- ``fail``: this request is bad (400, 413, 422, ...); retrying would give the same answer.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from dataclasses import dataclass
from typing import Literal

import openai

Verdict = Literal["retry", "malformed", "fatal", "fail"]
_MAX_REASON_CHARS = 400


@dataclass(frozen=True)
class RetryPolicy:
    """Retry limits and backoff of oracle requests."""

    max_retries: int = 6
    """Retries after the first attempt, over all kinds of failure."""
    malformed_retries: int = 1
    """Retries of a malformed reply (counted within ``max_retries``); it was paid for."""
    backoff_base_s: float = 1.0
    """Upper bound of the first backoff; doubles with every retry (full jitter below it)."""
    backoff_max_s: float = 60.0
    """Cap of one wait, also of a server's ``Retry-After``."""

    def delay_s(self, retry: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Wait before retry number ``retry`` (1 for the first retry)."""
        if retry_after_s is not None:
            # Honour the server, plus up to 20% so that every waiting task does not come back
            # in the same instant.
            wait = min(retry_after_s, self.backoff_max_s)
            return wait * (1.0 + 0.2 * rng.random())
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (retry - 1))
        return rng.uniform(0.0, ceiling)


@dataclass(frozen=True)
class ErrorVerdict:
    """What to do after a failed attempt, and the reason recorded if it is the last."""

    verdict: Verdict
    reason: str
    retry_after_s: float | None = None


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``Retry-After``), or ``None``."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000.0
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:  # an HTTP date
            value = email.utils.parsedate_to_datetime(raw).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, value) if math.isfinite(value) else None


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def classify_error(exc: BaseException) -> ErrorVerdict:
    """The verdict on one failed attempt (see the module docstring)."""
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        return ErrorVerdict("retry", "timeout")
    if isinstance(exc, openai.APIConnectionError):
        return ErrorVerdict("retry", _short(f"connection error: {exc}"))
    if isinstance(exc, openai.APIResponseValidationError):
        return ErrorVerdict("malformed", _short(f"malformed reply: {exc}"))
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        reason = _short(f"HTTP {status}: {exc.message}")
        wait = retry_after_s(exc)
        if status == 429 and exc.code == "insufficient_quota":
            return ErrorVerdict("fatal", reason)
        if status in (408, 409, 429) or status >= 500:
            return ErrorVerdict("retry", reason, wait)
        if status in (401, 403, 404):
            return ErrorVerdict("fatal", reason)
        return ErrorVerdict("fail", reason)
    return ErrorVerdict("fail", _short(f"unexpected {type(exc).__name__}: {exc}"))
