"""SLM-RFT selection and filters on hand-made rollouts (independent of any engine)."""

from __future__ import annotations

from qup_ray.config import RftFilterConfig
from qup_ray.rft import boxed_answers, repeated_ngram_fraction, select_rft


def rollout(pid: str, idx: int, text: str, *, correct=True, finish="stop", tokens=None) -> dict:
    return {"problem_id": pid, "sample_idx": idx, "response": text, "correct": correct,
            "finish_reason": finish, "num_tokens": tokens or len(text.split())}  # fmt: skip


def test_boxed_answers_and_repetition():
    assert boxed_answers("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == ["1", "\\frac{1}{2}"]
    assert boxed_answers("none") == []
    loop = " ".join(["so we add one more"] * 40)
    assert repeated_ngram_fraction(loop) > 0.9
    assert repeated_ngram_fraction("First we add 2 and 3. So the sum is 5. \\boxed{5}") == 0.0


def test_filters_are_counted_and_one_trace_per_problem():
    rows = [
        rollout("p1", 0, "We add. \\boxed{5}", tokens=10),
        rollout("p1", 1, "First we add two numbers. So \\boxed{5}", tokens=12),
        rollout("p1", 2, "We add. \\boxed{5}", tokens=10),  # duplicate of sample 0
        rollout("p2", 0, "cut off \\boxed{3}", finish="length"),
        rollout("p2", 1, "no box at all 3"),
        rollout("p2", 2, "\\boxed{3} or maybe \\boxed{4}"),
        rollout("p3", 0, " ".join(["so we add one more"] * 40) + " \\boxed{1}"),
        rollout("p4", 0, "wrong \\boxed{9}", correct=False),
        rollout("p4", 1, "not verifiable", correct=None),
        rollout("p5", 0, "Not in the problem set. \\boxed{1}"),
    ]
    cfg = RftFilterConfig(selection="shortest", length_outlier_z=10.0)
    chosen, counts = select_rft(rows, {"p1", "p2", "p3", "p4"}, cfg, seed=0)
    assert [(c["problem_id"], c["sample_idx"]) for c in chosen] == [("p1", 0)]
    assert counts == {
        "truncated": 1, "no_boxed_answer": 1, "conflicting_boxed_answers": 1, "repetition": 1,
        "exact_duplicate": 1, "correct_traces": 7, "problems_with_a_kept_trace": 1,
        "problems_all_filtered": 2,
    }  # fmt: skip


def test_selection_policies_and_length_outliers():
    rows = [
        rollout("p", i, f"{' '.join(map(str, range(n)))} \\boxed{{1}}", tokens=n)
        for i, n in enumerate([30, 10, 20])
    ]
    rows += [rollout(f"q{i}", 0, f"q{i} \\boxed{{1}}", tokens=10) for i in range(30)]
    rows.append(rollout("long", 0, "long \\boxed{1}", tokens=10_000))
    ids = {r["problem_id"] for r in rows}
    first, _ = select_rft(rows, ids, RftFilterConfig(selection="first"), seed=0)
    shortest, counts = select_rft(rows, ids, RftFilterConfig(selection="shortest"), seed=0)
    pick = {c["problem_id"]: c["sample_idx"] for c in first}
    assert pick["p"] == 0 and {c["problem_id"]: c["sample_idx"] for c in shortest}["p"] == 1
    assert "long" not in pick and counts["length_outlier"] == 1
    a, _ = select_rft(rows, ids, RftFilterConfig(selection="random"), seed=3)
    b, _ = select_rft(rows, ids, RftFilterConfig(selection="random"), seed=3)
    assert a == b  # seeded


def test_a_multi_part_final_answer_is_no_conflict():
    rows = [
        rollout("roots", 0, "Factor: (x-1)(x+2)=0. The roots are \\boxed{1} and \\boxed{-2}"),
        rollout("early", 0, "First \\boxed{7}. Then we add more, so the answer is \\boxed{9}"),
    ]
    chosen, counts = select_rft(rows, {"roots", "early"}, RftFilterConfig(), seed=0)
    assert [c["problem_id"] for c in chosen] == ["roots"]
    assert counts["conflicting_boxed_answers"] == 1
