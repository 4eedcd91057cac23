"""CPU-world models in vLLM: students generate and solve part of held-out problems; reward
models score texts exactly as a transformers/torch computation of the same head does.

One engine at a time (each costs about 25 s and 2.3 GB), shut down at the end of its test.
"""

from __future__ import annotations

import math

import pytest

from qup_ray.cpu_world.boxed import is_correct, last_boxed
from qup_ray.cpu_world.reward_models import chat_text, reference_scores
from qup_ray.cpu_world.students import MAX_NEW_TOKENS, heldout_problems, prompt_messages
from qup_ray.cpu_world.vllm_cpu import VLLM_CPU_KWARGS, shutdown_llm

pytestmark = pytest.mark.slow
NUM_HELDOUT = 100


def _engine(model_dir, **kwargs):
    from vllm import LLM

    return LLM(model=str(model_dir), seed=0, **VLLM_CPU_KWARGS, **kwargs)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_student_solves_part_of_heldout_problems_in_vllm(
    cpu_world, cpu_world_settings, name, record_property
):
    from vllm import SamplingParams

    problems = heldout_problems(cpu_world_settings, NUM_HELDOUT)
    llm = _engine(cpu_world[name])
    try:
        params = SamplingParams(n=8, temperature=1.0, top_p=1.0, max_tokens=MAX_NEW_TOKENS)
        outputs = llm.chat([prompt_messages(p.problem) for p in problems], params, use_tqdm=False)
    finally:
        shutdown_llm(llm)
    samples = [[c.text for c in out.outputs] for out in outputs]
    assert all(len(s) == 8 for s in samples)
    pass_at_8 = sum(
        any(is_correct(t, p.answer) for t in s) for p, s in zip(problems, samples, strict=True)
    ) / len(problems)
    boxed_rate = sum(last_boxed(t) is not None for s in samples for t in s) / (8 * len(problems))
    record_property("pass_at_8", pass_at_8)
    record_property("boxed_rate", boxed_rate)
    print(f"{name}: vLLM held-out pass@8 {pass_at_8:.2f}, boxed rate {boxed_rate:.2f}")
    assert 0.2 <= pass_at_8 <= 0.9
    assert boxed_rate >= 0.5


def _reward_texts(settings, tokenizer) -> list[str]:
    texts = []
    for p in heldout_problems(settings, 6, seed=777):
        texts += [
            chat_text(tokenizer, p.problem, p.render(style)) for style in ("compact", "native")
        ]
    return [*texts, "a short text", chat_text(tokenizer, "What is 2 + 2?", "\\boxed{5}")]


@pytest.mark.parametrize(
    ("name", "task"), [("tiny-qwen-rm", "token_classify"), ("tiny-llama-rm", "classify")]
)
def test_reward_model_scores_in_vllm_match_torch(cpu_world, cpu_world_settings, name, task):
    from transformers import AutoTokenizer
    from vllm import PoolingParams

    tokenizer = AutoTokenizer.from_pretrained(str(cpu_world[name]))
    texts = _reward_texts(cpu_world_settings, tokenizer)
    expected = reference_scores(cpu_world[name], texts, tokenizer)
    llm = _engine(cpu_world[name], runner="pooling")
    try:
        raw = PoolingParams(use_activation=False)
        if task == "token_classify":
            # Qwen2.5-Math-RM layout: one score per token, the reward is the last token's.
            outputs = llm.encode(
                texts, pooling_task="token_classify", pooling_params=raw, use_tqdm=False
            )
            scores = [float(o.outputs.data[-1].reshape(-1)[0]) for o in outputs]
            default = llm.encode(texts[:2], pooling_task="token_classify", use_tqdm=False)
            squashed = [float(o.outputs.data[-1].reshape(-1)[0]) for o in default]
        else:
            # Skywork layout (sequence classification, one label): the reward is probs[0].
            outputs = llm.classify(texts, pooling_params=raw, use_tqdm=False)
            scores = [o.outputs.probs[0] for o in outputs]
            squashed = [o.outputs.probs[0] for o in llm.classify(texts[:2], use_tqdm=False)]
    finally:
        shutdown_llm(llm)
    assert len(scores) == len(texts) and all(math.isfinite(s) for s in scores)
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 4) for s in scores)) > 1  # the score depends on the text
    # Defaults differ: vLLM switches the activation off for Qwen2ForRewardModel, but applies a
    # sigmoid to a one-label sequence classifier. Passing use_activation=False is always raw.
    if task == "token_classify":
        assert squashed == pytest.approx(expected[:2], abs=1e-4)
    else:
        assert squashed == pytest.approx([1 / (1 + math.exp(-s)) for s in expected[:2]], abs=1e-4)
