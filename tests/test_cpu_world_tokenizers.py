"""The CPU world's tokenizer layouts copy the real families' special tokens and chat templates,
traps included (fast: a small BPE is trained here; the built students are checked in
test_cpu_world_build.py)."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from qup_ray.cpu_world.settings import CpuWorldSettings
from qup_ray.cpu_world.students import _encode_examples
from qup_ray.cpu_world.synthetic import latex_results, sample_problems
from qup_ray.cpu_world.tokenizer import (
    COT_INSTRUCTION,
    LAYOUTS,
    SPECIAL_TOKENS,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is \\boxed{4}."},
]
# What each real family's template writes for CHAT (copied from the real layouts, not computed):
# the system and user turns, then the assistant turn.
SYSTEM_USER = {
    "qwen2.5": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>",
    "deepseek": "<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 2 + 2?",
}
ASSISTANT = {
    "qwen2.5": "<|im_start|>assistant\nIt is \\boxed{4}.<|im_end|>\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\nIt is \\boxed{4}.<|eot_id|>",
    "deepseek": "<｜Assistant｜>It is \\boxed{4}.<｜end▁of▁sentence｜>",
}
GENERATION_PROMPT = {
    "qwen2.5": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "deepseek": "<｜Assistant｜><think>\n",
}
# (BOS, EOS, pad, turn end) of the real checkpoints.
SPECIALS = {
    "qwen2.5": (None, "<|endoftext|>", "<|endoftext|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", None, "<|eot_id|>"),
    "deepseek": (
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
}
BOS_TOKENS = {"<|begin_of_text|>", "<｜begin▁of▁sentence｜>"}


@pytest.fixture(scope="module")
def tokenizers(layout_tokenizer_dirs: dict[str, str]) -> dict[str, object]:
    """Each layout saved and loaded back the way engines load it (``AutoTokenizer``)."""
    return {
        name: AutoTokenizer.from_pretrained(path) for name, path in layout_tokenizer_dirs.items()
    }


def _bos_count(tokenizer, ids: list[int]) -> int:
    return sum(t in BOS_TOKENS for t in tokenizer.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_special_tokens_are_the_real_ones(tokenizers, name):
    tok = tokenizers[name]
    bos, eos, pad, turn_end = SPECIALS[name]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)
    # Every special token is one token, with the same id in every layout (one vocabulary).
    for token in SPECIAL_TOKENS:
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizers["qwen2.5"].convert_tokens_to_ids(token)], token
    assert len(set(tokenizers["qwen2.5"].convert_tokens_to_ids(list(SPECIAL_TOKENS)))) == len(
        SPECIAL_TOKENS
    )
    assert tok.convert_tokens_to_ids(LAYOUTS[name].turn_end) == tok.convert_tokens_to_ids(turn_end)
    assert len(tok) == len(tokenizers["qwen2.5"])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_chat_template_renders_like_the_real_family(tokenizers, name):
    tok = tokenizers[name]
    assert tok.apply_chat_template(CHAT, tokenize=False) == SYSTEM_USER[name] + ASSISTANT[name]
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == SYSTEM_USER[name] + GENERATION_PROMPT[name]


def test_qwen_template_adds_the_math_system_prompt_when_none_is_given(tokenizers):
    prompt = tokenizers["qwen2.5"].apply_chat_template(
        CHAT[1:2], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        f"<|im_start|>system\n{COT_INSTRUCTION}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("name", "bos_from_tokenizer", "bos_in_template"),
    [("qwen2.5", 0, 0), ("llama3", 1, 1), ("deepseek", 1, 1)],
)
def test_bos_counts(tokenizers, name, bos_from_tokenizer, bos_in_template):
    tok = tokenizers[name]
    plain = tok("What is 2 + 2?")["input_ids"]
    assert _bos_count(tok, plain) == bos_from_tokenizer
    if bos_from_tokenizer:
        assert plain[0] == tok.bos_token_id
    rendered = SYSTEM_USER[name] + ASSISTANT[name]
    once = tok(rendered, add_special_tokens=False)["input_ids"]
    assert _bos_count(tok, once) == bos_in_template
    # The real trap: rendered text tokenized again with special tokens starts with two BOS.
    again = tok(rendered)["input_ids"]
    assert _bos_count(tok, again) == bos_in_template + bos_from_tokenizer
    assert again[bos_from_tokenizer:] == once
    assert tok.decode(once) == rendered


def test_llama_template_trims_message_content(tokenizers):
    chat = [{"role": "user", "content": "  padded  \n"}]
    text = tokenizers["llama3"].apply_chat_template(chat, tokenize=False)
    assert "<|end_header_id|>\n\npadded<|eot_id|>" in text


def test_deepseek_template_keeps_only_the_answer_after_think(tokenizers):
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "r</think>A"}]
    text = tokenizers["deepseek"].apply_chat_template(chat, tokenize=False)
    assert text.endswith("<｜Assistant｜>A<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_training_mix_holds_the_other_styles_in_chats_and_documents(tokenizers, name):
    """Most training sequences are chats answered in the native style; the shares of chats
    answered in the compact style or with LaTeX results, and of plain documents, follow the
    settings. A document is the problem then a compact or reference solution, closed by the
    EOS, with the loss on the solution only."""
    layout, tokenizer = LAYOUTS[name], tokenizers[name]
    settings = CpuWorldSettings()
    problems = sample_problems(1000, seed=5)
    examples = _encode_examples(problems, tokenizer, layout, settings, random.Random(0))
    counts = dict.fromkeys(["compact document", "reference document", "compact chat"], 0)
    counts |= {"latex chat": 0, "native chat": 0, "noisy chat": 0}
    bos = layout.bos_token or ""
    for e in examples:
        prompt = tokenizer.decode(e.input_ids[: e.num_prompt_tokens])
        solution = tokenizer.decode(e.input_ids[e.num_prompt_tokens :])
        document = next((p for p in problems if prompt == f"{bos}{p.problem}\n"), None)
        if document is not None:
            assert layout.turn_end not in solution or layout.turn_end == layout.eos_token
            style = "compact" if solution.startswith(document.compact) else "reference"
            assert solution == document.render(style) + layout.eos_token
            counts[f"{style} document"] += 1
            continue
        p = next(p for p in problems if p.problem in prompt)
        response = solution[: solution.index(layout.turn_end)]
        kinds = {p.compact: "compact", latex_results(p.native): "latex", p.native: "native"}
        counts[f"{kinds.get(response, 'noisy')} chat"] += 1
    n = len(examples)
    for key, rate in [
        ("compact document", settings.compact_text_rate),
        ("reference document", settings.reference_text_rate),
        ("compact chat", settings.compact_chat_rate),
        ("latex chat", settings.latex_chat_rate),
    ]:
        assert abs(counts[key] / n - rate) < 0.03, (key, counts)
    assert counts["native chat"] > n / 2 and 0 < counts["noisy chat"] < 0.1 * n
