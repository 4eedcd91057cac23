"""Bounded, parallel answer grading: child worker processes with a deadline on every check.

math-verify's own timeout uses `signal.alarm`, which only works in a main thread and cannot
interrupt a long C-level computation (Python's big-integer power in `9^{9^{9^{9}}}`). Here every
check runs in a persistent child process instead, and the parent enforces the deadline from
whatever thread it runs in (a Ray worker, a thread pool, the CLI):

- `BoundedChecker(workers=N, timeout_s=T)` starts N workers (`python -c ...`, so nothing of the
  caller's `__main__` is re-imported, unlike multiprocessing's spawn). The parent extracts and
  screens answers itself and settles what needs no parser (no answer, refused, plain numbers,
  identical text: `answers.quick_verdict`); each distinct remaining (gold, answer) is one job.
  Jobs go to the workers in chunks, and each comes back as its own message. A job not answered
  `T` seconds after it started is reported as `status="timeout"`; its worker is killed and
  restarted (about a second), and the rest of its chunk goes back to the queue. A worker that
  dies (memory limit, crash) costs its current job the same way.
- Each worker caches parsed gold answers, so the 8 or 16 samples of a problem parse it once.
- In a Ray actor or task, pass `workers=` explicitly (the default is every core this process
  may use, which Ray does not restrict).
- Workers also bound themselves: a CPU-time limit per job (so an orphaned worker cannot spin
  forever), an address-space limit, and an audit hook that refuses process creation, signals,
  sockets and file writes, in case anything in a parser were ever made to run model text.

`grade_pairs` and `grade_jsonl` (behind `qup grade IN.jsonl --out OUT.jsonl`) are the entry
points; the answer semantics live in `qup_ray.answers`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qup_ray import answers
from qup_ray.answers import Gold, GradeResult, extract_answer, gold_text, screen_answer

logger = logging.getLogger(__name__)

GoldLike = Gold | str | Sequence[str]

MAX_CHUNK_SIZE = 64
GOLD_CACHE_SIZE = 1024
MAX_START_FAILURES = 3
JSONL_BATCH_ROWS = 4096
_BOOT = "import qup_ray.grading as g; g._worker_main()"
# Typical answer shapes: parsing them fills ANTLR's prediction cache, which every process starts
# empty (the first checks of a cold worker are several times slower than later ones).
_WARM_UP = (
    ("\\frac{1}{2}", "0.5"),
    ("3\\sqrt{2}", "\\sqrt{18}"),
    ("4\\pi", "\\pi \\cdot 4"),
    ("(1, 2)", "\\left(1,2\\right)"),
    ("\\{1, 2, 3\\}", "3, 2, 1"),
    ("[-1, 2)", "\\left[-1, 2\\right)"),
    ("25\\%", "0.25"),
    ("x^2 + 2x + 1", "(x+1)^2"),
)


def default_workers() -> int:
    """The CPU cores this process may use (respects affinity masks such as SLURM's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class _Job:
    idx: int
    gold: str
    answer: str
    weight: int = 0  # how many of the caller's pairs this job answers


class _Worker:
    """One child process that runs checks, and the parent's view of what it is doing."""

    def __init__(self, timeout_s: float, memory_limit_mb: int, start_timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout_s = start_timeout_s
        self.start_failures = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        child_fd = child_sock.detach()
        try:
            args = [str(child_fd), str(self.timeout_s), str(self.memory_limit_mb)]
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, *args],
                pass_fds=(child_fd,),
                stdin=subprocess.DEVNULL,
                env=_child_env(),
            )
        finally:
            os.close(child_fd)
        self.conn = Connection(parent_sock.detach())
        self.ready = False
        self.inflight: deque[_Job] = deque()
        self.deadline = time.monotonic() + self.start_timeout_s

    def submit(self, jobs: list[_Job]) -> None:
        self.inflight.extend(jobs)
        self.deadline = time.monotonic() + self.timeout_s
        self.conn.send([(job.idx, job.gold, job.answer) for job in jobs])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.ready and not self.inflight:  # idle: let it exit cleanly, else just kill it
            try:
                self.conn.send(None)
                if self.proc is not None:
                    self.proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


