"""The answer checker in one process: extraction, verification, and the no-eval guarantee."""

from __future__ import annotations

import decimal
import random
from decimal import ROUND_HALF_DOWN, ROUND_HALF_UP
from pathlib import Path

import pytest
import sympy
import sympy.parsing.sympy_parser as sympy_parser
import yaml

from qup_ray import answers
from qup_ray.answers import (
    MAX_ANSWER_CHARS,
    MAX_ANSWER_PARTS,
    Extraction,
    Gold,
    GradeResult,
    answer_parts,
    check,
    eval_guard,
    extract_answer,
    gold_from_solution,
    gold_text,
    is_safe_code,
    last_boxed,
    screen_answer,
)

CASES = yaml.safe_load((Path(__file__).parent / "answer_cases.yaml").read_text(encoding="utf-8"))


def _response(case: dict) -> str:
    if "response" in case:
        return case["response"]
    return "Some reasoning first.\n\nThe final answer is $\\boxed{" + case["boxed"] + "}$."


def _gold(case: dict) -> str | list[str]:
    """A case's gold answer: given, or the final boxes of its NuminaMath `solution`."""
    return case["gold"] if "gold" in case else gold_from_solution(case["solution"]) or ""


def _case_id(case: dict) -> str:
    answer = case.get("boxed", case.get("response", ""))
    return f"{_gold(case)!s:.25}|{answer:.35}|{case.get('lenient', False)}"


def test_table_is_large_and_covers_every_verdict() -> None:
    assert len(CASES) >= 150
    assert {case["expected"] for case in CASES} == {True, False, None}
    assert sum(case.get("lenient", False) for case in CASES) >= 10


def test_table_covers_answers_with_several_parts() -> None:
    """Issue 19: at least 60 cases of several boxes, sets and systems, number formats and
    relations, each kind with right answers and their wrong twins."""
    kinds = {"multi_box", "set_system", "number_format", "relation"}
    new = [case for case in CASES if "kind" in case]
    assert len(new) >= 60 and {case["kind"] for case in new} == kinds
    for kind in kinds:
        verdicts = [case["expected"] for case in new if case["kind"] == kind]
        assert verdicts.count(False) >= verdicts.count(True) - 1 >= 5, kind


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_table_case(case: dict) -> None:
    result = check(_gold(case), _response(case), lenient=case.get("lenient", False))
    assert result.correct is case["expected"], result
    assert (result.status == "ok") is (result.correct is not None)
    if "mode" in case:
        assert result.extract_mode == case["mode"]


# --- GradeResult -------------------------------------------------------------------------------


def test_grade_result_never_hides_cannot_verify_as_wrong() -> None:
    with pytest.raises(ValueError):
        GradeResult("5", False, "parse_error", "boxed")
    with pytest.raises(ValueError):
        GradeResult("5", None, "ok", "boxed")
    with pytest.raises(ValueError):
        GradeResult("5", None, "crashed", "boxed")
    row = GradeResult("5", True, "ok", "boxed").as_row()
    assert row == {"extracted": "5", "correct": True, "status": "ok", "extract_mode": "boxed"}


