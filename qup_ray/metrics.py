"""Downstream-utility metrics of sampled answers: Avg@k, its spread, unbiased pass@k, maj@k.

Pure functions over a *correctness table* (one row per problem, one column per sample: 1 for a
verified-correct sample, 0 for everything else) and the graded samples behind it. Written once,
used by the eval stage's summaries and by the report.

- Avg@k: the mean correctness over all k samples of all problems. Not the first sample's
  accuracy (what Qwen2.5-Math's kit reports as `acc`), not the best of k.
- Its spread: the sample standard deviation (ddof=1) of the accuracy of each of the k sample
  sets (sample j of every problem is one run of the benchmark); None for k=1.
- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k) per problem
  with n samples of which c are correct, averaged over problems. pass@1 equals Avg@k.
- maj@k: a problem counts when the most frequent final answer among its samples is correct.
- An unverifiable sample (grading status not `ok`: no answer, unparseable, timed out) counts as
  wrong everywhere and is counted separately (`unverifiable_rate`), never dropped.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PASS_KS = (1, 2, 4, 8, 16)
"""The k of the reported pass@k columns, as far as the samples taken allow."""

_SPACE_RE = re.compile(r"\s+")


def correctness_table(rows: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[list[int]]]:
    """(problem ids, table) from graded sample rows (problem_id, sample_idx, correct).

    Row i of the table holds problem i's samples in sample_idx order; `correct` None
    (unverifiable) counts as 0. Problems come in order of first appearance."""
    samples: dict[str, dict[int, int]] = defaultdict(dict)
    for row in rows:
        per_problem = samples[row["problem_id"]]
        if row["sample_idx"] in per_problem:
            raise ValueError(f"duplicate sample {row['sample_idx']} of {row['problem_id']}")
        per_problem[row["sample_idx"]] = 1 if row["correct"] is True else 0
    ids = list(samples)
    return ids, [[samples[p][j] for j in sorted(samples[p])] for p in ids]


def avg_at_k(table: Sequence[Sequence[int]]) -> float:
    """Mean correctness over every sample of every problem."""
    cells = [c for row in table for c in row]
    if not cells:
        raise ValueError("no samples")
    return sum(cells) / len(cells)


def avg_at_k_std(table: Sequence[Sequence[int]]) -> float | None:
    """Sample standard deviation (ddof=1) over the k sample sets of the benchmark accuracy each
    set gives alone; None with a single sample per problem. Every problem needs k samples."""
    k = _samples_per_problem(table)
    if k < 2:
        return None
    per_set = [sum(row[j] for row in table) / len(table) for j in range(k)]
    mean = sum(per_set) / k
    return math.sqrt(sum((a - mean) ** 2 for a in per_set) / (k - 1))


def pass_at_k_problem(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: the chance that k of its n samples, drawn without
    replacement, include at least one of the c correct ones."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k(table: Sequence[Sequence[int]], k: int) -> float:
    """Mean over problems of the unbiased pass@k (Chen et al. 2021)."""
    if not table:
        raise ValueError("no problems")
    return sum(pass_at_k_problem(len(row), sum(row), k) for row in table) / len(table)


def reported_pass_ks(num_samples: int) -> list[int]:
    """The k of `PASS_KS` that `num_samples` samples per problem allow."""
    return [k for k in PASS_KS if k <= num_samples]


def vote_key(extracted: str | None, correct: bool | None) -> str | None:
    """What a sample votes for in maj@k: every correct sample the gold answer (they are all equal
    to it, so to each other, however they are written); another answer its text without spaces;
    a sample without an extracted answer does not vote."""
    if correct is True:
        return "\x00gold"
    if extracted is None or not extracted.strip():
        return None
    return _SPACE_RE.sub("", extracted)


def majority_correct(samples: Sequence[tuple[str | None, bool | None]]) -> bool:
    """Whether the most voted answer among (extracted, correct) samples is correct. A tie goes
    to the answer whose first vote comes earliest; no votes at all is wrong."""
    votes: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, (extracted, correct) in enumerate(samples):
        key = vote_key(extracted, correct)
        if key is not None:
            votes[key] = votes.get(key, 0) + 1
            first.setdefault(key, i)
    if not votes:
        return False
    winner = max(votes, key=lambda key: (votes[key], -first[key]))
    return winner == vote_key(None, True)


def maj_at_k(rows: Iterable[Mapping[str, Any]]) -> float:
    """Fraction of problems whose majority answer over all their samples is correct."""
    by_problem: dict[str, list[tuple[int, str | None, bool | None]]] = defaultdict(list)
    for row in rows:
        by_problem[row["problem_id"]].append((row["sample_idx"], row["extracted"], row["correct"]))
    if not by_problem:
        raise ValueError("no samples")
    wins = [
        majority_correct([(extracted, correct) for _, extracted, correct in sorted(samples)])
        for samples in by_problem.values()
    ]
    return sum(wins) / len(wins)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every summary column of one (model, benchmark) from its per-sample rows (problem_id,
    sample_idx, extracted, correct, status, num_tokens, finish_reason)."""
    ids, table = correctness_table(rows)
    k = _samples_per_problem(table)
    out: dict[str, Any] = {
        "num_problems": len(ids),
        "num_samples": k,
        "avg_at_k": avg_at_k(table),
        "avg_at_k_std": avg_at_k_std(table),
    }
    out |= {f"pass_at_{j}": pass_at_k(table, j) for j in reported_pass_ks(k)}
    out["maj_at_k"] = maj_at_k(rows)
    n = len(rows)
    out["truncation_rate"] = sum(r["finish_reason"] == "length" for r in rows) / n
    out["unverifiable_rate"] = sum(r["status"] != "ok" for r in rows) / n
    out["mean_tokens"] = sum(r["num_tokens"] for r in rows) / n
    return out


def total_avg(avg_by_benchmark: Mapping[str, float]) -> float:
    """Total Avg: the unweighted mean of a model's Avg@k over its benchmarks."""
    if not avg_by_benchmark:
        raise ValueError("no benchmarks")
    return sum(avg_by_benchmark.values()) / len(avg_by_benchmark)


def _samples_per_problem(table: Sequence[Sequence[int]]) -> int:
    sizes = {len(row) for row in table}
    if len(sizes) != 1:
        raise ValueError(f"problems have different numbers of samples: {sorted(sizes)}")
    return sizes.pop()
