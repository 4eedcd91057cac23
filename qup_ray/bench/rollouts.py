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

from qup_ray.bench.common import pipeline_seconds, run_in_subprocess, with_batch_start
from qup_ray.config import CONFIGS_DIR, DatasetSource, load_config
from qup_ray.engines import VLLMGenerator, engine_kwargs

logger = logging.getLogger(__name__)


def _bare(
    model_path: str, engine: dict, sampling: dict, requests: list[dict], cache_dir: str
) -> dict:
    """The baseline, in its own process: one LLM, one `generate` over every prompt."""
    from qup_ray.engines import set_engine_caches, shutdown_llm

    set_engine_caches(cache_dir)
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, **engine_kwargs(engine))
    params = [SamplingParams(**sampling, seed=r["seed"]) for r in requests]
    # Warm the engine up first (the pipeline's first batch pays this, so the ratio is conservative).
    llm.generate([r["prompt"] for r in requests[:4]], params[:4], use_tqdm=False)
    t0 = time.perf_counter()
    outputs = llm.generate([r["prompt"] for r in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    shutdown_llm(llm)  # else its engine process outlives this one
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"tokens": tokens, "seconds": elapsed}


def _pipeline(
    cfg: Any, student: str, model_path: str, sampling: dict, requests: list[dict]
) -> dict:
    import ray

    from qup_ray.engines import Grader
    from qup_ray.ray_session import init_ray

    init_ray(cfg.ray)
    e = cfg.students[student].engine
    ds = ray.data.from_items(requests).map_batches(
        with_batch_start(VLLMGenerator),
        fn_constructor_kwargs={"model_path": model_path, "engine": e.model_dump(), "sampling": sampling,
                               "cache_dir": str(cfg.cpu_world.cache_root())},
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=e.num_cpus_per_actor, batch_size=e.batch_size,
    ).map_batches(Grader, fn_constructor_kwargs={"timeout_s": cfg.grading.timeout_s},
                  compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, batch_size=256)  # fmt: skip
    batches = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    tokens = sum(sum(b.column("num_tokens").to_pylist()) for b in batches)
    return {"tokens": tokens, "seconds": pipeline_seconds(batches)}


def run(*, quick: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Generated tokens per second of the pipeline and of the bare engine, and their ratio."""
    from qup_ray.data import load_problems
    from qup_ray.stages.rollouts import build_prompts, resolve_model

    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", overrides)
    student = cfg.anchor_student
    model_path = resolve_model(cfg.students[student].path, cfg)
    problems, _ = load_problems(
        DatasetSource(kind="synthetic", num_synthetic=48 if quick else 192, seed=77)
    )
    requests = build_prompts(cfg, student, model_path, problems)
    r = cfg.rollouts
    sampling = {"n": r.num_samples_per_problem, "temperature": r.temperature, "top_p": r.top_p,
                "max_tokens": r.max_new_tokens}  # fmt: skip
    engine = cfg.students[student].engine.model_dump()

    bare = run_in_subprocess(
        _bare, model_path, engine, sampling, requests, str(cfg.cpu_world.cache_root())
    )
    pipe = _pipeline(cfg, student, model_path, sampling, requests)
    pipeline_per_s = pipe["tokens"] / pipe["seconds"]
    baseline_per_s = bare["tokens"] / bare["seconds"]
    return {
        "bench": "rollouts",
        "pipeline_per_s": round(pipeline_per_s, 1),
        "baseline_per_s": round(baseline_per_s, 1),
        "ratio": round(pipeline_per_s / baseline_per_s, 3),
        "unit": "generated tokens/s",
        "num_prompts": len(requests),
        "samples_per_prompt": r.num_samples_per_problem,
        "pipeline_tokens": pipe["tokens"],
        "baseline_tokens": bare["tokens"],
        "pipeline_s": round(pipe["seconds"], 2),
        "baseline_s": round(bare["seconds"], 2),
        "actors": 1,
    }
