"""CPU-world models in vLLM: students generate and solve part of held-out problems, stop on
their family's turn-end token when told to and run on into an invented next turn when not;
reward models score texts exactly as a transformers/torch computation of the same head does.

Engines get token ids (the chat template's text tokenized without special tokens), never text:
vLLM would tokenize text again and add a second BOS for the Llama-3 and DeepSeek layouts.

One engine at a time (each costs about 25 s and 2.3 GB), shut down at the end of its test.
"""

from __future__ import annotations

import math

import pytest

from qup_ray.cpu_world.boxed import is_correct, last_boxed
from qup_ray.cpu_world.build import MODEL_LAYOUTS
from qup_ray.cpu_world.reward_models import chat_text, reference_scores
from qup_ray.cpu_world.students import (
    MAX_NEW_TOKENS,
    encode_prompt,
    heldout_problems,
    prompt_messages,
)
from qup_ray.cpu_world.tokenizer import LAYOUTS
from qup_ray.cpu_world.vllm_cpu import VLLM_CPU_KWARGS, shutdown_llm

pytestmark = pytest.mark.slow
NUM_HELDOUT = 100


def _engine(model_dir, **kwargs):
    from vllm import LLM

    return LLM(model=str(model_dir), seed=0, **VLLM_CPU_KWARGS, **kwargs)


def _prompts(tokenizer, problems) -> list:
    from vllm.inputs import TokensPrompt

    return [
        TokensPrompt(prompt_token_ids=encode_prompt(tokenizer, prompt_messages(p.problem)))
        for p in problems
    ]


def _turn_end(tokenizer, name: str) -> int:
    return tokenizer.convert_tokens_to_ids(LAYOUTS[MODEL_LAYOUTS[name]].turn_end)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama", "tiny-deepseek"])
def test_student_solves_part_of_heldout_problems_in_vllm(
    cpu_world, cpu_world_settings, name, record_property
):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(str(cpu_world[name]))
    problems = heldout_problems(cpu_world_settings, NUM_HELDOUT)
    turn_end = _turn_end(tokenizer, name)
    llm = _engine(cpu_world[name])
    try:
        params = SamplingParams(
            n=8, temperature=1.0, top_p=1.0, max_tokens=MAX_NEW_TOKENS, stop_token_ids=[turn_end]
        )
        outputs = llm.generate(_prompts(tokenizer, problems), params, use_tqdm=False)
    finally:
        shutdown_llm(llm)
    samples = [[c.text for c in out.outputs] for out in outputs]
    stop_rate = sum(c.finish_reason == "stop" for o in outputs for c in o.outputs) / (
        8 * len(problems)
    )
    assert all(len(s) == 8 for s in samples)
    pass_at_8 = sum(
        any(is_correct(t, p.answer) for t in s) for p, s in zip(problems, samples, strict=True)
    ) / len(problems)
    boxed_rate = sum(last_boxed(t) is not None for s in samples for t in s) / (8 * len(problems))
    record_property("pass_at_8", pass_at_8)
    record_property("boxed_rate", boxed_rate)
    record_property("stop_rate", stop_rate)
    print(
        f"{name}: vLLM held-out pass@8 {pass_at_8:.2f}, boxed rate {boxed_rate:.2f},"
        f" stop rate {stop_rate:.2f}"
    )
    assert 0.2 <= pass_at_8 <= 0.9
    assert boxed_rate >= 0.5
    assert stop_rate >= 0.9


def test_student_runs_past_its_turn_end_unless_told_to_stop(cpu_world, cpu_world_settings):
    """Qwen2.5-Math base layout: the EOS is <|endoftext|>, the turn ends with <|im_end|>. Without
    stop tokens a sample goes on into an invented next turn (whose answer a grader would take);
    with the turn end as stop token every sample ends there."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    name = "tiny-qwen2"
    tokenizer = AutoTokenizer.from_pretrained(str(cpu_world[name]))
    turn_end = _turn_end(tokenizer, name)
    prompts = _prompts(tokenizer, heldout_problems(cpu_world_settings, 4, seed=4242))
    common = dict(n=4, temperature=1.0, max_tokens=2 * MAX_NEW_TOKENS, skip_special_tokens=False)
    llm = _engine(cpu_world[name])
    try:
        free = llm.generate(prompts, SamplingParams(seed=0, **common), use_tqdm=False)
        stopped = llm.generate(
            prompts, SamplingParams(seed=0, stop_token_ids=[turn_end], **common), use_tqdm=False
        )
    finally:
        shutdown_llm(llm)
    free_samples = [c for o in free for c in o.outputs]
    ran_on = [
        c
        for c in free_samples
        if turn_end in c.token_ids[:-1] and "<|im_start|>user\n" in c.text.split("<|im_end|>", 1)[1]
    ]
    assert ran_on, [c.text for c in free_samples]
    stopped_samples = [c for o in stopped for c in o.outputs]
    assert len(stopped_samples) == 16
    for c in stopped_samples:
        assert c.finish_reason == "stop" and c.stop_reason == turn_end, c
        assert turn_end not in c.token_ids[:-1]
        assert "<|im_start|>" not in c.text and "<|im_end|>" not in c.text
        assert last_boxed(c.text) is not None


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
    from vllm.inputs import TokensPrompt

    tokenizer = AutoTokenizer.from_pretrained(str(cpu_world[name]))
    texts = _reward_texts(cpu_world_settings, tokenizer)
    expected = reference_scores(cpu_world[name], texts, tokenizer)
    bos = tokenizer.bos_token_id
    prompts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        # One BOS where the family has one: the chat template's (the plain text has none).
        assert bos is None or ids.count(bos) == (text.startswith(tokenizer.bos_token))
        prompts.append(TokensPrompt(prompt_token_ids=ids))
    llm = _engine(cpu_world[name], runner="pooling")
    try:
        raw = PoolingParams(use_activation=False)
        if task == "token_classify":
            # Qwen2.5-Math-RM layout: one score per token, the reward is the last token's.
            outputs = llm.encode(
                prompts, pooling_task="token_classify", pooling_params=raw, use_tqdm=False
            )
            scores = [float(o.outputs.data[-1].reshape(-1)[0]) for o in outputs]
            default = llm.encode(prompts[:2], pooling_task="token_classify", use_tqdm=False)
            squashed = [float(o.outputs.data[-1].reshape(-1)[0]) for o in default]
        else:
            # Skywork layout (sequence classification, one label): the reward is probs[0].
            outputs = llm.classify(prompts, pooling_params=raw, use_tqdm=False)
            scores = [o.outputs.probs[0] for o in outputs]
            squashed = [o.outputs.probs[0] for o in llm.classify(prompts[:2], use_tqdm=False)]
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
