"""The oracle client: many chat requests to an OpenAI-compatible endpoint, none paid twice, none lost.

Every request comes back as exactly one ``OracleResult``, in the order given:

- ``done``: the reply's content, tokens and cost. Stored in the response cache the moment it
  arrives, so a rerun returns it with ``cached=True`` and sends nothing.
- ``failed``: every attempt failed; ``error`` says why (redacted of the API key). Not cached, so
  a rerun asks again.
- ``skipped_budget``: not sent because ``budget_usd`` was spent. Not cached either: a rerun with a
  higher budget finishes these rows.

The budget caps what one call spends; cached replies cost nothing. No request is sent once the
spending reaches it, but requests already in flight complete (and are paid for), so a call can
overshoot by at most ``max_concurrency`` replies.

Retries are this module's, not the ``openai`` library's (``max_retries=0`` there), so that each
one is counted (``attempts``) and follows ``retry.RetryPolicy``. At most ``max_concurrency``
requests are in flight: as many workers, each taking the next request when its last one is
finished, including its backoff waits, so a rate-limited endpoint sees less load, not more.

From synchronous code::

    results = run_requests(cfg, [OracleRequest("p1:refine", messages)], cache_dir)

From async code, ``OracleClient(cfg, cache, base_url=...).complete_many(requests)``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import openai
from openai.types.chat import ChatCompletion
from tqdm import tqdm

from qup_ray.config import OracleConfig
from qup_ray.oracle.cache import CachedResponse, ResponseCache, cache_key
from qup_ray.oracle.endpoint import oracle_endpoint, redact, resolve_api_key
from qup_ray.oracle.retry import ErrorVerdict, RetryPolicy, classify_error

logger = logging.getLogger(__name__)

Status = Literal["done", "failed", "skipped_budget"]
ReplyCheck = Callable[[str], str | None]
"""A check of a reply's content: ``None`` when usable, else the reason it is not (the reply is
then treated as malformed: retried, never cached)."""


@dataclass(frozen=True)
class OracleRequest:
    """One chat request; ``key`` is the caller's row id (e.g. ``f"{problem_id}:refine"``)."""

    key: str
    messages: list[dict[str, Any]]
    sample: int = 0
    """Index of an independent sample of the same messages. Requests with equal messages and
    sample share one reply (and one cache entry); give samples distinct indices to get several."""


@dataclass(frozen=True)
class OracleResult:
    """The outcome of one ``OracleRequest`` (see the module docstring for the statuses)."""

    key: str
    status: Status
    content: str | None
    error: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    """For fresh rows, what this run paid for the row (malformed replies included); for cached
    rows, what the stored reply cost when it was paid for (not paid again)."""
    attempts: int = 0
    """HTTP requests sent for this row in this run (0 when cached)."""
    cached: bool = False
    finish_reason: str | None = None

    def to_row(self) -> dict[str, Any]:
        """A flat dict, e.g. for a Parquet table of results."""
        return asdict(self)


@dataclass
class _Ledger:
    """Running totals of one ``complete_many`` call (single event loop: no locking needed)."""

    budget_usd: float | None
    spent_usd: float = 0.0
    num_cached: int = 0
    num_failed: int = 0
    fatal: str | None = None
    warned_no_usage: bool = False
    rng: random.Random = field(default_factory=random.Random)

    def over_budget(self) -> bool:
        return self.budget_usd is not None and self.spent_usd >= self.budget_usd


def sampling_params(cfg: OracleConfig) -> dict[str, Any]:
    """The sampling parameters of ``cfg``'s requests, as hashed into cache keys."""
    return {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}


def request_cache_key(cfg: OracleConfig, request: OracleRequest) -> str:
    """The response-cache key of ``request`` to ``cfg``'s oracle (shared by every backend)."""
    params = sampling_params(cfg)
    if request.sample:
        params["sample"] = request.sample
    return cache_key(cfg.model, request.messages, params)


