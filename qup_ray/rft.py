"""The SLM-RFT stream: per problem, one of the student's own correct traces, lightly filtered.

Pure functions over rollout rows, shared by the rollouts stage and the tests. Filters, in order:
truncated (finish_reason=length), missing or conflicting boxed answers, degenerate repetition,
length outliers, exact duplicates. Each filter's count goes to the manifest.
"""

from __future__ import annotations

import random
import re
import statistics
from collections import Counter, defaultdict

from qup_ray.answers import answer_parts, gold_from_solution
from qup_ray.config import RftFilterConfig

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def boxed_answers(text: str) -> list[str]:
    """Every \\boxed{}/\\fbox{} answer in a trace, in order."""
    starts = [m.start() for m in _BOX_RE.finditer(text)]
    if not starts:
        return []
    # Each segment holds exactly one box, so its last box is that box.
    segments = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    return [a for a in map(gold_from_solution, segments) if a is not None]


def repeated_ngram_fraction(text: str, n: int = 8) -> float:
    """Fraction of a trace's word n-grams taken by its most repeated n-gram (degenerate loops)."""
    words = text.split()
    if len(words) < 2 * n:
        return 0.0
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    _, count = grams.most_common(1)[0]
    return count * n / len(words) if count > 1 else 0.0


def filter_reason(row: dict, cfg: RftFilterConfig, max_tokens: float) -> str | None:
    """Why a correct trace is filtered out, or None when it is kept."""
    if row["finish_reason"] == "length":
        return "truncated"
    boxes = boxed_answers(row["response"])
    if not boxes:
        return "no_boxed_answer"
    # Several boxes are fine when together they are the final answer ("\boxed{1} and
    # \boxed{-2}"); a box outside that final group that differs from it is a conflict.
    if len(set(boxes)) > max(1, len(answer_parts(row["response"]))):
        return "conflicting_boxed_answers"
    if repeated_ngram_fraction(row["response"]) > cfg.max_repeated_ngram_frac:
        return "repetition"
    if row["num_tokens"] > max_tokens:
        return "length_outlier"
    return None


def rft_candidates(
    rollouts: list[dict], problem_ids: set[str], cfg: RftFilterConfig
) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """The correct traces of each problem of `problem_ids` that pass the light filters (in
    sample order), and the count of each filter: the pool SLM-RFT (and `slm_min_ppl`) pick from."""
    correct = [r for r in rollouts if r["correct"] is True and r["problem_id"] in problem_ids]
    lengths = [r["num_tokens"] for r in correct]
    if len(lengths) >= 2:
        max_tokens = statistics.fmean(lengths) + cfg.length_outlier_z * statistics.pstdev(lengths)
    else:
        max_tokens = float("inf")
    counts: Counter[str] = Counter()
    by_problem: dict[str, list[dict]] = defaultdict(list)
    seen_texts: set[tuple[str, str]] = set()
    for row in sorted(correct, key=lambda r: (r["problem_id"], r["sample_idx"])):
        reason = filter_reason(row, cfg, max_tokens)
        if reason is None and (row["problem_id"], row["response"]) in seen_texts:
            reason = "exact_duplicate"
        if reason is not None:
            counts[reason] += 1
            continue
        seen_texts.add((row["problem_id"], row["response"]))
        by_problem[row["problem_id"]].append(row)
    counts["correct_traces"] = len(correct)
    counts["problems_all_filtered"] = len({r["problem_id"] for r in correct} - set(by_problem))
    return dict(by_problem), dict(counts)


def select_rft(
    rollouts: list[dict], problem_ids: set[str], cfg: RftFilterConfig, seed: int
) -> tuple[list[dict], dict[str, int]]:
    """One correct, filtered trace per problem of `problem_ids`; and the count of each filter."""
    by_problem, counts = rft_candidates(rollouts, problem_ids, cfg)
    rng = random.Random(seed)
    chosen = []
    for pid in sorted(by_problem):
        candidates = by_problem[pid]
        if cfg.selection == "shortest":
            pick = min(candidates, key=lambda r: (r["num_tokens"], r["sample_idx"]))
        elif cfg.selection == "first":
            pick = candidates[0]
        else:
            pick = rng.choice(candidates)
        chosen.append(pick)
    counts["problems_with_a_kept_trace"] = len(chosen)
    return chosen, counts
