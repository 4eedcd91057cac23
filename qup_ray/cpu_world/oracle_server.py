"""The rule oracle: an OpenAI-compatible chat-completions server that solves synthetic problems.

Stands in for GPT-5.2 in the dry run and the tests; the real ``openai`` client talks to it.
Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``. What it answers
is decided by ``oracle_rules`` (compact style, native style when the request asks to keep the
student's style, ``Score: N`` for retention-judge requests).

It can inject faults at seeded rates (429 with ``Retry-After``, 500, replies slower than a
client timeout, malformed replies) and add a fixed latency for benchmarks. Whether request
number ``i`` (counted from 0 in arrival order) gets a fault depends only on ``(seed, i)``, so
the number of each fault over ``n`` requests is reproducible even under concurrency.

From Python::

    with start_rule_oracle(faults=FaultConfig(rate_429=0.1, seed=0)) as oracle:
        client = openai.OpenAI(base_url=oracle.base_url, api_key="unused")

From a shell: ``python -m qup_ray.cpu_world.oracle_server --port 8000 [--fault-rate 0.05]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

from qup_ray.cpu_world.oracle_rules import count_tokens, message_texts, oracle_reply, strip_answer

logger = logging.getLogger(__name__)

MODEL_ID = "rule-oracle"
Fault = Literal["429", "500", "timeout", "malformed"]


@dataclass(frozen=True)
class FaultConfig:
    """Seeded fault injection and added latency of the rule oracle (all rates per request)."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    rate_malformed: float = 0.0
    timeout_delay_s: float = 30.0
    """How long a "timeout" reply is held back; set it above the client's timeout."""
    retry_after_s: float = 1.0
    """Value of the ``Retry-After`` header sent with a 429."""
    latency_s: float = 0.0
    """Added to every chat completion (benchmarks of the oracle stage)."""
    seed: int = 0

    def __post_init__(self) -> None:
        rates = (self.rate_429, self.rate_500, self.rate_timeout, self.rate_malformed)
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError(f"fault rates must be >= 0 and sum to at most 1, got {rates}")

    def fault_for(self, index: int) -> Fault | None:
        """The fault injected into request number ``index``, or ``None``."""
        u = random.Random(f"{self.seed}:{index}").random()
        for fault, rate in (
            ("429", self.rate_429),
            ("500", self.rate_500),
            ("timeout", self.rate_timeout),
            ("malformed", self.rate_malformed),
        ):
            if u < rate:
                return fault  # type: ignore[return-value]
            u -= rate
        return None


class _OracleHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # bursts of hundreds of concurrent connections must not be refused

    def __init__(self, address: tuple[str, int], faults: FaultConfig) -> None:
        super().__init__(address, _Handler)
        self.faults = faults
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.num_requests = 0
        self.fault_counts: Counter[str] = Counter()
        self.kind_counts: Counter[str] = Counter()

    def next_request(self) -> tuple[int, Fault | None]:
        with self.lock:
            index = self.num_requests
            self.num_requests += 1
            fault = self.faults.fault_for(index)
            if fault:
                self.fault_counts[fault] += 1
        return index, fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    # Headers and body go out as two writes; with Nagle's algorithm the second waits for the
    # client's delayed ACK, adding ~40 ms to every reply.
    disable_nagle_algorithm = True
    server: _OracleHTTPServer

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("client went away before the reply")  # e.g. after a client timeout

    def _error(self, status: int, message: str, kind: str, headers: dict | None = None) -> None:
        self._send_json(
            status, {"error": {"message": message, "type": kind, "code": status}}, headers
        )

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/v1/models":
            model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "qup_ray"}
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._error(404, f"no route {self.path}", "not_found_error")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found_error")
            return
        try:
            request = json.loads(raw)
            messages = request["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise TypeError("messages must be a list of objects")
            n = max(1, int(request.get("n") or 1))
            max_tokens = request.get("max_completion_tokens") or request.get("max_tokens")
            max_tokens = int(max_tokens) if max_tokens else None
        except (ValueError, KeyError, TypeError) as exc:
            self._error(400, f"bad request: {exc}", "invalid_request_error")
            return
        if request.get("stream"):
            self._error(400, "the rule oracle does not stream", "invalid_request_error")
            return

        index, fault = self.server.next_request()
        faults = self.server.faults
        if faults.latency_s:
            self.server.stopping.wait(faults.latency_s)
        if fault == "429":
            retry = {
                "Retry-After": f"{faults.retry_after_s:g}",
                "retry-after-ms": f"{faults.retry_after_s * 1000:g}",
            }
            self._error(429, "rate limited (injected)", "rate_limit_error", retry)
            return
        if fault == "500":
            self._error(500, "internal error (injected)", "server_error")
            return
        if fault == "timeout":
            self.server.stopping.wait(faults.timeout_delay_s)

        kind, text = oracle_reply(messages)
        with self.server.lock:
            self.server.kind_counts[kind] += 1
        finish = "stop"
        if fault == "malformed":
            # Alternate the two malformed shapes: no content at all, and no final answer.
            text = "" if index % 2 == 0 else strip_answer(text)
        if max_tokens and count_tokens(text) > max_tokens:
            text, finish = " ".join(text.split()[:max_tokens]), "length"
        prompt_tokens = sum(count_tokens(t) for t in message_texts(messages))
        completion_tokens = count_tokens(text)
        self._send_json(
            200,
            {
                "id": f"chatcmpl-rule-{index}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.get("model") or MODEL_ID,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                    for i in range(n)
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": n * completion_tokens,
                    "total_tokens": prompt_tokens + n * completion_tokens,
                },
            },
        )