class OracleClient:
    """Sends ``OracleRequest``s for one oracle config, through the response cache in ``cache``."""

    def __init__(
        self,
        cfg: OracleConfig,
        cache: ResponseCache,
        *,
        base_url: str | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self.base_url = base_url or cfg.base_url
        if not self.base_url:
            raise ValueError(
                f"no base_url for oracle {cfg.model!r}: pass one, or use oracle_endpoint(cfg)"
            )
        self.policy = policy or RetryPolicy(max_retries=cfg.max_retries)

    def cache_key(self, request: OracleRequest) -> str:
        """The response-cache key of ``request``."""
        return request_cache_key(self.cfg, request)

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Price of one reply under the config's per-million-token prices."""
        return (
            prompt_tokens * self.cfg.usd_per_million_prompt_tokens
            + completion_tokens * self.cfg.usd_per_million_completion_tokens
        ) / 1e6

    def _body(self, request: OracleRequest) -> dict[str, Any]:
        # The JSON body as sent. `client.post` (the SDK's way to send a body as is) rather than
        # `chat.completions.create`, whose per-request type-driven walk over the messages costs
        # about 1 ms of CPU and changes nothing for plain chat messages.
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": request.messages,
            "max_completion_tokens": self.cfg.max_tokens,
        }
        if self.cfg.temperature is not None:
            body["temperature"] = self.cfg.temperature
        return body

    async def complete_many(
        self,
        requests: Sequence[OracleRequest],
        *,
        check: ReplyCheck | None = None,
        progress: bool = True,
    ) -> list[OracleResult]:
        """One result per request, in order: from the cache, or asked of the endpoint."""
        _quiet_http_request_logs()
        started = time.perf_counter()
        results: list[OracleResult | None] = [None] * len(requests)
        ledger = _Ledger(budget_usd=self.cfg.budget_usd)

        # Identical requests (same cache key) are sent once; every row gets the reply.
        keys = [self.cache_key(r) for r in requests]
        stored = self.cache.get_many(keys)
        pending: dict[str, list[int]] = {}
        for i, (request, key) in enumerate(zip(requests, keys, strict=True)):
            if key in stored:
                results[i] = _cached_result(request.key, stored[key])
                ledger.num_cached += 1
            else:
                pending.setdefault(key, []).append(i)
        queue = deque(pending.items())
        # Read the key now (not at start-up), and only when something must be sent: a rerun
        # served from the cache needs no key.
        api_key = resolve_api_key(self.cfg) if queue else ""

        bar = tqdm(
            total=len(requests),
            initial=ledger.num_cached,
            disable=not progress,
            desc=f"oracle {self.cfg.model}",
            unit="req",
            dynamic_ncols=True,
            # In a job log (no terminal) every refresh is another line: refresh rarely there.
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )

        async def worker(client: openai.AsyncOpenAI) -> None:
            while queue:
                key, indices = queue.popleft()
                first = requests[indices[0]]
                result = await self._complete_one(client, first, key, check, ledger, api_key)
                results[indices[0]] = result
                for i in indices[1:]:  # duplicates: the same outcome, not paid again
                    if result.status == "done":
                        results[i] = replace(result, key=requests[i].key, attempts=0, cached=True)
                    else:
                        results[i] = replace(
                            result, key=requests[i].key, attempts=0, cost_usd=0.0,
                            prompt_tokens=0, completion_tokens=0,
                        )  # fmt: skip
                ledger.num_failed += (result.status == "failed") * len(indices)
                bar.update(len(indices))
                bar.set_postfix_str(
                    f"${ledger.spent_usd:.4f} spent, {ledger.num_cached} cached,"
                    f" {ledger.num_failed} failed",
                    refresh=False,
                )

        try:
            if queue:
                async with openai.AsyncOpenAI(
                    api_key=api_key,
                    base_url=self.base_url,
                    max_retries=0,  # retries are ours: counted, logged, budget-aware
                    timeout=self.cfg.timeout_s,
                ) as client:
                    num_workers = min(self.cfg.max_concurrency, len(queue))
                    await asyncio.gather(*(worker(client) for _ in range(num_workers)))
        finally:
            bar.close()

        done = [r for r in results if r is not None]
        if len(done) != len(requests):  # a bug, never a condition of the endpoint
            raise RuntimeError(f"{len(requests) - len(done)} requests came back without a result")
        _log_summary(self.cfg.model, done, time.perf_counter() - started)
        return done

    async def _complete_one(
        self,
        client: openai.AsyncOpenAI,
        request: OracleRequest,
        key: str,
        check: ReplyCheck | None,
        ledger: _Ledger,
        api_key: str,
    ) -> OracleResult:
        """Send one request until it succeeds, fails for good, or the budget is spent."""
        attempts = num_malformed = prompt_tokens = completion_tokens = 0
        paid_usd = 0.0
        reason: str | None = None

        def end(status: Status, error: str | None) -> OracleResult:
            return OracleResult(
                key=request.key,
                status=status,
                content=None,
                error=error,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cost_usd=paid_usd,
                attempts=attempts,
            )

        while True:
            if ledger.fatal:
                return end(
                    "failed", f"not sent: the endpoint refused an earlier request ({ledger.fatal})"
                )
            if ledger.over_budget():
                note = f"; last attempt: {reason}" if reason else ""
                return end(
                    "skipped_budget",
                    f"budget_usd {ledger.budget_usd:g} reached (${ledger.spent_usd:.4f} spent){note}",
                )
            attempts += 1
            try:
                # A total deadline on top of the client's timeout, which httpx applies per read.
                async with asyncio.timeout(self.cfg.timeout_s):
                    response = await client.post(
                        "/chat/completions", body=self._body(request), cast_to=ChatCompletion
                    )
            except Exception as exc:  # every failure becomes a verdict; nothing escapes a row
                verdict = classify_error(exc)
                if verdict.verdict == "fail" and not isinstance(exc, openai.APIError):
                    logger.error("unexpected error on %s", request.key, exc_info=True)
            else:
                usage = getattr(response, "usage", None)
                p_tok = int(getattr(usage, "prompt_tokens", 0) or 0)
                c_tok = int(getattr(usage, "completion_tokens", 0) or 0)
                if usage is None and not ledger.warned_no_usage:
                    ledger.warned_no_usage = True
                    logger.warning("the endpoint returns no usage: cost and budget count $0")
                cost = self.cost_usd(p_tok, c_tok)
                prompt_tokens += p_tok
                completion_tokens += c_tok
                paid_usd += cost
                ledger.spent_usd += cost
                content, finish_reason, problem = _reply_content(response)
                if problem is None and check is not None:
                    problem = _run_check(check, content)  # type: ignore[arg-type]
                if problem is None:
                    self.cache.put(
                        key,
                        CachedResponse(
                            content=content,  # type: ignore[arg-type]
                            finish_reason=finish_reason,
                            prompt_tokens=p_tok,
                            completion_tokens=c_tok,
                            cost_usd=cost,
                            model=str(getattr(response, "model", None) or self.cfg.model),
                            request_key=request.key,
                        ),
                    )
                    return replace(end("done", None), content=content, finish_reason=finish_reason)
                verdict = ErrorVerdict("malformed", f"malformed reply: {problem}")

            reason = redact(verdict.reason, api_key)
            if verdict.verdict == "fatal":
                if not ledger.fatal:
                    logger.error("oracle %s refuses requests, stopping: %s", self.cfg.model, reason)
                ledger.fatal = reason
                return end("failed", reason)
            if verdict.verdict == "fail":
                return end("failed", reason)
            if verdict.verdict == "malformed":
                num_malformed += 1
                if num_malformed > self.policy.malformed_retries:
                    return end("failed", f"{reason} (after {attempts} attempts)")
            if attempts > self.policy.max_retries:
                return end("failed", f"{reason} (after {attempts} attempts)")
            delay_s = self.policy.delay_s(attempts, verdict.retry_after_s, ledger.rng)
            logger.debug("%s: %s; retry %d in %.2f s", request.key, reason, attempts, delay_s)
            await asyncio.sleep(delay_s)


