"""The SLM-RFT stream: per problem, one of the student's own correct traces, lightly filtered.

Pure functions over rollout rows, shared by the rollouts stage and the tests. Filters, in order:
truncated (finish_reason=length), missing or conflicting boxed answers, degenerate repetition,
length outliers, exact duplicates. Each filter's count goes to the manifest.
"""

from __future__ import annotations

import hashlib
import random
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

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
    rollouts: Iterable[dict],
    problem_ids: set[str],
    cfg: RftFilterConfig,
    lengths: Sequence[int] | None = None,
    fields: Sequence[str] | None = None,
) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """The correct traces of each problem of `problem_ids` that pass the light filters (in
    sample order), and the count of each filter: the pool SLM-RFT (and `slm_min_ppl`) pick from.

    `rollouts` may be a stream (one pass over a table's rows) when `lengths` gives the
    `num_tokens` of its correct rows of `problem_ids` up front: the length-outlier limit needs
    them all before the first row is judged. With `fields`, a candidate keeps only those
    columns (bookkeeping without the text; exact duplicates are found by a digest)."""
    if lengths is None:
        rollouts = list(rollouts)
        lengths = [r["num_tokens"] for r in rollouts
                   if r["correct"] is True and r["problem_id"] in problem_ids]  # fmt: skip
    if len(lengths) >= 2:
        max_tokens = statistics.fmean(lengths) + cfg.length_outlier_z * statistics.pstdev(lengths)
    else:
        max_tokens = float("inf")
    counts: Counter[str] = Counter()
    found: dict[str, list[tuple[int, bytes, dict]]] = defaultdict(list)
    num_correct, solved = 0, set()
    for row in rollouts:
        if row["correct"] is not True or row["problem_id"] not in problem_ids:
            continue
        num_correct += 1
        solved.add(row["problem_id"])
        reason = filter_reason(row, cfg, max_tokens)
        if reason is not None:
            counts[reason] += 1
            continue
        kept = {k: row[k] for k in fields} if fields is not None else row
        digest = hashlib.sha256(row["response"].encode()).digest()
        found[row["problem_id"]].append((row["sample_idx"], digest, kept))
    by_problem: dict[str, list[dict]] = {}
    for pid in sorted(found):
        # The first of identical traces (in sample order) is kept, whatever order rows came in.
        seen: set[bytes] = set()
        for _, digest, kept in sorted(found[pid], key=lambda c: c[0]):
            if digest in seen:
                counts["exact_duplicate"] += 1
                continue
            seen.add(digest)
            by_problem.setdefault(pid, []).append(kept)
    counts["correct_traces"] = num_correct
    counts["problems_all_filtered"] = len(solved - set(by_problem))
    return by_problem, dict(counts)


def select_rft(
    rollouts: Iterable[dict],
    problem_ids: set[str],
    cfg: RftFilterConfig,
    seed: int,
    lengths: Sequence[int] | None = None,
    fields: Sequence[str] | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """One correct, filtered trace per problem of `problem_ids`; and the count of each filter
    (`lengths` and `fields` as in `rft_candidates`; `fields` must hold `num_tokens` and
    `sample_idx`, which `shortest` compares)."""
    by_problem, counts = rft_candidates(rollouts, problem_ids, cfg, lengths, fields)
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
