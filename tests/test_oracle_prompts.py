"""The oracle's prompt files, the messages built from them, and the retention-score parser."""

from __future__ import annotations

import string

import pytest
import yaml

from qup_ray.config import CONFIGS_DIR
from qup_ray.cpu_world import solve_problem_text
from qup_ray.cpu_world.oracle_rules import (
    classify_request,
    judge_score,
    oracle_reply,
    repair_trace,
)
from qup_ray.oracle.prompts import (
    check_boxed_answer,
    check_retention_score,
    format_exemplars,
    parse_retention_score,
    refine_messages,
    retention_judge_messages,
    style_align_messages,
    synthesize_messages,
)

PLACEHOLDERS = {
    "refine": {"problem", "trace"},
    "synthesize": {"problem"},
    "style_align": {"problem", "trace", "exemplars"},
    "retention_judge": {"original", "refined"},
}
PROBLEM = "Solve for $x$: $3x + 5 = 20$."
OTHER_PROBLEMS = ["What is $50\\%$ of $22$?", "Solve for $x$: $2x - 6 = -8$."]


def solved(problem: str = PROBLEM):
    result = solve_problem_text(problem)
    assert result is not None, problem
    return result


@pytest.mark.parametrize("name", sorted(PLACEHOLDERS))
def test_prompt_file_has_exactly_its_placeholders(name: str):
    prompt = yaml.safe_load((CONFIGS_DIR / "prompts" / f"{name}.yaml").read_text())
    assert set(prompt) == {"system", "user"}
    fields = {f for _, f, _, _ in string.Formatter().parse(prompt["user"]) if f is not None}
    assert fields == PLACEHOLDERS[name]
    rendered = prompt["user"].format(**{f: "x" for f in fields})
    # Solving tasks ask for a boxed answer; the judge never writes one (see its file).
    assert ("\\boxed{}" in rendered) == (name != "retention_judge")


def test_synthesize_solves_in_compact_style_and_refine_repairs_the_trace():
    native = solved().native
    for messages in (synthesize_messages(PROBLEM), refine_messages(PROBLEM, native)):
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
        assert PROBLEM in messages[-1]["content"]
    assert oracle_reply(synthesize_messages(PROBLEM)) == ("solve", solved().compact)
    refine = refine_messages(PROBLEM, native)
    assert native in refine[-1]["content"]
    # The rule oracle finds the quoted trace and repairs it (compacting part of its wording).
    assert classify_request(refine) == "refine"
    assert oracle_reply(refine) == ("refine", repair_trace(native, solved(), compact=True))


def test_style_align_keeps_the_students_style():
    exemplars = [solved(p).native for p in OTHER_PROBLEMS]
    messages = style_align_messages(PROBLEM, solved().native, exemplars)
    text = "\n".join(m["content"] for m in messages)
    assert "keep the student's style" in text
    assert all(e in text for e in exemplars)
    assert classify_request(messages) == "style_aligned"
    # The rule oracle answers the problem under repair, not one of the exemplars' problems.
    assert oracle_reply(messages) == ("style_aligned", solved().native)


def test_format_exemplars():
    assert format_exemplars([]) == "(none)"
    block = format_exemplars(["a\n", "b"])
    assert block == "Example 1:\na\n\nExample 2:\nb"


def test_retention_judge_quotes_both_traces_as_paragraphs():
    original = solved().native
    messages = retention_judge_messages(original, solved().compact)
    assert classify_request(messages) == "judge"
    text = "\n".join(m["content"] for m in messages)
    paragraphs = [p for p in text.split("\n\n") if "\\boxed{" in p]
    assert paragraphs[:2] == [original, solved().compact]
    # Keeping the student's wording retains more than compacting it, as in the paper.
    same = judge_score(
        "\n".join(m["content"] for m in retention_judge_messages(original, original))
    )
    assert same > judge_score(text)
    kind, reply = oracle_reply(messages)
    assert kind == "judge" and parse_retention_score(reply) == judge_score(text)


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("Score: 4", 4),
        ("score:5", 5),
        ("**Score:** 4", 4),
        ("Final score = 2/5", 2),
        ("Score (1-5): 3", 3),
        ("The retention score is 5.", 5),
        ("A score of 5 means all is kept. Here much was merged.\nScore: 2", 2),
        ("Score: 2\n\nOn reflection... Final Score: 4", 4),
        ("**4/5**", 4),
        ("I'd rate it 4 out of 5", 4),
        ("Rating: 3", 3),
        ("I would rate it a 1.", 1),
        ("On a 1-5 scale I rate it 4", 4),
        ("On a scale of 1 to 5, I give it 3/5.", 3),
        ("4", 4),
        ("  **3**  ", 3),
        ("Score: 4.5", None),
        ("Score: 7", None),
        ("Score: 45", None),
        ("Score: 0", None),
        ("Score: N", None),
        ("The refined trace keeps most of the reasoning.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retention_score(text: str | None, score: int | None):
    assert parse_retention_score(text) == score


def test_reply_checks():
    assert check_boxed_answer("so \\boxed{3}") is None
    assert check_boxed_answer("so the answer is 3") is not None
    assert check_retention_score("Score: 3") is None
    assert check_retention_score("it keeps a lot") is not None
