"""The oracle client with the real `openai` package against the rule oracle (and two tiny servers):
faults, reruns, budget, secrets, ordering. Every test runs in a few seconds."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qup_ray.config import OracleConfig
from qup_ray.cpu_world import FaultConfig, RuleOracleHandle, generate_problems, solve_problem_text
from qup_ray.oracle import (
    OracleKeyError,
    OracleRequest,
    OracleResult,
    RetryPolicy,
    check_boxed_answer,
    oracle_endpoint,
    run_requests,
    summarize,
    synthesize_messages,
)

SECRET = "sk-test-SECRET-123"
KEY_ENV = "QUP_TEST_ORACLE_KEY"
FAST = RetryPolicy(max_retries=3, malformed_retries=1, backoff_base_s=0.02, backoff_max_s=0.5)


def make_cfg(**overrides) -> OracleConfig:
    fields = {
        "backend": "rule",
        "model": "rule-oracle",
        "max_concurrency": 8,
        "timeout_s": 0.5,
        "max_retries": 3,
        "max_tokens": 512,
        "usd_per_million_prompt_tokens": 1.0,
        "usd_per_million_completion_tokens": 4.0,
    }
    return OracleConfig(**{**fields, **overrides})


def make_requests(n: int, seed: int = 0) -> list[OracleRequest]:
    return [
        OracleRequest(f"p{i}:synthesize", synthesize_messages(row["problem"]))
        for i, row in enumerate(generate_problems(n, seed=seed))
    ]


def faulty(make: Callable[..., RuleOracleHandle], rate: float, seed: int = 0) -> RuleOracleHandle:
    """A rule oracle where `rate` of the requests get each of the four faults."""
    return make(
        FaultConfig(
            rate_429=rate,
            rate_500=rate,
            rate_timeout=rate,
            rate_malformed=rate,
            timeout_delay_s=3.0,
            retry_after_s=0.05,
            seed=seed,
        )
    )


def test_faults_of_every_kind_lose_no_row_and_reruns_pay_only_for_failures(
    tmp_path: Path, rule_oracle_factory
):
    requests = make_requests(80)
    # One retry only, so that some rows fail for good (each does with probability ~0.3^2).
    cfg = make_cfg(max_retries=1)
    policy = RetryPolicy(max_retries=1, malformed_retries=1, backoff_base_s=0.02)
    server = faulty(rule_oracle_factory, 0.075)  # 30% of requests get a fault
    first = run_requests(
        cfg, requests, tmp_path, base_url=server.base_url, check=check_boxed_answer,
        policy=policy, progress=False,
    )  # fmt: skip

    assert set(server.fault_counts) == {"429", "500", "timeout", "malformed"}
    assert [r.key for r in first] == [r.key for r in requests]
    assert {r.status for r in first} <= {"done", "failed"}
    for request, result in zip(requests, first, strict=True):
        if result.status == "done":
            problem = solve_problem_text(request.messages[-1]["content"])
            assert result.content == problem.compact and result.error is None
            assert result.prompt_tokens > 0 and result.completion_tokens > 0 and result.cost_usd > 0
        else:
            assert result.error and result.content is None
    assert sum(r.attempts for r in first) == server.num_requests
    failed = [r.key for r in first if r.status == "failed"]
    assert len(failed) >= 1, "expected some rows to fail (all 80 survive with p < 0.001)"

    # Rerun against a healthy endpoint: only the failed rows are sent, once each.
    healthy = rule_oracle_factory()
    second = run_requests(cfg, requests, tmp_path, base_url=healthy.base_url, progress=False)
    assert healthy.num_requests == len(failed)
    assert all(r.status == "done" for r in second)
    assert [r.key for r in second if not r.cached] == failed
    for before, after in zip(first, second, strict=True):
        if before.status == "done":
            assert after.cached and after.attempts == 0 and after.content == before.content
            # The stored reply's price (not paid again); the first run also paid for any
            # malformed replies before it.
            assert 0 < after.cost_usd <= before.cost_usd

    # A third run sends nothing at all.
    third = run_requests(cfg, requests, tmp_path, base_url=healthy.base_url, progress=False)
    assert healthy.num_requests == len(failed)
    assert all(r.cached and r.status == "done" for r in third)
    assert summarize(third)["spent_usd"] == 0 and summarize(third)["num_http_requests"] == 0


def test_each_fault_kind_is_recorded_as_a_reason(tmp_path: Path, rule_oracle_factory):
    cases = {
        "rate_429": "HTTP 429",
        "rate_500": "HTTP 500",
        "rate_timeout": "timeout",
        "rate_malformed": "malformed reply",
    }
    for field, reason in cases.items():
        server = rule_oracle_factory(
            FaultConfig(**{field: 1.0}, timeout_delay_s=3.0, retry_after_s=0.05)
        )
        [result] = run_requests(
            make_cfg(), make_requests(1), tmp_path / field, base_url=server.base_url,
            check=check_boxed_answer, policy=RetryPolicy(max_retries=1, backoff_base_s=0.01),
            progress=False,
        )  # fmt: skip
        assert result.status == "failed"
        assert result.error.startswith(reason), result.error
        assert result.error.endswith("(after 2 attempts)")
        assert result.attempts == server.num_requests == 2


def test_retry_after_is_honoured(tmp_path: Path, rule_oracle_factory):
    server = rule_oracle_factory(FaultConfig(rate_429=1.0, retry_after_s=0.4))
    started = time.perf_counter()
    [result] = run_requests(
        make_cfg(), make_requests(1), tmp_path, base_url=server.base_url,
        policy=RetryPolicy(max_retries=1, backoff_base_s=0.001), progress=False,
    )  # fmt: skip
    assert result.attempts == 2 and result.status == "failed"
    assert time.perf_counter() - started >= 0.4


def test_malformed_reply_is_retried_once_then_recorded(tmp_path: Path, rule_oracle_factory):
    # Every reply is malformed: empty content (even request numbers) or no final answer (odd).
    server = rule_oracle_factory(FaultConfig(rate_malformed=1.0))
    results = run_requests(
        make_cfg(max_concurrency=1), make_requests(2), tmp_path, base_url=server.base_url,
        check=check_boxed_answer, policy=FAST, progress=False,
    )  # fmt: skip
    assert [r.attempts for r in results] == [2, 2]  # 1 + malformed_retries, not 1 + max_retries
    assert all(r.status == "failed" and r.error.startswith("malformed reply") for r in results)
    assert all(r.cost_usd > 0 for r in results)  # malformed replies were paid for
    # Nothing malformed was cached: a healthy rerun sends both again.
    healthy = rule_oracle_factory()
    run_requests(make_cfg(), make_requests(2), tmp_path, base_url=healthy.base_url, progress=False)
    assert healthy.num_requests == 2


def test_both_kinds_of_malformed_reply_are_caught(tmp_path: Path, rule_oracle_factory):
    server = rule_oracle_factory(FaultConfig(rate_malformed=1.0))
    no_retry = RetryPolicy(max_retries=3, malformed_retries=0)
    empty, unanswered = run_requests(
        make_cfg(max_concurrency=1), make_requests(2), tmp_path, base_url=server.base_url,
        check=check_boxed_answer, policy=no_retry, progress=False,
    )  # fmt: skip
    assert empty.error == "malformed reply: empty content (finish_reason=stop) (after 1 attempts)"
    assert unanswered.error == "malformed reply: no \\boxed{} final answer (after 1 attempts)"


def test_budget_stops_sending_and_a_larger_budget_finishes(tmp_path: Path, rule_oracle_factory):
    requests = make_requests(12)
    prices = {"usd_per_million_prompt_tokens": 1e5, "usd_per_million_completion_tokens": 1e5}
    cfg = make_cfg(max_concurrency=1, budget_usd=15.0, **prices)  # about 4 requests' worth
    server = rule_oracle_factory()
    first = run_requests(cfg, requests, tmp_path, base_url=server.base_url, progress=False)

    done = [r for r in first if r.status == "done"]
    skipped = [r for r in first if r.status == "skipped_budget"]
    assert len(done) + len(skipped) == len(requests) and done and skipped
    assert server.num_requests == len(done)
    spent = sum(r.cost_usd for r in done)
    # One request at a time: sending stops at the first moment the budget is reached.
    assert spent >= 15.0 and spent - done[-1].cost_usd < 15.0
    assert all(r.attempts == 0 and r.content is None and "budget" in r.error for r in skipped)
    assert [r.status for r in first] == ["done"] * len(done) + ["skipped_budget"] * len(skipped)

    bigger = make_cfg(max_concurrency=4, budget_usd=1000.0, **prices)
    second = run_requests(bigger, requests, tmp_path, base_url=server.base_url, progress=False)
    assert all(r.status == "done" for r in second)
    assert server.num_requests == len(requests)  # the done rows were not paid again
    assert [r.cached for r in second] == [True] * len(done) + [False] * len(skipped)
    summary = summarize(second)
    assert summary["cached_cost_usd"] == pytest.approx(spent)
    assert summary["spent_usd"] == pytest.approx(sum(r.cost_usd for r in second[len(done) :]))


def test_order_duplicates_and_samples(tmp_path: Path, rule_oracle_factory):
    base = make_requests(5)
    duplicate = OracleRequest("p0:again", base[0].messages)
    sampled = OracleRequest("p0:sample1", base[0].messages, sample=1)
    requests = [*base[::-1], duplicate, sampled]
    server = rule_oracle_factory()
    results = run_requests(make_cfg(), requests, tmp_path, base_url=server.base_url, progress=False)
    assert [r.key for r in results] == [r.key for r in requests]
    assert server.num_requests == 6  # the duplicate shares p0's reply; sample 1 is its own
    by_key = {r.key: r for r in results}
    assert by_key["p0:again"].content == by_key["p0:synthesize"].content
    assert by_key["p0:again"].attempts == 0 and by_key["p0:again"].cached
    assert by_key["p0:sample1"].attempts == 1


def test_rule_backend_starts_its_own_oracle(tmp_path: Path):
    results = run_requests(make_cfg(), make_requests(3), tmp_path, progress=False)
    assert [r.status for r in results] == ["done"] * 3
    with oracle_endpoint(make_cfg()) as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    with oracle_endpoint(make_cfg(backend="openai", base_url="https://example.invalid/v1")) as url:
        assert url == "https://example.invalid/v1"
    with pytest.raises(ValueError, match="base_url"), oracle_endpoint(make_cfg(backend="vllm")):
        pass


def test_empty_request_list(tmp_path: Path):
    assert run_requests(make_cfg(), [], tmp_path, base_url="http://127.0.0.1:9/v1") == []


# ------------------------------------------------------------------------------ secrets


class _EchoKeyHandler(BaseHTTPRequestHandler):
    """A careless endpoint: refuses every request with 401 and echoes the key it was sent."""

    protocol_version = "HTTP/1.1"
    count = 0

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        type(self).count += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization", "")
        body = json.dumps(
            {"error": {"message": f"Incorrect API key provided: {auth}", "type": "auth"}}
        ).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def echo_key_server() -> Iterator[str]:
    _EchoKeyHandler.count = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoKeyHandler)
    server.daemon_threads = True  # do not wait for idle keep-alive connections at close
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_api_key_never_reaches_files_logs_or_errors(
    tmp_path: Path, rule_oracle_factory, echo_key_server: str, monkeypatch, caplog, capsys
):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)  # every logger, the openai and HTTP libraries' included
    cfg = make_cfg(api_key_env=KEY_ENV, backend="openai", base_url="http://unused.invalid/v1")
    server = faulty(rule_oracle_factory, 0.1)
    results: list[OracleResult] = run_requests(
        cfg, make_requests(20), tmp_path / "cache", base_url=server.base_url,
        check=check_boxed_answer, policy=FAST, progress=True,
    )  # fmt: skip
    assert server.num_requests >= 20

    # An endpoint that echoes the key in its error message: the recorded reason is redacted,
    # and the run stops sending after the refusal instead of failing every row one by one.
    refused = run_requests(
        make_cfg(api_key_env=KEY_ENV, max_concurrency=1), make_requests(5),
        tmp_path / "refused", base_url=echo_key_server, policy=FAST, progress=True,
    )  # fmt: skip
    assert all(r.status == "failed" for r in refused)
    assert "Incorrect API key provided: Bearer ***" in refused[0].error
    assert all("not sent" in r.error for r in refused[1:]) and _EchoKeyHandler.count == 1
    results += refused

    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(OracleKeyError, match=KEY_ENV) as missing:
        run_requests(cfg, make_requests(1), tmp_path / "fresh", base_url=server.base_url)

    captured = capsys.readouterr()
    texts = [caplog.text, captured.out, captured.err, str(missing.value)]
    texts += [json.dumps(r.to_row()) for r in results]
    assert "oracle rule-oracle" in captured.err  # the progress bar was shown (and checked)
    assert all(SECRET not in text for text in texts)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(SECRET.encode() not in p.read_bytes() for p in files)