# --- extraction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{5}", "5"),
        ("a \\boxed{1} b \\boxed{2} c", "2"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
        ("\\fbox{7}", "7"),
        ("\\boxed 12.", "12"),
        ("\\boxed{12", None),
        ("\\boxed{3} and \\boxed{4", None),
        ("no box", None),
        ("\\boxed", None),
        ("\\boxedx{3}", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


def test_extraction_modes_are_recorded() -> None:
    assert extract_answer("\\boxed{3}") == Extraction("3", "boxed")
    assert extract_answer("The answer is 3.") == Extraction(None, None)
    assert extract_answer("The answer is 3.", lenient=True) == Extraction("3", "lenient_phrase")
    assert extract_answer("x = 2, so y = 7", lenient=True) == Extraction("7", "lenient_last_number")
    assert extract_answer("nothing here", lenient=True) == Extraction(None, None)
    assert check("3", "The answer is 3.", lenient=True).extract_mode == "lenient_phrase"


def test_last_boxed_is_fast_on_a_megabyte() -> None:
    assert last_boxed("\\boxed{" + "1" * 1_000_000 + "}") == "1" * 1_000_000


def test_gold_from_numinamath_solution() -> None:
    solution = "We find $x = 2$, hence the sum is $\\boxed{\\frac{9}{4}}$."
    assert gold_from_solution(solution) == "\\frac{9}{4}"
    assert gold_from_solution("A proof with no final answer.") is None
    assert gold_from_solution("\\boxed{}") is None
    several = "The pairs are $\\boxed{(2,1)}, \\boxed{(1,2)}, \\boxed{(-1,-20)}$."
    assert gold_from_solution(several) == "(2,1), (1,2), (-1,-20)"


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("\\boxed{5}", ["5"]),
        ("$\\boxed{1}$ and $\\boxed{-2}$.", ["1", "-2"]),
        ("\\boxed{1}, \\boxed{2}; \\boxed{3} or \\fbox{4}", ["1", "2", "3", "4"]),
        ("\\[\\boxed{1}\\]\n\n\\[\\boxed{2}\\]", ["1", "2"]),
        ("$\\boxed{1} \\text{ and } \\boxed{2}$", ["1", "2"]),
        ("\\boxed{1} \\quad \\boxed{2}", ["1", "2"]),
        ("\\boxed 5, \\boxed 6", ["5", "6"]),
        ("First \\boxed{3}, but on reflection \\boxed{5}.", ["5"]),
        ("\\boxed{2}, \\boxed{3} and finally \\boxed{6}", ["6"]),
        ("$\\boxed{7}$ $\\boxed{7}$", ["7"]),
        ("$x = \\boxed{1}$, $y = \\boxed{2}$", ["x = 1", "y = 2"]),
        ("\\(x_1 = \\boxed{2}\\) and \\(x_2 = \\boxed{3}\\)", ["x_1 = 2", "x_2 = 3"]),
        ("$x = \\boxed{1}$ or $x = \\boxed{-1}$", ["1", "-1"]),
        ("$x^2 = \\boxed{4}$ and $y = \\boxed{2}$", ["4", "2"]),
        ("$\\boxed{x = 1}, \\boxed{y = 2}$", ["x = 1", "y = 2"]),
        ("$\\boxed{\\boxed{5}}$", ["5"]),
        ("\\boxed{1} and \\boxed{2", []),
        ("\\boxed{1} and \\boxed{ }", []),
        ("\\boxed{} and \\boxed{2}", ["2"]),
        ("no box", []),
    ],
)
def test_answer_parts(text: str, parts: list[str]) -> None:
    assert answer_parts(text) == parts


def test_answer_parts_are_bounded_on_pathological_text() -> None:
    many = "$\\boxed{1}$, " * 100_000 + "$\\boxed{2}$"
    assert len(answer_parts(many)) == 2  # repeated parts count once
    distinct = ", ".join(f"\\boxed{{{n}}}" for n in range(100_000))
    assert answer_parts(distinct) == [str(n) for n in range(100_000 - MAX_ANSWER_PARTS, 100_000)]
    assert answer_parts("\\boxed{" * 200_000 + "1" + "}" * 200_000) == ["1"]
    assert extract_answer("\\boxed{1} and " + " " * 1_000_000 + "\\boxed{2}").text == "2"


def test_gold_text_from_string_or_list() -> None:
    assert gold_text("$\\frac{1}{2}$") == "\\frac{1}{2}"
    assert gold_text(["$3$", "$5$"]) == "3, 5"
    assert gold_text(["\\boxed{7}"]) == "7"


def test_gold_is_parsed_once_and_reused() -> None:
    gold = Gold.parse("\\frac{1}{2}")
    responses = ["\\boxed{0.5}", "\\boxed{\\frac{2}{4}}", "\\boxed{1/3}", "no answer"] * 4
    verdicts = [check(gold, response).correct for response in responses]
    assert verdicts == [True, True, False, None] * 4
    assert Gold.parse("").error and Gold.parse("\\boxed{}").error


# --- screening and the no-eval guarantee --------------------------------------------------------


def test_screen_refuses_long_nested_and_code_like_answers() -> None:
    assert screen_answer("1" * (MAX_ANSWER_CHARS + 1))
    assert screen_answer("(" * 2000 + "1" + ")" * 2000)
    assert screen_answer("__import__('os')")
    assert screen_answer("lambda: 0")
    assert screen_answer("\\frac{1}{2}") is None
    assert screen_answer("\\text{important}") is None


INJECTIONS = [
    "__import__('os').system('touch {marker}')",
    "exec(\"open('{marker}', 'w').write('x')\")",
    'eval(\'__import__("os").system("touch {marker}")\')',
    "(lambda: __import__('os').system('touch {marker}'))()",
    "getattr(__import__('os'), 'system')('touch {marker}')",
    "().__class__.__bases__[0].__subclasses__()",
    "__builtins__.open('{marker}', 'w')",
    "\\text{{__import__('os').system('touch {marker}')}}",
    "os.system('touch {marker}')",
]


