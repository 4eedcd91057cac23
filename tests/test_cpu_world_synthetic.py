"""Synthetic problems: schema, exact answers in every style, and recovery from text alone."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from qup_ray.cpu_world.boxed import is_correct, last_boxed, normalize_answer
from qup_ray.cpu_world.synthetic import (
    FAMILIES,
    STYLES,
    generate_problems,
    sample_problems,
    solve_problem_text,
)


def test_rows_have_the_numinamath_schema_and_are_reproducible():
    rows = generate_problems(300, seed=7)
    assert rows == generate_problems(300, seed=7)
    assert rows != generate_problems(300, seed=8)
    assert len({r["problem"] for r in rows}) == 300
    for row in rows:
        assert set(row) == {"source", "problem", "solution", "messages", "answer"}
        assert row["messages"] == [
            {"role": "user", "content": row["problem"]},
            {"role": "assistant", "content": row["solution"]},
        ]
        # NuminaMath's ground truth is the solution's last \boxed{}; it must equal `answer`.
        assert last_boxed(row["solution"]) == row["answer"]
    assert {r["source"] for r in rows} == {f"synthetic_{f}" for f in FAMILIES}


def test_answers_exercise_an_answer_checker():
    answers = [p.answer for p in sample_problems(2000, seed=0)]
    kinds = Counter()
    for a in answers:
        if re.fullmatch(r"-\d+", a):
            kinds["negative"] += 1
        elif re.fullmatch(r"\d+", a):
            kinds["integer"] += 1
        elif "\\frac" in a:
            kinds["fraction"] += 1
        elif re.fullmatch(r"-?\d+\.\d+", a):
            kinds["decimal"] += 1
        elif re.fullmatch(r"\(-?\d+, -?\d+\)", a):
            kinds["tuple"] += 1
        else:
            kinds["other"] += 1
    assert kinds["other"] == 0
    assert all(kinds[k] >= 50 for k in ("negative", "integer", "fraction", "decimal", "tuple")), (
        kinds
    )


def test_every_style_is_correct_and_the_styles_differ():
    for p in sample_problems(500, seed=3):
        for style in STYLES:
            assert is_correct(p.render(style), p.answer), (style, p)
        assert p.native.startswith("First, we ")
        assert "\nTherefore, the answer is \\boxed{" in p.native
        assert len(p.native.splitlines()) >= 3  # one step per line
        assert p.compact.startswith("\\(") and "\\therefore" in p.compact
        assert "First" not in p.compact and "we" not in p.compact.split()
        assert "$" in p.reference
        assert len(p.compact) < len(p.native)


def test_values_of_known_problems():
    cases = {
        "Compute $7 + 5 \\times 3 - 4$.": "18",
        "Evaluate $(2 + 3) \\times 4$.": "20",
        "Solve for $x$: $3x - 9 = -12$.": "-1",
        "Compute $\\frac{1}{2} + \\frac{1}{4}$. Give your answer as a fraction in lowest terms.": "\\frac{3}{4}",
        "Compute $\\frac{1}{3} - \\frac{5}{6}$. Give your answer as a fraction in lowest terms.": "-\\frac{1}{2}",
        "What is $25\\%$ of $18$?": "4.5",
        "Solve the system of equations $2x + y = 7$ and $x - y = -1$. Give your answer as an ordered pair $(x, y)$.": "(2, 3)",
    }
    for problem, answer in cases.items():
        solved = solve_problem_text(problem)
        assert solved is not None and solved.answer == answer, problem
        assert solved.problem == problem


def test_solve_problem_text_recovers_every_family_from_text_alone():
    for p in sample_problems(1000, seed=11):
        assert solve_problem_text(p.problem) == p
        prompt = (
            "You are given a math problem and a student's solution.\n\n"
            f"Problem:\n{p.problem}\n\nStudent solution:\n{p.native}\n\n"
            "Fix any mistakes and keep the student's style."
        )
        assert solve_problem_text(prompt) == p


def test_solve_problem_text_takes_the_first_quoted_problem():
    first, second = sample_problems(2, seed=5)
    assert solve_problem_text(f"{first.problem}\n\n{second.problem}") == first
    assert solve_problem_text(f"{second.problem} {first.problem}") == second


@pytest.mark.parametrize(
    "text",
    [
        "",
        "What is the meaning of life?",
        "Find all primes p such that p^2 + 2 is prime.",
        "Solve for $x$: $3x + 1 = 5$.",  # no integer solution: not a problem the generator writes
    ],
)
def test_solve_problem_text_declines_other_text(text):
    assert solve_problem_text(text) is None


def test_normalize_answer():
    assert normalize_answer("\\dfrac{3}{4}") == normalize_answer("\\frac{3}{4}")
    assert normalize_answer("( 2,  3 )") == "(2,3)"
    assert normalize_answer("$4.5$.") == "4.5"
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x") is None
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
