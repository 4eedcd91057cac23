"""Engine actors outside Ray: the streaming generator gives exactly what `LLM.generate` gives for
the same seeds, in chunks that come out while the rest of the batch still decodes."""

from __future__ import annotations

import pytest

from qup_ray.config import CONFIGS_DIR, DatasetSource, load_config

pytestmark = pytest.mark.slow


def test_streamed_generation_equals_llm_generate(cpu_world):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from qup_ray.data import load_problems
    from qup_ray.encoding import ChatFormat
    from qup_ray.engines import VLLMGenerator, shutdown_llm
    from qup_ray.models import resolve_model
    from qup_ray.stages.rollouts import build_prompts

    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", ["rollouts.num_samples_per_problem=3"])
    student = cfg.anchor_student
    path = resolve_model(cfg.students[student].path, cfg)
    problems, _ = load_problems(DatasetSource(kind="synthetic", num_synthetic=12, seed=5))
    requests, rejected = build_prompts(cfg, student, path, problems)
    assert not rejected
    fmt = ChatFormat.for_model(path, cfg.students[student].prompt)
    # Stopping at the turn end (as the stage does), samples finish at different steps.
    sampling = {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 96,
                "stop_token_ids": list(fmt.stop_token_ids)}  # fmt: skip
    batch = {k: [r[k] for r in requests] for k in ("prompt_ids", "seed", "problem_id")}
    generator = VLLMGenerator(path, cfg.students[student].engine.model_dump(), sampling,
                              cache_dir=str(cfg.cpu_world.cache_root()), emit_every=4)  # fmt: skip
    try:
        chunks = list(generator(batch))
        # Two calls on one actor: request ids must not collide.
        again = [r for chunk in generator(batch) for r in _rows(chunk)]
        reference = generator.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in batch["prompt_ids"]],
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


def test_lm_token_logit_reward_is_the_raw_logit_of_the_token(cpu_world, cpu_world_settings):
    """The Nemotron-HF recipe on a tiny causal LM: vLLM's reward equals transformers' logit of
    `token_id` at the position after the conversation, as raw logits (not log-probabilities)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qup_ray.cpu_world.reward_models import chat_text
    from qup_ray.cpu_world.students import heldout_problems
    from qup_ray.engines import VLLMRewardScorer, shutdown_llm

    cfg = load_config(CONFIGS_DIR / "dryrun.yaml")
    path = str(cpu_world["tiny-qwen2"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [chat_text(tokenizer, p.problem, p.render("native"))
             for p in heldout_problems(cpu_world_settings, 5, seed=31)]  # fmt: skip
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    token_id = 7
    scorer = VLLMRewardScorer(path, cfg.students[cfg.anchor_student].engine.model_dump(),
                              kind="lm_token_logit", token_id=token_id)  # fmt: skip
    try:
        out = scorer({"input_ids": ids, "key": list(range(len(ids)))})
    finally:
        shutdown_llm(scorer.llm)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [model(torch.tensor([x])).logits[0, -1, token_id].item() for x in ids]
    assert out["key"] == list(range(len(ids)))
    assert max(abs(a - b) for a, b in zip(out["reward"], expected, strict=True)) < 1e-4
    # Raw logits, not log-softmax values (those would all be <= 0 and differ from these).
    with torch.no_grad():
        logprob = torch.log_softmax(model(torch.tensor([ids[0]])).logits[0, -1], -1)[token_id]
    assert abs(out["reward"][0] - logprob.item()) > 1e-3
