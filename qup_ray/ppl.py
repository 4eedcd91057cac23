"""Perplexity of a trace under a student: the paper's measure of adaptation cost.

Written once and shared: the score stage (vLLM prompt log-probabilities), the benchmark and the
tests (a transformers float32 forward pass) all reduce token log-probabilities with
`response_nll`, over the token sequence `qup_ray.encoding.ChatFormat.example` builds, the same
sequence the training stage learns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NUM_QUARTERS = 4


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
