"""Avg@k, its spread, pass@k and maj@k against independent computations on hand-built tables."""

from __future__ import annotations

import itertools
import random
import statistics

import numpy as np
import pytest

from qup_ray import metrics


def rows_from(answers: dict[str, list[tuple[str | None, bool | None]]]) -> list[dict]:
    """Per-sample rows as the eval stage writes them, from (extracted, correct) per sample."""
    rows = []
    for pid, samples in answers.items():
        for j, (extracted, correct) in enumerate(samples):
            status = (
                "ok"
                if correct is not None
                else ("no_answer" if extracted is None else "parse_error")
            )
            rows.append({"problem_id": pid, "sample_idx": j, "extracted": extracted,
                         "correct": correct, "status": status, "num_tokens": 10 + j,
                         "finish_reason": "length" if extracted is None else "stop"})  # fmt: skip
    return rows


def pass_at_k_by_enumeration(table: list[list[int]], k: int) -> float:
    """The definition itself: over every k-subset of a problem's samples, does one succeed."""
    per_problem = []
    for row in table:
        subsets = list(itertools.combinations(row, k))
        per_problem.append(sum(any(s) for s in subsets) / len(subsets))
    return float(np.mean(per_problem))


TABLES = {
    "mixed": [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [1, 0, 1, 0]],
    "all_correct": [[1, 1, 1, 1]] * 3,
    "none_correct": [[0, 0, 0, 0]] * 3,
    "k1": [[1], [0], [0], [1], [1]],
    "k8": [[1, 0, 0, 0, 0, 0, 0, 1], [0] * 8, [1] * 7 + [0], [0, 0, 1, 0, 0, 0, 0, 0]],
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_avg_and_pass_at_k_equal_the_definitions(name: str):
    table = TABLES[name]
    k = len(table[0])
    assert metrics.avg_at_k(table) == pytest.approx(float(np.asarray(table).mean()), abs=1e-12)
    for j in range(1, k + 1):
        assert metrics.pass_at_k(table, j) == pytest.approx(
            pass_at_k_by_enumeration(table, j), abs=1e-12
        )
    # The unbiased pass@1 is Avg@k: the mean over all samples, not the first sample's accuracy.
    assert metrics.pass_at_k(table, 1) == pytest.approx(metrics.avg_at_k(table), abs=1e-12)


def test_hand_computed_values():
    table = TABLES["mixed"]
    assert metrics.avg_at_k(table) == 9 / 20
    # Sample j of every problem is one run: run accuracies 3/5, 2/5, 2/5, 2/5.
    per_set = [3 / 5, 2 / 5, 2 / 5, 2 / 5]
    assert metrics.avg_at_k_std(table) == pytest.approx(statistics.stdev(per_set), abs=1e-12)
    # pass@2 per problem: 1 - C(n-c,2)/C(4,2): c=2 -> 5/6, c=0 -> 0, c=4 -> 1, c=1 -> 1/2, c=2 -> 5/6
    assert metrics.pass_at_k(table, 2) == pytest.approx((5 / 6 + 0 + 1 + 1 / 2 + 5 / 6) / 5)
    assert metrics.pass_at_k(table, 4) == pytest.approx(4 / 5)  # any correct sample at all
    assert metrics.pass_at_k_problem(16, 0, 16) == 0.0
    assert metrics.pass_at_k_problem(16, 1, 16) == 1.0
    assert metrics.pass_at_k_problem(16, 4, 1) == 0.25


def test_first_sample_accuracy_is_not_avg_at_k():
    """Qwen2.5-Math's kit reports the first sample's accuracy as `acc`; ours is the mean of all."""
    table = TABLES["mixed"]
    first_sample = float(np.mean([row[0] for row in table]))
    assert first_sample == 3 / 5 and metrics.avg_at_k(table) == 9 / 20


def test_pass_at_1_equals_avg_at_k_on_random_tables():
    rng = random.Random(0)
    for _ in range(200):
        k = rng.choice([1, 2, 3, 4, 8, 16])
        table = [
            [int(rng.random() < rng.random()) for _ in range(k)] for _ in range(rng.randint(1, 30))
        ]
        assert metrics.pass_at_k(table, 1) == pytest.approx(metrics.avg_at_k(table), abs=1e-12)
        column_means = np.asarray(table, dtype=float).mean(axis=0)
        std = metrics.avg_at_k_std(table)
        if k == 1:
            assert std is None
        else:
            assert std == pytest.approx(float(np.std(column_means, ddof=1)), abs=1e-12)


def test_spread_edge_cases():
    assert metrics.avg_at_k_std(TABLES["k1"]) is None
    assert metrics.avg_at_k_std(TABLES["all_correct"]) == 0.0
    assert metrics.avg_at_k_std(TABLES["none_correct"]) == 0.0
    with pytest.raises(ValueError, match="different numbers of samples"):
        metrics.avg_at_k_std([[1, 0], [1]])
    with pytest.raises(ValueError):
        metrics.pass_at_k_problem(4, 1, 5)  # k above the samples taken


def test_unverifiable_samples_count_as_wrong_and_are_counted():
    rows = rows_from({
        "p1": [("3", True), (None, None), ("x^", None), ("4", False)],
        "p2": [(None, None), (None, None), ("7", True), ("7", True)],
    })  # fmt: skip
    ids, table = metrics.correctness_table(rows)
    assert ids == ["p1", "p2"] and table == [[1, 0, 0, 0], [0, 0, 1, 1]]
    s = metrics.summarize(rows)
    assert s["num_problems"] == 2 and s["num_samples"] == 4
    assert s["avg_at_k"] == 3 / 8
    assert s["unverifiable_rate"] == 4 / 8
    assert s["truncation_rate"] == 3 / 8  # the rows without an answer were cut at the limit
    assert s["mean_tokens"] == np.mean([10, 11, 12, 13] * 2)
    assert s["pass_at_1"] == pytest.approx(3 / 8)
    assert s["pass_at_2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    assert s["pass_at_4"] == 1.0
    assert "pass_at_8" not in s  # only up to the samples taken
    # p1: votes 3 (correct), x^, 4: a three-way tie, the earliest (correct) wins; p2: 7 twice.
    assert s["maj_at_k"] == 1.0


def test_summary_columns_for_all_and_none_correct():
    all_ok = metrics.summarize(rows_from({f"p{i}": [("1", True)] * 4 for i in range(3)}))
    none_ok = metrics.summarize(rows_from({f"p{i}": [("2", False)] * 4 for i in range(3)}))
    assert all_ok["avg_at_k"] == all_ok["maj_at_k"] == all_ok["pass_at_4"] == 1.0
    assert none_ok["avg_at_k"] == none_ok["maj_at_k"] == none_ok["pass_at_4"] == 0.0
    assert all_ok["avg_at_k_std"] == none_ok["avg_at_k_std"] == 0.0
    single = metrics.summarize(rows_from({"p": [("1", True)], "q": [("2", False)]}))
    assert single["num_samples"] == 1 and single["avg_at_k_std"] is None
    assert single["pass_at_1"] == single["avg_at_k"] == single["maj_at_k"] == 0.5


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([("5", False), ("5", False), ("6", True)], False),  # a wrong answer outvotes the gold
        ([("5", False), ("\\frac{1}{2}", True), ("0.5", True)], True),  # correct forms are one vote
        ([("5", False), ("6", True)], False),  # tie: the earlier answer wins
        ([("6", True), ("5", False)], True),
        ([("x + 1", False), ("x+1", False), ("2", True)], False),  # spacing does not split votes
        ([(None, None), (None, None), ("2", True)], True),  # no answer, no vote
        ([(None, None), (None, None)], False),
        ([("2", True)], True),
    ],
)
def test_majority_vote(samples, expected):
    assert metrics.majority_correct(samples) is expected