class RuleOracleHandle:
    """A running rule oracle (serving in a background thread); a context manager that stops it."""

    def __init__(self, server: _OracleHTTPServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        host, port = server.server_address[:2]
        self.host: str = host
        self.port: int = port
        self.base_url: str = f"http://{host}:{port}/v1"
        """OpenAI ``base_url`` of the server (ends in ``/v1``)."""

    @property
    def faults(self) -> FaultConfig:
        return self._server.faults

    @property
    def num_requests(self) -> int:
        """Chat-completion requests received so far."""
        return self._server.num_requests

    @property
    def fault_counts(self) -> dict[str, int]:
        """Injected faults so far, by kind ("429", "500", "timeout", "malformed")."""
        with self._server.lock:
            return dict(self._server.fault_counts)

    @property
    def kind_counts(self) -> dict[str, int]:
        """Answered requests so far, by kind ("solve", "style_aligned", "judge", "unrecognised")."""
        with self._server.lock:
            return dict(self._server.kind_counts)

    def stop(self) -> None:
        """Stop serving, wake held-back replies and close the socket (idempotent)."""
        if self._server.stopping.is_set():
            return
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> RuleOracleHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_rule_oracle(
    host: str = "127.0.0.1", port: int = 0, faults: FaultConfig | None = None
) -> RuleOracleHandle:
    """Start a rule oracle in a background thread; ``port=0`` picks a free port."""
    server = _OracleHTTPServer((host, port), faults or FaultConfig())
    thread = threading.Thread(target=server.serve_forever, name="rule-oracle", daemon=True)
    thread.start()
    handle = RuleOracleHandle(server, thread)
    logger.info("rule oracle serving at %s (faults %s)", handle.base_url, asdict(server.faults))
    return handle


def serve(host: str = "127.0.0.1", port: int = 8000, faults: FaultConfig | None = None) -> None:
    """Run a rule oracle in the foreground until SIGINT or SIGTERM."""
    handle = start_rule_oracle(host, port, faults)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"rule oracle listening on {handle.base_url}", flush=True)  # scripts read the port
    done.wait()
    handle.stop()
    logger.info("rule oracle stopped after %d requests", handle.num_requests)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m qup_ray.cpu_world.oracle_server --port N [fault options]``."""
    parser = argparse.ArgumentParser(prog="qup-rule-oracle", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument(
        "--fault-rate", type=float, default=0.0, help="default rate of each fault kind"
    )
    for kind in ("429", "500", "timeout", "malformed"):
        parser.add_argument(
            f"--rate-{kind}", type=float, default=None, help=f"rate of {kind} faults"
        )
    parser.add_argument("--timeout-delay-s", type=float, default=30.0)
    parser.add_argument("--retry-after-s", type=float, default=1.0)
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )

    def rate(value: float | None) -> float:
        return args.fault_rate if value is None else value

    try:
        faults = FaultConfig(
            rate_429=rate(args.rate_429),
            rate_500=rate(args.rate_500),
            rate_timeout=rate(args.rate_timeout),
            rate_malformed=rate(args.rate_malformed),
            timeout_delay_s=args.timeout_delay_s,
            retry_after_s=args.retry_after_s,
            latency_s=args.latency_s,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    serve(args.host, args.port, faults)
    return 0


if __name__ == "__main__":
    sys.exit(main())
