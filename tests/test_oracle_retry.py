"""The oracle's retry policy: which failures are retried, fail, or stop the run; how long it waits."""

from __future__ import annotations

import email.utils
import random
import time

import openai
import pytest

try:  # the HTTP library under the installed openai (some builds ship it as httpx2)
    import httpx2 as httpx
except ImportError:
    import httpx

from qup_ray.oracle.retry import RetryPolicy, classify_error, retry_after_s

REQUEST = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")


def status_error(status: int, headers: dict | None = None, body: dict | None = None):
    response = httpx.Response(status, headers=headers or {}, request=REQUEST)
    classes = {
        400: openai.BadRequestError,
        401: openai.AuthenticationError,
        403: openai.PermissionDeniedError,
        404: openai.NotFoundError,
        408: openai.APIStatusError,
        409: openai.ConflictError,
        422: openai.UnprocessableEntityError,
        429: openai.RateLimitError,
    }
    cls = classes.get(status, openai.InternalServerError)
    return cls(f"Error code: {status}", response=response, body=body)


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (status_error(429), "retry"),
        (status_error(500), "retry"),
        (status_error(502), "retry"),
        (status_error(503), "retry"),
        (status_error(408), "retry"),
        (status_error(409), "retry"),
        (openai.APITimeoutError(request=REQUEST), "retry"),
        (TimeoutError(), "retry"),
        (openai.APIConnectionError(request=REQUEST), "retry"),
        (status_error(401), "fatal"),
        (status_error(403), "fatal"),
        (status_error(404), "fatal"),
        (status_error(429, body={"code": "insufficient_quota"}), "fatal"),
        (status_error(400), "fail"),
        (status_error(422), "fail"),
        (ValueError("something odd"), "fail"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_classify_error(exc: BaseException, verdict: str):
    result = classify_error(exc)
    assert result.verdict == verdict
    assert result.reason


def test_reasons_name_the_status():
    assert classify_error(status_error(500)).reason.startswith("HTTP 500")
    assert classify_error(openai.APITimeoutError(request=REQUEST)).reason == "timeout"


def test_retry_after_headers():
    assert retry_after_s(status_error(429, {"retry-after-ms": "250"})) == pytest.approx(0.25)
    assert retry_after_s(status_error(429, {"Retry-After": "2"})) == pytest.approx(2.0)
    # retry-after-ms is the more precise of the two when a server sends both (OpenAI does).
    both = status_error(429, {"Retry-After": "1", "retry-after-ms": "1500"})
    assert retry_after_s(both) == pytest.approx(1.5)
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_s(status_error(429, {"Retry-After": date})) <= 31
    assert retry_after_s(status_error(429, {"Retry-After": "soon"})) is None
    assert retry_after_s(status_error(429)) is None
    assert retry_after_s(TimeoutError()) is None


def test_classified_429_carries_retry_after():
    verdict = classify_error(status_error(429, {"Retry-After": "3"}))
    assert verdict.verdict == "retry"
    assert verdict.retry_after_s == pytest.approx(3.0)


def test_backoff_is_exponential_with_full_jitter():
    policy = RetryPolicy(backoff_base_s=1.0, backoff_max_s=10.0)
    rng = random.Random(0)
    for retry, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)]:
        delays = [policy.delay_s(retry, None, rng) for _ in range(300)]
        assert min(delays) >= 0 and max(delays) <= ceiling
        assert max(delays) > 0.8 * ceiling  # the whole range is used, not a fixed delay
        assert min(delays) < 0.2 * ceiling


def test_retry_after_is_honoured_and_capped():
    policy = RetryPolicy(backoff_base_s=0.01, backoff_max_s=5.0)
    rng = random.Random(0)
    delays = [policy.delay_s(1, 2.0, rng) for _ in range(100)]
    assert min(delays) >= 2.0 and max(delays) <= 2.4
    assert policy.delay_s(1, 3600.0, rng) <= 6.0