def _quiet_http_request_logs() -> None:
    """Silence httpx's one INFO line per request (100k lines per stream), unless the user chose a
    level for those loggers."""
    for name in ("httpx", "httpx2"):
        http_logger = logging.getLogger(name)
        if http_logger.level == logging.NOTSET:
            http_logger.setLevel(logging.WARNING)


def _run_check(check: ReplyCheck, content: str) -> str | None:
    try:
        return check(content)
    except Exception as exc:  # a broken check must not take the other rows down with it
        logger.error("reply check %r raised", check, exc_info=True)
        return f"the reply check raised {type(exc).__name__}: {exc}"


def _reply_content(response: Any) -> tuple[str | None, str | None, str | None]:
    """(content, finish_reason, problem) of a chat completion; ``problem`` is ``None`` when usable."""
    choices = getattr(response, "choices", None)
    if not choices:
        return None, None, "no choices"
    finish_reason = getattr(choices[0], "finish_reason", None)
    content = getattr(getattr(choices[0], "message", None), "content", None)
    if not isinstance(content, str) or not content.strip():
        return None, finish_reason, f"empty content (finish_reason={finish_reason})"
    return content, finish_reason, None


def _cached_result(key: str, stored: CachedResponse) -> OracleResult:
    return OracleResult(
        key=key,
        status="done",
        content=stored.content,
        error=None,
        prompt_tokens=stored.prompt_tokens,
        completion_tokens=stored.completion_tokens,
        cost_usd=stored.cost_usd,
        attempts=0,
        cached=True,
        finish_reason=stored.finish_reason,
    )


