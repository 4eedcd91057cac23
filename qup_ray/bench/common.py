"""What the engine benchmarks share: timing engine batches inside actors, and running the bare
baseline in a process of its own (so its engine is gone before the pipeline's starts)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Iterable
from queue import Empty
from typing import Any

logger = logging.getLogger(__name__)


def with_batch_start(actor_cls: type) -> type:
    """A subclass of an engine actor whose output rows also carry `batch_started_at`: the
    pipeline is then timed from its first engine batch, leaving engine start-up out as the
    baseline does."""

    class Timed(actor_cls):  # type: ignore[misc, valid-type]
        def __call__(self, batch: dict) -> Any:
            started = time.time()
            out = super().__call__(batch)
            if isinstance(out, dict):
                return _stamped(out, started)
            return (_stamped(chunk, started) for chunk in out)  # an actor that yields chunks

    Timed.__name__ = Timed.__qualname__ = f"Timed{actor_cls.__name__}"
    return Timed


def _stamped(out: dict, started: float) -> dict:
    out["batch_started_at"] = [started] * len(next(iter(out.values())))
    return out


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


def pipeline_seconds(batch_starts: Iterable[float]) -> float:
    """Seconds from the first engine batch's start (the `batch_started_at` values) to now, the
    driver holding the last row."""
    return time.time() - min(batch_starts)


def alternate_rounds(
    bare: Callable[[], dict], pipeline: Callable[[], dict], rounds: int
) -> tuple[dict[str, Any], dict, dict]:
    """Run the baseline, then the pipeline, `rounds` times over; each returns `tokens` and
    `seconds`. On a shared machine one round can be off by 20% either way, so the medians are
    reported with every round's ratio. Ray is shut down after each pipeline round, so the
    next baseline runs without an idle cluster beside it.

    Returns the summary and the last round's baseline and pipeline results."""
    import statistics

    import ray

    pairs = []
    for i in range(rounds):
        b = bare()
        p = pipeline()
        ray.shutdown()
        pairs.append((b["tokens"] / b["seconds"], p["tokens"] / p["seconds"], b, p))
        logger.info("round %d/%d: ratio %.3f", i + 1, rounds, pairs[-1][1] / pairs[-1][0])
    summary = {
        "baseline_per_s": round(statistics.median(b for b, *_ in pairs), 1),
        "pipeline_per_s": round(statistics.median(p for _, p, *_ in pairs), 1),
        "ratio": round(statistics.median(p / b for b, p, *_ in pairs), 3),
        "round_ratios": [round(p / b, 3) for b, p, *_ in pairs],
        "baseline_s": [round(b["seconds"], 2) for *_, b, _ in pairs],
        "pipeline_s": [round(p["seconds"], 2) for *_, p in pairs],
        "rounds": rounds,
    }
    return summary, pairs[-1][2], pairs[-1][3]
