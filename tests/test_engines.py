"""Engine actors outside Ray: the streaming generator gives exactly what `LLM.generate` gives for
the same seeds, in chunks that come out while the rest of the batch still decodes."""

from __future__ import annotations

import pytest

from qup_ray.config import CONFIGS_DIR, DatasetSource, load_config

pytestmark = pytest.mark.slow


def test_streamed_generation_equals_llm_generate(cpu_world):
    from vllm import SamplingParams

    from qup_ray.data import load_problems
    from qup_ray.engines import VLLMGenerator, shutdown_llm
    from qup_ray.stages.rollouts import build_prompts, resolve_model

    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", ["rollouts.num_samples_per_problem=3"])
    student = cfg.anchor_student
    path = resolve_model(cfg.students[student].path, cfg)
    problems, _ = load_problems(DatasetSource(kind="synthetic", num_synthetic=12, seed=5))
    requests = build_prompts(cfg, student, path, problems)
    sampling = {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 96}
    batch = {k: [r[k] for r in requests] for k in ("prompt", "seed", "problem_id")}
    generator = VLLMGenerator(path, cfg.students[student].engine.model_dump(), sampling,
                              cache_dir=str(cfg.cpu_world.cache_root()), emit_every=4)  # fmt: skip
    try:
        chunks = list(generator(batch))
        # Two calls on one actor: request ids must not collide.
        again = [r for chunk in generator(batch) for r in _rows(chunk)]
        reference = generator.llm.generate(
            batch["prompt"],
            [SamplingParams(**sampling, seed=int(s)) for s in batch["seed"]],
            use_tqdm=False,
        )
    finally:
        shutdown_llm(generator.llm)
    assert len(chunks) >= 2  # finished requests came out before the whole batch was done
    streamed = sorted(r for chunk in chunks for r in _rows(chunk))
    expected = sorted(
        (pid, c.index, c.text, str(c.finish_reason), len(c.token_ids))
        for pid, out in zip(batch["problem_id"], reference, strict=True)
        for c in out.outputs
    )
    assert len(streamed) == 12 * 3
    assert streamed == expected
    assert sorted(again) == expected


def _rows(chunk: dict) -> list[tuple]:
    keys = ("problem_id", "sample_idx", "response", "finish_reason", "num_tokens")
    return list(zip(*(chunk[k] for k in keys), strict=True))
