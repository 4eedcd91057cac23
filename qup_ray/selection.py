"""Learner-compatibility streams: per problem, one trace chosen from a scored candidate pool.

Pure functions over candidate rows, shared by the streams stage and the tests. A candidate has
`problem_id`, `source` (where the trace came from: `slm_samples` for the student's own correct,
filtered rollouts, else the name of the paper stream), `trace`, `correct`, `mean_nll` (under the
student) and `reward` (of the first configured reward model). The rules:
- `slm_min_ppl`: the student's own samples only, lowest mean NLL (SLM-RFT picks one at random);
- `compat_select`: every source, lowest mean NLL under the student;
- `reward_select`: every source, highest reward.
Only correct candidates with the rule's score are eligible. Ties go to the candidate with the
smallest sha256 of (seed, problem_id, trace), then the smallest source name: deterministic, and
independent of the pool's order.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

OWN_SAMPLES = "slm_samples"


@dataclass(frozen=True)
class Rule:
    """One selection rule: which sources are eligible, which score, and which way is better."""

    sources: frozenset[str] | None
    """Eligible sources; None: all."""
    score: str
    """The candidate field compared."""
    higher_is_better: bool


RULES: dict[str, Rule] = {
    "slm_min_ppl": Rule(frozenset({OWN_SAMPLES}), "mean_nll", higher_is_better=False),
    "compat_select": Rule(None, "mean_nll", higher_is_better=False),
    "reward_select": Rule(None, "reward", higher_is_better=True),
}
SELECTION_STREAMS = tuple(RULES)


def tie_break(seed: int, problem_id: str, trace: str) -> str:
    """The seeded tie-break key of a candidate."""
    return hashlib.sha256(f"{seed}\x00{problem_id}\x00{trace}".encode()).hexdigest()


def select(name: str, candidates: list[dict], seed: int) -> tuple[list[dict], dict[str, int]]:
    """The chosen candidate of each problem under rule `name` (sorted by problem_id), and counts
    of what was not eligible (`wrong`, `other_source`, `no_score`) and of eligible candidates."""
    rule = RULES[name]
    counts: Counter[str] = Counter()
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for c in candidates:
        if rule.sources is not None and c["source"] not in rule.sources:
            counts["other_source"] += 1
        elif c["correct"] is not True:
            counts["wrong"] += 1
        elif c.get(rule.score) is None:  # over an engine's context: no score
            counts["no_score"] += 1
        else:
            counts["eligible"] += 1
            by_problem[c["problem_id"]].append(c)
    sign = -1.0 if rule.higher_is_better else 1.0
    chosen = [
        min(
            by_problem[pid],
            key=lambda c: (sign * c[rule.score], tie_break(seed, pid, c["trace"]), c["source"]),
        )
        for pid in sorted(by_problem)
    ]
    return chosen, dict(counts)