def _child_env() -> dict[str, str]:
    # The child must import this very package, even when it is only on the parent's sys.path.
    root = str(Path(answers.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()


class BoundedChecker:
    """Grades answers in `workers` child processes, each check bounded by `timeout_s` seconds.

    Use as a context manager (or call `close()`). Safe to call from any thread; calls are
    serialised. Start-up (about a second per worker) happens in the background from
    construction; `warm_up()` waits for it.
    """

    def __init__(
        self,
        workers: int | None = 1,
        *,
        timeout_s: float = 5.0,
        memory_limit_mb: int = 2048,
        start_timeout_s: float = 120.0,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.num_workers = workers or default_workers()
        self.restarts = 0
        self.check_durations_s: deque[float] = deque(maxlen=100_000)  # per check, seconds
        self._lock = threading.Lock()
        self._workers = [
            _Worker(timeout_s, memory_limit_mb, start_timeout_s) for _ in range(self.num_workers)
        ]
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    def __enter__(self) -> BoundedChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers."""
        self._finalizer()

    def warm_up(self) -> None:
        """Wait until every worker has started (so that timings leave start-up out)."""
        with self._lock:
            self._run([], lambda n: None, wait_all_ready=True)

    def check(self, gold: GoldLike, response: str, *, lenient: bool = False) -> GradeResult:
        """Grade one response against one gold answer, within the time bound."""
        return self.check_many([(gold, response)], lenient=lenient)[0]

    def check_many(
        self,
        pairs: Iterable[tuple[GoldLike, str]],
        *,
        lenient: bool = False,
        progress: Callable[[int], Any] | None = None,
    ) -> list[GradeResult]:
        """Grade (gold, response) pairs, in order; `progress(n)` is told of finished checks."""
        on_done = progress or (lambda n: None)
        results: list[GradeResult | None] = []
        extractions: list[answers.Extraction] = []
        # Identical (gold, answer) pairs are common (most samples of a problem agree on their
        # answer): each is checked once and its verdict shared.
        jobs: dict[tuple[str, str], _Job] = {}
        same_as: dict[int, int] = {}
        for idx, (gold, response) in enumerate(pairs):
            extraction = extract_answer(response, lenient=lenient)
            extractions.append(extraction)
            key = (_gold_key(gold), extraction.text or "")
            results.append(_settled_early(extraction, key[0]))
            if results[-1] is None:
                job = jobs.setdefault(key, _Job(idx, *key))
                job.weight += 1
                same_as[idx] = job.idx
        on_done(len(results) - len(same_as))
        with self._lock:
            verdicts = self._run(list(jobs.values()), on_done)
        for idx, job_idx in same_as.items():
            correct, status = verdicts[job_idx]
            extraction = extractions[idx]
            results[idx] = GradeResult(extraction.text, correct, status, extraction.mode)
        return [result for result in results if result is not None]

    # --- the scheduling loop: runs in the caller's thread, no signals --------------------

    def _run(
        self, jobs: list[_Job], on_done: Callable[[int], Any], wait_all_ready: bool = False
    ) -> dict[int, tuple[bool | None, str]]:
        if self._finalizer.alive is False:
            raise RuntimeError("BoundedChecker is closed")
        results: dict[int, tuple[bool | None, str]] = {}
        queue = deque(_chunks(jobs, self._chunk_size(len(jobs))))
        while len(results) < len(jobs) or (
            wait_all_ready and not all(w.ready for w in self._workers)
        ):
            for worker in self._workers:
                if worker.ready and not worker.inflight and queue:
                    self._submit(worker, queue.popleft(), results, queue, on_done)
            waiting = [w for w in self._workers if w.inflight or not w.ready]
            if not waiting:
                if queue:
                    continue
                raise RuntimeError("grading lost track of its jobs")  # a bug, never expected
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            for conn in wait([w.conn for w in waiting], timeout):
                worker = next(w for w in waiting if w.conn is conn)
                self._drain(worker, results, queue, on_done)
            for worker in self._workers:
                if time.monotonic() >= worker.deadline:
                    # A result may have landed since `wait` returned: take it before judging.
                    self._drain(worker, results, queue, on_done)
                    if time.monotonic() >= worker.deadline:
                        self._fail(worker, results, queue, on_done, "timed out")
        return results

    def _chunk_size(self, num_jobs: int) -> int:
        # Several chunks per worker balance the load; a chunk of up to 64 keeps IPC small.
        return max(1, min(MAX_CHUNK_SIZE, math.ceil(num_jobs / (4 * len(self._workers)))))

    def _submit(self, worker: _Worker, chunk: list[_Job], results, queue, on_done) -> None:
        if worker.proc is not None and worker.proc.poll() is not None:
            # Died while idle (killed from outside): restart it rather than blame the chunk.
            logger.warning("grading worker exited while idle; restarting it")
            queue.appendleft(chunk)
            self.restarts += 1
            worker.restart()
            return
        try:
            worker.submit(chunk)
        except OSError:
            self._fail(worker, results, queue, on_done, "died")

    def _drain(self, worker: _Worker, results, queue, on_done) -> None:
        """Take every message the worker has sent so far."""
        while True:
            try:
                if not worker.conn.poll():
                    return
                message = worker.conn.recv()
            except (EOFError, OSError):
                self._fail(worker, results, queue, on_done, "died")
                return
            if message[0] == "ready":
                worker.ready = True
                worker.start_failures = 0
                worker.deadline = math.inf
                continue
            idx, correct, status, elapsed_s = message
            job = worker.inflight.popleft()
            assert job.idx == idx, "worker answered out of order"
            results[idx] = (correct, status)
            self.check_durations_s.append(elapsed_s)
            on_done(job.weight)
            worker.deadline = time.monotonic() + self.timeout_s if worker.inflight else math.inf

    def _fail(self, worker: _Worker, results, queue, on_done, what: str) -> None:
        """The worker timed out or died: its current job is a timeout; restart it."""
        if worker.inflight:
            job = worker.inflight.popleft()
            logger.warning(
                "check %s after %.1f s bound (answer %r); restarting its worker",
                what,
                self.timeout_s,
                job.answer[:80],
            )
            results[job.idx] = (None, "timeout")
            on_done(job.weight)
            if worker.inflight:
                queue.appendleft(list(worker.inflight))
        elif not worker.ready:
            worker.start_failures += 1
            if worker.start_failures >= MAX_START_FAILURES:
                raise RuntimeError(
                    f"grading worker {what} while starting, {MAX_START_FAILURES} times"
                )
            logger.warning("grading worker %s while starting; retrying", what)
        self.restarts += 1
        worker.restart()


def _settled_early(extraction: answers.Extraction, gold: str) -> GradeResult | None:
    """The result when no worker is needed: nothing extracted, refused by the screen, or a
    verdict that needs no parser (`answers.quick_verdict`)."""
    if extraction.text is None:
        return GradeResult(None, None, "no_answer", None)
    reason = screen_answer(extraction.text)
    if reason:
        logger.debug("refused %r: %s", extraction.text[:80], reason)
        return GradeResult(extraction.text, None, "parse_error", extraction.mode)
    same = answers.quick_verdict(gold, extraction.text)
    if same is not None:
        return GradeResult(extraction.text, same, "ok", extraction.mode)
    return None


def _gold_key(gold: GoldLike) -> str:
    return gold.text if isinstance(gold, Gold) else gold_text(gold)


def _chunks(jobs: list[_Job], size: int) -> Iterator[list[_Job]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


# --- the child side ---------------------------------------------------------------------------

# Events a grading worker never needs; refusing them means that even code smuggled into a parser
# could not start processes, signal them, open sockets or write files.
_REFUSED_EVENTS = frozenset(
    {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill"}
    | {"os.killpg", "subprocess.Popen", "socket.connect", "socket.bind", "ctypes.dlopen"}
    | {"os.remove", "os.rename", "os.rmdir", "os.truncate", "shutil.rmtree"}
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if event in _REFUSED_EVENTS:
        raise PermissionError(f"grading worker refuses {event}")
    if event == "open" and len(args) == 3:
        _, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else False
        if writes or (isinstance(flags, int) and flags & _WRITE_FLAGS):
            raise PermissionError("grading worker refuses to write files")


def _arm_cpu_limit(budget_s: float) -> None:
    """Let this process use at most `budget_s` more CPU seconds (then the kernel kills it)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    used_s = usage.ru_utime + usage.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(used_s + budget_s)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _limit_memory(memory_limit_mb: int) -> None:
    import resource

    limit = memory_limit_mb << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _worker_main() -> None:
    """Entry point of a grading worker (`python -c`): answer jobs until the parent goes away."""
    import signal

    fd, timeout_s, memory_limit_mb = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _limit_memory(memory_limit_mb)
    answers.install_eval_guard()
    conn = Connection(fd)
    for gold, answer in _WARM_UP:  # before saying "ready", so that timings leave it out
        answers.check(gold, "\\boxed{" + answer + "}")
    sys.addaudithook(_audit_hook)
    conn.send(("ready", os.getpid()))
    golds: dict[str, Gold] = {}
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for idx, gold_key, answer in chunk:
            # The parent kills us at timeout_s of wall time; this is the backstop for an
            # orphaned worker stuck in C code, where no signal handler can run.
            _arm_cpu_limit(2 * timeout_s + 1)
            started = time.perf_counter()
            try:
                gold = golds.pop(gold_key, None) or Gold.parse(gold_key)
                golds[gold_key] = gold  # most recent last: a small LRU cache
                if len(golds) > GOLD_CACHE_SIZE:
                    del golds[next(iter(golds))]
                correct, status = answers.compare(gold, answer)
            except Exception:
                logger.debug("check failed", exc_info=True)
                correct, status = None, "parse_error"
            conn.send((idx, correct, status, time.perf_counter() - started))


# --- entry points -----------------------------------------------------------------------------


def grade_pairs(
    pairs: Iterable[tuple[GoldLike, str]],
    *,
    workers: int | None = None,
    timeout_s: float = 5.0,
    lenient: bool = False,
    checker: BoundedChecker | None = None,
) -> list[GradeResult]:
    """Grade (gold, response) pairs on `workers` processes (default: all usable cores).

    Pass a warm `checker` to reuse its workers; otherwise workers are started for this call
    (start-up counts) and stopped at the end.
    """
    pairs = list(pairs)
    if checker is not None:
        return checker.check_many(pairs, lenient=lenient)
    num_workers = max(1, min(workers or default_workers(), len(pairs)))
    with BoundedChecker(num_workers, timeout_s=timeout_s) as own:
        return own.check_many(pairs, lenient=lenient)


def _read_row(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(row, None) for a gradable JSONL line, else (what could be kept, why it is malformed)."""
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"invalid JSON: {err}"
    if not isinstance(row, dict):
        return None, "row is not a JSON object"
    for field in ("response", "answer"):
        if field not in row:
            return row, f"missing field {field!r}"
    if not isinstance(row["response"], str):
        return row, "field 'response' must be a string"
    answer = row["answer"]
    is_list = isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer)
    is_number = isinstance(answer, int | float) and not isinstance(answer, bool)
    if not (isinstance(answer, str) or is_list or is_number):
        return row, "field 'answer' must be a string, a number or a non-empty list of strings"
    return row, None


def _gold_of(row: dict[str, Any]) -> str | list[str]:
    answer = row["answer"]
    return answer if isinstance(answer, str | list) else str(answer)  # JSON numbers: 5, 0.25


def _malformed_row(lineno: int, line: bytes, row: dict[str, Any] | None, error: str) -> dict:
    """A malformed line as an output row: kept (or its raw text), with `line` and `error`."""
    out = dict(row) if row is not None else {"raw": line.decode("utf-8", "replace").rstrip("\n")}
    out.update(GradeResult(None, None, "parse_error", None).as_row())
    out.update(line=lineno, error=error)
    return out


def _numbered_batches(path: Path, size: int) -> Iterator[list[tuple[int, bytes]]]:
    with path.open("rb") as src:
        batch: list[tuple[int, bytes]] = []
        for lineno, line in enumerate(src, start=1):
            if line.strip():
                batch.append((lineno, line))
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch


def grade_jsonl(
    in_path: str | Path,
    out_path: str | Path,
    *,
    workers: int | None = None,
    timeout_s: float = 5.0,
    lenient: bool = False,
) -> dict[str, Any]:
    """Grade a JSONL file of rows with `response` and `answer`; write every row to `out_path`.

    Each output row is the input row plus `extracted`, `correct`, `status`, `extract_mode`.
    `answer` is a LaTeX string, a JSON number, or a list of strings (all required, as in
    OlympiadBench). A malformed line (bad JSON, not an object, missing or mistyped field:
    `response` not a string, `answer` anything else) is logged, counted, and still written,
    with `status="parse_error"`, `line` (its 1-based number) and `error` (bad JSON is kept as
    `raw` text); blank lines are skipped. The output is written under a temporary name and
    renamed, so it is complete or absent. Returns a summary: rows, correct, wrong, counts per
    status and per extraction mode, malformed line numbers, worker restarts, elapsed time.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    started = time.monotonic()
    with in_path.open("rb") as src:
        total = sum(1 for line in src if line.strip())
    tally: dict[str, Counter[str]] = {"status": Counter(), "extract_mode": Counter()}
    correct = wrong = restarts = 0
    malformed: list[int] = []
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    num_workers = max(1, min(workers or default_workers(), total or 1))
    try:
        with (
            BoundedChecker(num_workers, timeout_s=timeout_s) as checker,
            tmp_path.open("w", encoding="utf-8") as dst,
            tqdm(total=total, unit="row", desc="grade", file=sys.stderr) as bar,
        ):
            for batch in _numbered_batches(in_path, JSONL_BATCH_ROWS):
                for out, is_malformed in _grade_batch(batch, checker, lenient, bar):
                    if is_malformed:
                        if len(malformed) < 20:
                            logger.warning("%s line %d: %s", in_path, out["line"], out["error"])
                        malformed.append(out["line"])
                    else:
                        tally["extract_mode"][str(out["extract_mode"])] += 1
                    tally["status"][out["status"]] += 1
                    correct += out["correct"] is True
                    wrong += out["correct"] is False
                    dst.write(json.dumps(out, ensure_ascii=False) + "\n")
            restarts = checker.restarts
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)  # only left when something failed
    if len(malformed) > 20:
        logger.warning("%s: %d malformed lines in all", in_path, len(malformed))
    elapsed_s = time.monotonic() - started
    statuses = {status: tally["status"].get(status, 0) for status in answers.STATUSES}
    logger.info("graded %d rows of %s in %.1f s: %s", total, in_path, elapsed_s, statuses)
    return {
        "rows": total,
        "correct": correct,
        "wrong": wrong,
        "status": statuses,
        "extract_mode": dict(tally["extract_mode"]),
        "malformed_lines": malformed,
        "restarts": restarts,
        "elapsed_s": round(elapsed_s, 3),
    }


def _grade_batch(
    batch: list[tuple[int, bytes]], checker: BoundedChecker, lenient: bool, bar: tqdm
) -> list[tuple[dict[str, Any], bool]]:
    """(output row, is malformed) for a batch of numbered lines, in order."""
    parsed = [(lineno, line, *_read_row(line)) for lineno, line in batch]
    good = [row for _, _, row, error in parsed if error is None]
    graded = iter(
        checker.check_many(
            [(_gold_of(row), row["response"]) for row in good],
            lenient=lenient,
            progress=bar.update,
        )
    )
    out = []
    for lineno, line, row, error in parsed:
        if error is None:
            out.append(({**row, **next(graded).as_row()}, False))
        else:
            out.append((_malformed_row(lineno, line, row, error), True))
            bar.update(1)
    return out
