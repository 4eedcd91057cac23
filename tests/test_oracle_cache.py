"""The oracle's response cache: keys, durability across a killed process, concurrent writers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qup_ray.oracle.cache import CACHE_FILE_NAME, CachedResponse, ResponseCache, cache_key

MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "1+1?"}]
PARAMS = {"temperature": 0.0, "max_tokens": 64}


def reply(text: str = "2", cost: float = 0.01) -> CachedResponse:
    return CachedResponse(
        content=text,
        finish_reason="stop",
        prompt_tokens=10,
        completion_tokens=1,
        cost_usd=cost,
        model="m",
        request_key="row-1",
    )


def test_cache_key_covers_model_messages_and_params():
    base = cache_key("m", MESSAGES, PARAMS)
    assert base == cache_key("m", [dict(m) for m in MESSAGES], dict(reversed(PARAMS.items())))
    assert len(base) == 64
    assert base != cache_key("other", MESSAGES, PARAMS)
    assert base != cache_key("m", MESSAGES[1:], PARAMS)
    assert base != cache_key("m", MESSAGES, {**PARAMS, "temperature": 0.7})
    assert base != cache_key("m", MESSAGES, {**PARAMS, "max_tokens": 65})
    edited = [MESSAGES[0], {"role": "user", "content": "1+1 ?"}]
    assert base != cache_key("m", edited, PARAMS)


def test_put_get_and_reopen(tmp_path: Path):
    with ResponseCache(tmp_path) as cache:
        assert cache.get("k1") is None
        cache.put("k1", reply("two"))
        cache.put("k1", reply("changed"))  # the first reply for a key is kept
        cache.put("k2", reply("three", cost=0.02))
        assert len(cache) == 2
    assert (tmp_path / CACHE_FILE_NAME).is_file()
    with ResponseCache(tmp_path) as cache:
        found = cache.get_many(["k1", "k2", "missing"])
        assert set(found) == {"k1", "k2"}
        assert found["k1"].content == "two"
        assert found["k1"].prompt_tokens == 10 and found["k1"].request_key == "row-1"
        assert found["k1"].created_at > 0
        assert cache.total_cost_usd() == pytest.approx(0.03)


def test_lookup_of_many_keys_in_chunks(tmp_path: Path):
    with ResponseCache(tmp_path) as cache:
        for i in range(1200):
            cache.put(f"k{i}", reply(str(i)))
        found = cache.get_many([f"k{i}" for i in range(0, 2400, 2)])
    assert len(found) == 600 and found["k1198"].content == "1198"


def test_concurrent_asyncio_writers(tmp_path: Path):
    async def write(cache: ResponseCache, i: int) -> None:
        await asyncio.sleep(0.001 * (i % 7))
        cache.put(f"k{i}", reply(f"reply {i}"))

    async def main(cache: ResponseCache) -> None:
        await asyncio.gather(*(write(cache, i) for i in range(300)))

    with ResponseCache(tmp_path) as cache:
        asyncio.run(main(cache))
    with ResponseCache(tmp_path) as cache:
        assert len(cache) == 300
        assert cache.get("k299").content == "reply 299"


def test_replies_survive_a_killed_process(tmp_path: Path):
    # The writer kills itself (SIGKILL: no cleanup, no close) right after its 50th put.
    script = textwrap.dedent(
        f"""
        import os, signal
        from qup_ray.oracle.cache import CachedResponse, ResponseCache
        cache = ResponseCache({str(tmp_path)!r})
        for i in range(50):
            cache.put(f"k{{i}}", CachedResponse(f"reply {{i}}", "stop", 1, 1, 0.0, "m"))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -9
    with ResponseCache(tmp_path) as cache:
        assert len(cache) == 50
        assert cache.get("k49").content == "reply 49"