def summarize(results: Sequence[OracleResult]) -> dict[str, Any]:
    """Counts, tokens and money of a batch of results (for logs and stage manifests)."""
    fresh = [r for r in results if not r.cached]
    reasons = Counter((r.error or "").split(" (after")[0] for r in results if r.status == "failed")
    return {
        "num_requests": len(results),
        "num_done": sum(r.status == "done" for r in results),
        "num_failed": sum(r.status == "failed" for r in results),
        "num_skipped_budget": sum(r.status == "skipped_budget" for r in results),
        "num_cached": len(results) - len(fresh),
        "num_http_requests": sum(r.attempts for r in results),
        "prompt_tokens": sum(r.prompt_tokens for r in fresh),
        "completion_tokens": sum(r.completion_tokens for r in fresh),
        "spent_usd": round(sum(r.cost_usd for r in fresh), 6),
        "cached_cost_usd": round(sum(r.cost_usd for r in results if r.cached), 6),
        "failure_reasons": dict(reasons.most_common(10)),
    }


def _log_summary(model: str, results: Sequence[OracleResult], elapsed_s: float) -> None:
    s = summarize(results)
    logger.info(
        "oracle %s: %d requests in %.1f s: %d done (%d cached), %d failed, %d skipped (budget);"
        " %d HTTP requests, $%.4f spent, $%.4f of cached replies not paid again",
        model,
        s["num_requests"],
        elapsed_s,
        s["num_done"],
        s["num_cached"],
        s["num_failed"],
        s["num_skipped_budget"],
        s["num_http_requests"],
        s["spent_usd"],
        s["cached_cost_usd"],
    )
    if s["num_failed"]:
        logger.warning("oracle %s: failure reasons %s", model, s["failure_reasons"])


def run_requests(
    cfg: OracleConfig,
    requests: Sequence[OracleRequest],
    cache_dir: str | Path,
    *,
    check: ReplyCheck | None = None,
    progress: bool = True,
    base_url: str | None = None,
    policy: RetryPolicy | None = None,
) -> list[OracleResult]:
    """Synchronous ``complete_many``: opens the cache in ``cache_dir`` and the oracle's endpoint
    (starting the rule oracle for ``backend: rule``) unless ``base_url`` is given."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_requests was called inside an event loop: await complete_many")
    if not requests:
        return []
    with ResponseCache(cache_dir) as cache:
        if base_url:
            client = OracleClient(cfg, cache, base_url=base_url, policy=policy)
            return asyncio.run(client.complete_many(requests, check=check, progress=progress))
        with oracle_endpoint(cfg) as url:
            client = OracleClient(cfg, cache, base_url=url, policy=policy)
            return asyncio.run(client.complete_many(requests, check=check, progress=progress))
