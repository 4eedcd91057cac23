"""One encoding on every real tokenizer layout (the CPU world copies Qwen2.5-Math base, Llama-3
and DeepSeek-R1-Distill): exactly one BOS where the family has one, the template's turn-end token
closes every trace, the engine receives exactly these ids, and generation stops at the turn end."""

from __future__ import annotations

import pytest

from qup_ray.config import CONFIGS_DIR, load_config
from qup_ray.encoding import ChatFormat, count_bos

# student -> (BOS token or None, the token that ends an assistant turn, the EOS token)
LAYOUTS = {
    "tiny-qwen2": (None, "<|im_end|>", "<|endoftext|>"),
    "tiny-llama": ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"),
    "tiny-deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}
PROMPT = "tiny"


def _problems(n: int, seed: int = 5) -> list[dict]:
    from qup_ray.cpu_world import generate_problems

    return generate_problems(n, seed=seed, solution_style="native")


def _reference_chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """transformers' own tokenization of the chat (the template's text, no tokens added again)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("student", sorted(LAYOUTS))
def test_layout_one_bos_and_the_turn_end(cpu_world, student: str):
    bos, turn_end, eos = LAYOUTS[student]
    fmt = ChatFormat.for_model(cpu_world[student], PROMPT)
    tok = fmt.tokenizer
    assert tok.eos_token == eos
    assert [tok.convert_ids_to_tokens(i) for i in fmt.turn_end_ids] == [turn_end]
    assert fmt.stop_token_ids[0] == tok.convert_tokens_to_ids(turn_end)
    assert tok.convert_tokens_to_ids(eos) in fmt.stop_token_ids
    problem = _problems(1)[0]
    text = fmt.prompt_text(problem["problem"])
    ids = fmt.prompt_ids(problem["problem"])
    if bos is None:
        assert fmt.bos_token_id is None and count_bos(ids, tok.bos_token_id) == 0
    else:
        bos_id = tok.convert_tokens_to_ids(bos)
        assert fmt.bos_token_id == bos_id and count_bos(ids, bos_id) == 1
        # The trap the encoding avoids: the rendered text tokenized again gets a second BOS.
        assert count_bos(tok(text)["input_ids"], bos_id) == 2
    assert ids == _reference_chat_ids(tok, fmt.messages(problem["problem"]))


@pytest.mark.parametrize("student", sorted(LAYOUTS))
def test_perplexity_and_training_sequence_is_prompt_response_turn_end(cpu_world, student: str):
    _, turn_end, _ = LAYOUTS[student]
    fmt = ChatFormat.for_model(cpu_world[student], PROMPT)
    tok = fmt.tokenizer
    for p in _problems(3):
        ids, start = fmt.example(p["problem"], p["solution"])
        prompt = _reference_chat_ids(tok, fmt.messages(p["problem"]))
        response = tok(p["solution"], add_special_tokens=False)["input_ids"]
        assert ids == [*prompt, *response, tok.convert_tokens_to_ids(turn_end)]
        assert start == len(prompt)


@pytest.mark.slow
@pytest.mark.parametrize("student", sorted(LAYOUTS))
def test_engine_receives_the_encoding_and_stops_at_the_turn_end(cpu_world, student: str):
    from qup_ray.engines import VLLMGenerator, request_seed, shutdown_llm

    cfg = load_config(CONFIGS_DIR / "dryrun.yaml")
    engine = cfg.students[cfg.anchor_student].engine.model_dump()
    fmt = ChatFormat.for_model(cpu_world[student], PROMPT)
    problems = _problems(6, seed=17)
    batch = {
        "problem_id": [p["problem"] for p in problems],
        "prompt_ids": [fmt.prompt_ids(p["problem"]) for p in problems],
        "seed": [request_seed(0, student, i) for i in range(len(problems))],
    }
    base = {"n": 2, "temperature": 1.0, "max_tokens": 400}
    generator = VLLMGenerator(str(cpu_world[student]), engine, base, record_token_ids=True)
    try:
        # Without stop tokens (and the EOS ignored) a base model runs on past its turn end;
        # the same seeds with the family's stop tokens must end exactly there.
        generator.sampling = base | {"ignore_eos": True}
        free = _by_sample(generator(batch))
        generator.sampling = base | {"stop_token_ids": list(fmt.stop_token_ids)}
        stopped = _by_sample(generator(batch))
    finally:
        shutdown_llm(generator.llm)
    assert set(free) == set(stopped) and len(stopped) == 12
    for key, row in stopped.items():
        assert row["engine_prompt_ids"] == batch["prompt_ids"][batch["problem_id"].index(key[0])]
    stops = set(fmt.stop_token_ids)
    ran_past = 0
    for key, row in stopped.items():
        run_on = free[key]["token_ids"]
        first_stop = next((i for i, t in enumerate(run_on) if t in stops), None)
        if first_stop is None:  # never emitted a stop token within the limit
            assert row["finish_reason"] == "length"
            continue
        ran_past += first_stop + 1 < len(run_on)
        assert row["finish_reason"] == "stop"
        assert row["token_ids"] in (run_on[:first_stop], run_on[: first_stop + 1])
        # The stored response holds nothing of what came after the turn end.
        continuation = fmt.tokenizer.decode(run_on[first_stop + 1 :], skip_special_tokens=True)
        assert continuation.strip() == "" or continuation.strip() not in row["response"]
    assert ran_past >= 1  # the world is strict: without stops a student invents the next turn


def _by_sample(chunks) -> dict[tuple, dict]:
    out = {}
    for chunk in chunks:
        for i in range(len(chunk["problem_id"])):
            row = {k: v[i] for k, v in chunk.items()}
            out[(row["problem_id"], row["sample_idx"])] = row
    return out