def test_maj_at_k_against_an_independent_count():
    rng = random.Random(1)
    answers = {}
    for i in range(50):
        gold = str(rng.randint(0, 3))
        answers[f"p{i}"] = [
            (a, a == gold) for a in (str(rng.randint(0, 3)) for _ in range(5))
        ]  # fmt: skip
    rows = rows_from(answers)
    expected = []
    for samples in answers.values():
        counts: dict[str, int] = {}
        for a, _ in samples:
            counts[a] = counts.get(a, 0) + 1
        best = max(counts.values())
        winner = next(a for a, _ in samples if counts[a] == best)  # earliest among the tied
        expected.append(dict(samples)[winner])
    assert metrics.maj_at_k(rows) == pytest.approx(float(np.mean(expected)))


def test_total_avg_and_reported_ks():
    assert metrics.total_avg({"a": 0.2, "b": 0.4, "c": 0.9}) == pytest.approx(0.5)
    assert metrics.reported_pass_ks(16) == [1, 2, 4, 8, 16]
    assert metrics.reported_pass_ks(4) == [1, 2, 4]
    assert metrics.reported_pass_ks(1) == [1]


def test_duplicate_samples_are_refused():
    rows = rows_from({"p": [("1", True), ("1", True)]})
    rows[1]["sample_idx"] = 0
    with pytest.raises(ValueError, match="duplicate sample"):
        metrics.correctness_table(rows)
