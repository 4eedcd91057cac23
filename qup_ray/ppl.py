"""Perplexity of a trace under a student: the paper's measure of adaptation cost.

Written once and shared: the score stage (vLLM prompt log-probabilities), the benchmark and the
tests (a transformers float32 forward pass) all reduce token log-probabilities with
`response_nll`, and all build the token sequence with `encode_example`, the same chat formatting
the training stage uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

NUM_QUARTERS = 4


def encode_example(tokenizer: Any, prompt_text: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response + end-of-turn, and where the response starts.

    The prompt (chat up to the assistant turn) and the response are tokenized separately, so
    the response's tokens do not depend on how a tokenizer would merge across the boundary;
    training uses exactly this sequence, with the loss on the response tokens only. The
    end-of-turn token is part of the response: it is what teaches a student to stop.
    """
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    return [*prompt_ids, *response_ids], len(prompt_ids)


def quarter_bounds(num_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of Q1..Q4 over `num_tokens` response tokens: contiguous, sizes differing by
    at most one, earlier quarters the larger (numpy.array_split's rule)."""
    base, extra = divmod(num_tokens, NUM_QUARTERS)
    bounds, start = [], 0
    for q in range(NUM_QUARTERS):
        end = start + base + (1 if q < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def response_nll(
    token_logprobs: Sequence[float], response_start: int
) -> dict[str, float | int | None]:
    """Mean NLL and PPL = exp(mean NLL) over the response tokens, overall and per quarter.

    `token_logprobs[i]` is log p(token i | tokens < i); position 0 has no prediction and is
    ignored. A quarter with no tokens (responses shorter than 4 tokens) has None.
    """
    logprobs = np.asarray(token_logprobs[response_start:], dtype=np.float64)
    if response_start < 1 or logprobs.size == 0:
        raise ValueError("a response needs at least one token after a non-empty prompt")
    nll = -logprobs
    out: dict[str, float | int | None] = {
        "num_tokens": int(nll.size),
        "mean_nll": float(nll.mean()),
    }
    out["ppl"] = math.exp(out["mean_nll"])
    for q, (start, end) in enumerate(quarter_bounds(nll.size), start=1):
        part = nll[start:end]
        out[f"q{q}_mean_nll"] = float(part.mean()) if part.size else None
        out[f"q{q}_ppl"] = math.exp(part.mean()) if part.size else None
    return out