@pytest.mark.parametrize("lenient", [False, True])
@pytest.mark.parametrize("screened", [True, False], ids=["screened", "screen-bypassed"])
def test_injected_code_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lenient: bool, screened: bool
) -> None:
    if not screened:  # the parser path alone must be safe too
        monkeypatch.setattr(answers, "screen_answer", lambda answer: None)
    marker = tmp_path / "pwned"
    for template in INJECTIONS:
        code = template.format(marker=marker)
        for response in (f"\\boxed{{{code}}}", f"The answer is {code}", code):
            result = check("\\frac{1}{7}", response, lenient=lenient)
            assert result.correct is not True
    assert not marker.exists()


def test_eval_guard_refuses_code_and_keeps_literals(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with eval_guard():
        with pytest.raises(answers.UnsafeEvalError):
            sympy.sympify(f"__import__('os').system('touch {marker}')")
        with pytest.raises(answers.UnsafeEvalError):
            sympy.sympify("Integer(1).__class__")
        assert sympy.Number("12") == 12
        assert sympy.sympify("x + 1") == sympy.Symbol("x") + 1
    assert not marker.exists()
    assert sympy_parser.eval_expr is answers._original_eval_expr  # restored afterwards


@pytest.mark.parametrize(
    ("code", "safe"),
    [
        ("Integer (12 )", True),
        ("Float ('1.5' )", True),
        ("Symbol ('x' )+Integer (1 )", True),
        ("E", True),
        ("__import__('os')", False),
        ("Integer (1 ).__class__", False),
        ("(lambda: 1)()", False),
        ("[x for x in ()]", False),
        ("open('f')", False),
        ("1 +", False),
    ],
)
def test_is_safe_code(code: str, safe: bool) -> None:
    assert is_safe_code(code) is safe


# --- verdicts without the parser agree with math-verify -----------------------------------------


@pytest.mark.parametrize(
    ("gold", "answer", "expected"),
    [
        ("5", "5.0", True),
        ("\\frac{3}{4}", "0.75", True),
        ("\\frac{3}{4}", "3/4", True),
        ("\\frac{3}{4}", "\\frac{4}{3}", False),
        ("-12", "12", False),
        ("\\frac{1}{3}", "0.333333", None),  # decimals that differ: math-verify rounds
        ("1.5", "1.05", None),
        ("\\frac{1}{0}", "1", None),
        ("(1, 2)", "\\left( 1,2 \\right)", True),
        ("\\pi r", "\\pir", None),  # spacing between letters matters
        ("(1, 2)", "(2, 1)", False),
        ("\\{1, 2\\}", "\\{2, 1\\}", True),
        ("\\{1, 2\\}", "\\{1, 2, 2\\}", None),  # repeats: left to the parser
        ("[0, 1)", "[0, 1]", None),  # other brackets: left to the parser
        ("(1,000, 2)", "(1000, 2)", None),  # maybe a thousands separator
        ("", "", None),
    ],
)
def test_quick_verdict(gold: str, answer: str, expected: bool | None) -> None:
    assert answers.quick_verdict(gold, answer) is expected


def test_quick_verdicts_agree_with_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    decided = []
    for case in CASES:
        response = _response(case)
        extraction = extract_answer(response, lenient=case.get("lenient", False))
        gold = Gold.parse(_gold(case))
        if extraction.text and gold.error is None:
            quick = answers.quick_verdict(gold.text, extraction.text)
            if quick is not None:
                decided.append((gold, extraction.text, quick))
    assert len(decided) >= 60
    monkeypatch.setattr(answers, "quick_verdict", lambda gold, answer: None)
    for gold, answer, quick in decided:
        assert answers.compare(gold, answer) == (quick, "ok"), (gold.text, answer)


# --- the rounding rule, against decimal arithmetic ----------------------------------------------


def test_rounded_match_is_correct_rounding_of_the_exact_value() -> None:
    """A decimal counts for p/q exactly when Python's decimal module rounds p/q to it (half up
    or half down) with at least 4 places and 4 significant digits."""
    rng = random.Random(19)
    context = decimal.Context(prec=60)
    accepted = 0
    for _ in range(3000):
        p, q = rng.randint(-3000, 3000), rng.randint(1, 997)
        places = rng.randint(1, 7)
        exact = context.divide(decimal.Decimal(p), decimal.Decimal(q))
        step = decimal.Decimal(1).scaleb(-places)
        rounded = {exact.quantize(step, rounding=mode) for mode in (ROUND_HALF_UP, ROUND_HALF_DOWN)}
        candidate = rng.choice(sorted(rounded)) + rng.choice([0, 0, 1, -1]) * step
        text = f"{candidate:.{places}f}"
        significant = len(text.lstrip("-").replace(".", "").lstrip("0"))
        expected = candidate == exact or (candidate in rounded and places >= 4 and significant >= 4)
        accepted += expected
        gold = f"{'-' if p < 0 else ''}\\frac{{{abs(p)}}}{{{q}}}"
        assert answers.rounded_match(gold, text) is expected, (gold, text)
    assert accepted > 300
