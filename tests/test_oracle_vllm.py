"""The oracle client against a real vLLM OpenAI-compatible server on CPU (the CPU world's tiny
student as the "oracle"). Slow: the server takes about 30 s to start; it is started once for the
module and killed at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from qup_ray.config import OracleConfig
from qup_ray.cpu_world import generate_problems
from qup_ray.oracle import OracleRequest, run_requests, summarize, synthesize_messages

pytestmark = pytest.mark.slow

MODEL_NAME = "tiny-qwen2"
START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_server(cpu_world: dict[str, Path], tmp_path_factory) -> Iterator[str]:
    """A vLLM OpenAI-compatible server of the tiny student; yields its base_url."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(cpu_world[MODEL_NAME]), "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager",
        "--kv-cache-memory-bytes", str(256 << 20), "--max-num-batched-tokens", "16384",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        # A session of its own, so that the server's engine processes go down with it.
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"vLLM server did not start (exit code {proc.poll()}):\n{tail}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_chat_completion_through_the_client(vllm_server: str, tmp_path: Path):
    cfg = OracleConfig(
        backend="openai",
        model=MODEL_NAME,
        base_url=vllm_server,
        max_concurrency=4,
        timeout_s=60,
        max_tokens=24,
        temperature=0.0,
        usd_per_million_prompt_tokens=1.0,
        usd_per_million_completion_tokens=2.0,
    )
    requests = [
        OracleRequest(f"p{i}:synthesize", synthesize_messages(row["problem"]))
        for i, row in enumerate(generate_problems(3, seed=5))
    ]
    results = run_requests(cfg, requests, tmp_path, progress=False)
    for result in results:
        assert result.status == "done", result.error
        assert isinstance(result.content, str) and result.content.strip()
        assert result.prompt_tokens > 0 and 0 < result.completion_tokens <= cfg.max_tokens
        assert result.finish_reason in ("stop", "length")
        assert result.attempts == 1 and not result.cached
    assert summarize(results)["spent_usd"] > 0

    rerun = run_requests(cfg, requests, tmp_path, progress=False)
    assert all(r.cached and r.attempts == 0 for r in rerun)
    assert [r.content for r in rerun] == [r.content for r in results]
