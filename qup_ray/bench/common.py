"""What the engine benchmarks share: timing engine batches inside actors, and running the bare
baseline in a process of its own (so its engine is gone before the pipeline's starts)."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from queue import Empty
from typing import Any


def with_batch_start(actor_cls: type) -> type:
    """A subclass of an engine actor whose output rows also carry `batch_started_at`: the
    pipeline is then timed from its first engine batch, leaving engine start-up out as the
    baseline does."""

    class Timed(actor_cls):  # type: ignore[misc, valid-type]
        def __call__(self, batch: dict) -> dict:
            started = time.time()
            out = super().__call__(batch)
            out["batch_started_at"] = [started] * len(next(iter(out.values())))
            return out

    Timed.__name__ = Timed.__qualname__ = f"Timed{actor_cls.__name__}"
    return Timed


def _child(fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    queue.put(fn(*args))


def run_in_subprocess(fn: Callable[..., Any], *args: Any, timeout_s: float = 1800) -> Any:
    """`fn(*args)` in a fresh spawned process (not daemonic: vLLM starts processes of its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                return queue.get(timeout=5)
            except Empty:
                if not proc.is_alive():
                    raise RuntimeError(
                        f"the baseline process died (exit code {proc.exitcode})"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the baseline took more than {timeout_s} s") from None
    finally:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()


def pipeline_seconds(batches: list[Any]) -> float:
    """Seconds from the first engine batch's start to now (the driver holding the last row)."""
    return time.time() - min(min(b.column("batch_started_at").to_pylist()) for b in batches)
