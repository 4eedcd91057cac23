"""`qup bench rollouts`: the rollouts pipeline against a bare `vllm.LLM.generate`, same run.

Both sides get the same prompts (the dry-run anchor student on synthetic problems), the same
engine settings and the same sampling parameters. Engine start-up is left out of both: the bare
side is timed around `generate`; the pipeline from the moment its first engine batch starts to
the moment the driver holds the last graded row, so Ray Data's batching, streaming, the grading
stage and the transfer to the driver all count against it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from qup_ray.bench.common import (
    alternate_rounds,
    pipeline_seconds,
    run_in_subprocess,
    with_batch_start,
)
from qup_ray.config import CONFIGS_DIR, DatasetSource, load_config
from qup_ray.engines import VLLMGenerator

logger = logging.getLogger(__name__)


def _bare(
    model_path: str, engine: dict, sampling: dict, requests: list[dict], cache_dir: str
) -> dict:
    """The baseline, in its own process: one LLM, one `generate` over every prompt."""
    from qup_ray.engines import shutdown_llm, start_llm

    # The engine the pipeline's actor starts: same settings, threads and warm-up.
    llm = start_llm(model_path, engine, cache_dir=cache_dir)
    from vllm import SamplingParams

    params = [SamplingParams(**(sampling | {"max_tokens": r["max_tokens"]}), seed=r["seed"])
              for r in requests]  # fmt: skip
    t0 = time.perf_counter()
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in requests]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    shutdown_llm(llm)  # else its engine process outlives this one
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"tokens": tokens, "seconds": elapsed}


def _pipeline(cfg: Any, student: str, model_path: str, requests: list[dict]) -> dict:
    from qup_ray.ray_session import init_ray
    from qup_ray.stages.rollouts import rollout_dataset

    init_ray(cfg.ray)
    # The stage's own pipeline, engine batch size included.
    ds = rollout_dataset(
        cfg, student, model_path, requests, generator=with_batch_start(VLLMGenerator)
    )
    batches = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    seconds = pipeline_seconds(t for b in batches for t in b.column("batch_started_at").to_pylist())
    tokens = sum(sum(b.column("num_tokens").to_pylist()) for b in batches)
    return {"tokens": tokens, "seconds": seconds}


def run(
    *, quick: bool = False, rounds: int | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> dict:
    """Generated tokens per second of the pipeline and of the bare engine, and their ratio
    (medians over alternating rounds)."""
    from qup_ray.data import load_problems
    from qup_ray.encoding import ChatFormat
    from qup_ray.models import resolve_model
    from qup_ray.stages.rollouts import build_prompts, engine_batch_size, sampling_kwargs

    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", overrides)
    student = cfg.anchor_student
    model_path = resolve_model(cfg.students[student].path, cfg)
    problems, _ = load_problems(
        DatasetSource(kind="synthetic", num_synthetic=48 if quick else 192, seed=77)
    )
    requests, _ = build_prompts(cfg, student, model_path, problems)
    fmt = ChatFormat.for_model(model_path, cfg.students[student].prompt)
    sampling = sampling_kwargs(cfg, list(fmt.stop_token_ids))
    engine = cfg.students[student].engine.model_dump()
    cache_dir = str(cfg.cache_root())
    result, bare, pipe = alternate_rounds(
        lambda: run_in_subprocess(_bare, model_path, engine, sampling, requests, cache_dir),
        lambda: _pipeline(cfg, student, model_path, requests),
        rounds or (1 if quick else 3),
    )
    return {
        "bench": "rollouts",
        **result,
        "unit": "generated tokens/s",
        "num_prompts": len(requests),
        "samples_per_prompt": sampling["n"],
        "pipeline_tokens": pipe["tokens"],
        "baseline_tokens": bare["tokens"],
        "actors": cfg.students[student].engine.num_actors,
        "engine_batch_prompts": engine_batch_size(cfg, student),
    }
