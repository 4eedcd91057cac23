"""The five benchmarks' loaders on local files in each dataset's own column layout
(tests/data/benchmarks/), with their quirks: AMC23's float answers, Minerva's boxed gold,
OlympiadBench's list-valued answers (every item required) and units."""

from __future__ import annotations

from pathlib import Path

import pytest

from qup_ray.answers import check
from qup_ray.config import CONFIGS_DIR, DatasetSource, load_config
from qup_ray.data import load_problems, strip_unit

DATA = Path(__file__).parent / "data" / "benchmarks"


@pytest.fixture(scope="module")
def paper_benchmarks():
    return load_config(CONFIGS_DIR / "paper.yaml").evaluation.benchmarks


def load(paper_benchmarks, name: str, file: str | None = None, fields: dict | None = None):
    """A paper benchmark read from its local fixture instead of the hub, same field map."""
    source = paper_benchmarks[name].source
    local = DatasetSource(
        kind="local", path=str(DATA / (file or f"{name}.jsonl")), split=source.split,
        fields=source.fields if fields is None else fields,
    )  # fmt: skip
    return load_problems(local, name)


def graded(gold: str, response: str) -> bool | None:
    return check(gold, response).correct


def test_paper_config_names_the_five_benchmarks(paper_benchmarks):
    assert sorted(paper_benchmarks) == [
        "aime24", "amc23", "math500", "minerva_math", "olympiadbench"
    ]  # fmt: skip
    assert all(b.source.kind == "hub" for b in paper_benchmarks.values())


def test_math500_and_aime24(paper_benchmarks):
    rows, rejected = load(paper_benchmarks, "math500")
    assert [r["answer"] for r in rows] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "26000"]
    assert rejected == [] and {r["benchmark"] for r in rows} == {"math500"}
    assert graded(rows[0]["answer"], "so \\boxed{(3, \\frac{\\pi}{2})}") is True
    rows, rejected = load(paper_benchmarks, "aime24")
    assert [r["answer"] for r in rows] == ["204", "025"] and rejected == []
    assert graded(rows[1]["answer"], "\\boxed{25}") is True  # AIME's zero-padded answers


def test_amc23_float_answers_are_integers(paper_benchmarks):
    rows, rejected = load(paper_benchmarks, "amc23")
    assert [r["answer"] for r in rows] == ["27", "36", "0.375"] and rejected == []
    assert graded(rows[0]["answer"], "They meet \\boxed{27} miles from A.") is True
    assert graded(rows[0]["answer"], "\\boxed{27.0}") is True
    assert graded(rows[0]["answer"], "\\boxed{28}") is False
    assert graded(rows[2]["answer"], "\\boxed{\\frac{3}{8}}") is True


def test_minerva_gold_inside_boxed(paper_benchmarks):
    rows, rejected = load(paper_benchmarks, "minerva_math")
    assert [r["answer"] for r in rows] == ["1.6", "2 \\pi \\sqrt{\\frac{m}{k}}"]
    assert rejected == []
    assert graded(rows[1]["answer"], "\\boxed{2\\pi\\sqrt{m/k}}") is True
    # The original layout (problem/solution, no answer column): the solution's last \boxed{}.
    rows, rejected = load(
        paper_benchmarks, "minerva_math", "minerva_math_original.jsonl", fields={}
    )
    assert [r["answer"] for r in rows] == ["1.6"]
    assert [(r["row_index"], r["reason"]) for r in rejected] == [
        (1, "no \\boxed{} answer in the solution")
    ]
    assert graded(rows[0]["answer"], "the image is \\boxed{1.6 \\text{ cm}}") is True


def test_olympiadbench_lists_every_item_required_and_units(paper_benchmarks):
    rows, rejected = load(paper_benchmarks, "olympiadbench")
    answers = [r["answer"] for r in rows]
    assert answers == ["2", "(6,3),(9,3),(9,5),(54,5)", "2, -2", "40 \\sqrt{2}", "6"]
    assert [r["reason"] for r in rejected] == ["no gold answer in field 'final_answer'"]
    # Its list of reference solutions is kept as text, not refused.
    assert rows[0]["solution"].startswith("Sergey can determine")
    pairs, both, diagonal, height = answers[1], answers[2], answers[3], answers[4]
    assert graded(pairs, "\\boxed{(9,3),(6,3),(54,5),(9,5)}") is True
    assert graded(pairs, "\\boxed{(6,3),(9,3)}") is False  # every item is required
    assert graded(both, "\\boxed{-2, 2}") is True
    assert graded(both, "\\boxed{2}") is False
    # The unit column: the gold is the bare quantity; a unit in the box does not matter.
    assert graded(diagonal, "\\boxed{40\\sqrt{2}}") is True
    assert graded(diagonal, "\\boxed{40\\sqrt{2} \\mathrm{~m}}") is True
    assert graded(height, "\\boxed{6 \\text{ cm}}") is True


@pytest.mark.parametrize(
    ("answer", "unit", "expected"),
    [
        ("$5 \\mathrm{~m}$", "$\\mathrm{~m}$", "5"),
        ("5 \\, \\mathrm{kg}", "\\mathrm{kg}", "5"),
        ("$3$, $4 \\mathrm{~s}$", "\\mathrm{~s}", "3, 4"),
        ("12", "cm", "12"),  # no unit in the answer: unchanged
        ("12", None, "12"),
        ("m", "m", "m"),  # never strip an answer down to nothing
    ],
)
def test_strip_unit(answer: str, unit: str | None, expected: str):
    assert strip_unit(answer, unit) == expected
