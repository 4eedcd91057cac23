"""`qup bench ppl`: the perplexity pipeline against a bare vLLM prompt-logprob pass, same run.

The traces are synthetic solutions in both styles (native and compact) formatted for the dry
run's anchor student exactly as the score stage formats them. Both sides use the same engine
settings in float32; engine start-up is left out of both (see `bench.common`). The pipeline's
per-trace mean NLL is also compared with a transformers float32 forward pass
(`max_abs_nll_diff`).
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
from qup_ray.config import CONFIGS_DIR, load_config
from qup_ray.engines import VLLMPromptLogprobs
from qup_ray.ppl import response_nll

logger = logging.getLogger(__name__)


def _traces(num: int) -> list[dict]:
    from qup_ray.cpu_world.synthetic import sample_problems

    problems = sample_problems(num // 2, seed=4242)
    return [
        {"problem": p.problem, "trace": p.render(style)}
        for p in problems
        for style in ("native", "compact")
    ]


def _bare(model_path: str, engine: dict, rows: list[dict], cache_dir: str) -> dict:
    """The baseline, in its own process: one LLM, one prompt-logprob `generate` over all rows."""
    from qup_ray.engines import shutdown_llm, start_llm

    # The engine the pipeline's actor starts: same settings, threads and warm-up.
    llm = start_llm(model_path, engine, dtype="float32", cache_dir=cache_dir)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    t0 = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=r["input_ids"]) for r in rows],
                           params, use_tqdm=False)  # fmt: skip
    # The same reduction the pipeline does, so both sides end with per-trace statistics.
    for r, out in zip(rows, outputs, strict=True):
        logprobs = [
            lp[t].logprob for t, lp in zip(r["input_ids"][1:], out.prompt_logprobs[1:], strict=True)
        ]
        response_nll([0.0, *logprobs], r["response_start"])
    elapsed = time.perf_counter() - t0
    shutdown_llm(llm)  # else its engine process outlives this one
    return {"tokens": sum(len(r["input_ids"]) for r in rows), "seconds": elapsed}


def _transformers_nll(model_path: str, rows: list[dict]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            token_lp = logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist()
            out.append(response_nll([0.0, *token_lp], r["response_start"])["mean_nll"])
    return out


def _pipeline(cfg: Any, model: Any, path: str, rows: list[dict]) -> dict:
    from qup_ray.engines import run_engine_pool
    from qup_ray.ray_session import init_ray

    init_ray(cfg.ray)
    # The score stage's own actor pool, in float32.
    kwargs = {"model_path": path, "engine": model.engine.model_dump(), "dtype": "float32",
              "cache_dir": str(cfg.cache_root())}  # fmt: skip
    scored, _ = run_engine_pool(rows, with_batch_start(VLLMPromptLogprobs), kwargs, model.engine,
                                role="score", key="key")  # fmt: skip
    return {
        "tokens": sum(len(r["input_ids"]) for r in rows),
        "seconds": pipeline_seconds(r["batch_started_at"] for r in scored),
        "mean_nll": [s["mean_nll"] for s in scored],
    }


def run(
    *, quick: bool = False, rounds: int | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> dict:
    """Prompt tokens per second of the pipeline and of the bare engine, their ratio (medians
    over alternating rounds), and the largest |mean NLL difference| against transformers
    float32."""
    from qup_ray.encoding import ChatFormat
    from qup_ray.models import resolve_model

    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", overrides)
    model = cfg.students[cfg.anchor_student]
    path = resolve_model(model.path, cfg)
    fmt = ChatFormat.for_model(path, model.prompt)
    rows = []
    for t in _traces(64 if quick else 512):
        ids, start = fmt.example(t["problem"], t["trace"])
        rows.append({"key": str(len(rows)), "input_ids": ids, "response_start": start})
    engine = model.engine.model_dump()
    cache_dir = str(cfg.cache_root())
    result, _, pipe = alternate_rounds(
        lambda: run_in_subprocess(_bare, path, engine, rows, cache_dir),
        lambda: _pipeline(cfg, model, path, rows),
        rounds or (1 if quick else 3),
    )
    reference = _transformers_nll(path, rows[: 32 if quick else 128])
    max_diff = max(abs(s - ref) for s, ref in zip(pipe["mean_nll"], reference, strict=False))
    return {
        "bench": "ppl",
        **result,
        "unit": "scored tokens/s",
        "num_traces": len(rows),
        "max_abs_nll_diff": max_diff,
        "nll_checked_traces": len(reference),
    }
