"""What the rule oracle answers: pure functions from chat messages to a reply text.

The rule oracle stands in for GPT-5.2. It reads the synthetic problem quoted in the request,
solves it exactly and writes:

- for a **synthesis** request (the problem alone): a fresh solution in the **compact** style
  (dense symbolic LaTeX, the paper's "syntactic compaction");
- for a **refinement** request (the problem and a student's trace, ``quoted_trace``): a minimal
  repair of that trace (``repair_trace``): the student's steps, in the student's order and
  wording, with wrong numbers fixed, a missing or wrong step or answer set right, and part of
  the wording compacted (each step's result in symbolic LaTeX), as the
  paper's oracle does. It is a different text from the synthesized one, and keeps enough of the
  student's words for the retention judge to score it about 4 of 5;
- for a **style-aligned** request: the same repair without compaction, in the student's own
  style (a fresh native-style solution when no trace is quoted). The signal is a phrase
  anywhere in the messages that matches ``STYLE_ALIGNED_RE``, such as "keep the student's
  style", "strictly preserve the student's own style", "match the original style", or the
  marker ``[style-aligned]``.

A **retention-judge** request (``JUDGE_RE``: the words score/rate/rating and a "1-5" or
"1 to 5" scale) gets ``"Score: N"``. N comes from the first two paragraphs (blank-line
separated) that contain ``\\boxed{``, taken as the original and the rewritten trace:
``1 + round(3 * word_jaccard) + (1 if their boxed answers agree)``, clipped to 1..5; 3 when the
request does not quote two traces. A style-preserving rewrite therefore scores higher than a
compacted one, as in the paper.

A request without a recognisable problem gets a plausible reply without a final answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from qup_ray.cpu_world.boxed import last_boxed, normalize_answer
from qup_ray.cpu_world.synthetic import SolvedProblem, latex_result, solve_problem_text

RequestKind = Literal["judge", "style_aligned", "refine", "solve", "unrecognised"]

STYLE_ALIGNED_RE = re.compile(
    r"\[style-aligned\]"
    r"|\b(?:keep|preserve|retain|match)\w*\s+(?:\w+\s+){0,3}?"
    r"(?:student['’]s|original|native)\s+(?:own\s+)?(?:writing\s+)?style",
    re.IGNORECASE,
)
JUDGE_RE = re.compile(r"\b(?:score|rate|rating)\b", re.IGNORECASE)
JUDGE_SCALE_RE = re.compile(r"\b1\s*(?:-|–|to)\s*5\b")

UNRECOGNISED_REPLY = (
    "Let us look at the quantities in the problem and the relations between them.\n"
    "Combining the given conditions step by step narrows down what the answer can be.\n"
    "Checking each case carefully, we see which values remain consistent."
)


def message_texts(messages: Sequence[dict]) -> list[str]:
    """The text of each message (string content, or the text parts of a content list)."""
    texts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        texts.append(content if isinstance(content, str) else "")
    return texts


def classify_request(messages: Sequence[dict]) -> RequestKind:
    """Which kind of request ``messages`` make (see the module docstring for the signals)."""
    text = "\n".join(message_texts(messages))
    if JUDGE_RE.search(text) and JUDGE_SCALE_RE.search(text):
        return "judge"
    if _find_problem(messages) is None:
        return "unrecognised"
    if STYLE_ALIGNED_RE.search(text):
        return "style_aligned"
    return "refine" if quoted_trace(messages) is not None else "solve"


def _find_problem(messages: Sequence[dict]):
    # User messages first: the problem is quoted there; a system prompt may hold examples.
    texts = message_texts(messages)
    ordered = [t for m, t in zip(messages, texts, strict=True) if m.get("role") == "user"]
    ordered += [t for m, t in zip(messages, texts, strict=True) if m.get("role") != "user"]
    for text in ordered:
        solved = solve_problem_text(text)
        if solved is not None:
            return solved
    return None


def quoted_trace(messages: Sequence[dict]) -> str | None:
    """The student's trace a request quotes: the first blank-line-separated paragraph of a user
    message with a non-empty ``\\boxed{...}``, without a heading line such as "Student's
    solution:"; ``None`` if there is none (the problem alone has no boxed answer)."""
    texts = message_texts(messages)
    for m, text in zip(messages, texts, strict=True):
        if m.get("role") != "user":
            continue
        for paragraph in re.split(r"\n\s*\n", text):
            answer = last_boxed(paragraph)
            if answer is None or not answer.strip():
                continue
            lines = paragraph.strip().splitlines()
            if len(lines) > 1 and lines[0].rstrip().endswith(":") and "\\boxed{" not in lines[0]:
                lines = lines[1:]
            return "\n".join(lines)
    return None


_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")


def repair_trace(trace: str, solved: SolvedProblem, compact: bool) -> str:
    """A minimal repair of the student's ``trace`` of ``solved``'s problem.

    Steps are compared, in order, with the exact native solution's steps: a student step whose
    numbers are right is kept as written, one with wrong numbers is replaced by the right step,
    a missing step is added and steps past the last one are dropped. The conclusion states the right
    answer. With ``compact``, part of the wording is compacted as the paper's oracle does: each
    step's result becomes inline LaTeX (``to get \\(2x=10\\)``); the sentences, their order and
    their scaffolding words stay the student's, and so does the conclusion's style. (Writing the
    conclusion as the compact style's ``\\(\\therefore \\boxed{...}\\)`` too cost the students
    about 25 nats in their own context, more than a whole compact solution, which put the
    refinement above the synthesis, against the paper's ordering: docs/cpu-paradox.md.)
    A trace the student wrote in the compact style (its first line is LaTeX, as a student
    answers now and then) is compared with the compact solution's steps instead, so a right
    one is kept as written.
    """
    mine = [line.strip() for line in trace.splitlines() if line.strip()]
    right = (solved.compact if mine and mine[0].startswith("\\(") else solved.native).splitlines()
    right_steps, conclusion = right[:-1], right[-1]
    mine_steps = [line for line in mine if "\\boxed{" not in line]
    steps = []
    for i, target in enumerate(right_steps):
        steps.append(_repair_step(mine_steps[i], target) if i < len(mine_steps) else target)
    if compact:
        steps = [latex_result(step) for step in steps]
    return "\n".join([*steps, conclusion])


def _repair_step(mine: str, target: str) -> str:
    """``mine`` if its numbers are the right step's (its wording is kept), else the right step."""
    return mine if _NUMBER_RE.findall(mine) == _NUMBER_RE.findall(target) else target


def judge_score(text: str) -> int:
    """The 1-5 retention score of the two traces quoted in ``text`` (3 if there are not two)."""
    traces = [p for p in re.split(r"\n\s*\n", text) if "\\boxed{" in p]
    if len(traces) < 2:
        return 3
    a, b = traces[0], traces[1]
    words_a, words_b = set(a.lower().split()), set(b.lower().split())
    jaccard = len(words_a & words_b) / max(1, len(words_a | words_b))
    ans_a, ans_b = last_boxed(a), last_boxed(b)
    same = (
        ans_a is not None
        and ans_b is not None
        and normalize_answer(ans_a) == normalize_answer(ans_b)
    )
    return max(1, min(5, 1 + round(3 * jaccard) + int(same)))


def oracle_reply(messages: Sequence[dict]) -> tuple[RequestKind, str]:
    """The request's kind and the rule oracle's reply text."""
    kind = classify_request(messages)
    if kind == "judge":
        return kind, f"Score: {judge_score(chr(10).join(message_texts(messages)))}"
    solved = _find_problem(messages)
    if solved is None:
        return "unrecognised", UNRECOGNISED_REPLY
    trace = quoted_trace(messages) if kind in ("refine", "style_aligned") else None
    if trace is not None:
        return kind, repair_trace(trace, solved, compact=kind == "refine")
    return kind, solved.render("native" if kind == "style_aligned" else "compact")


def count_tokens(text: str) -> int:
    """Whitespace tokens: the rule oracle's stand-in for a tokenizer in ``usage``."""
    return len(text.split())


def strip_answer(text: str) -> str:
    """``text`` cut before its final ``\\boxed{``: a malformed reply with no final answer."""
    cut = text.rfind("\\boxed{")
    return text if cut < 0 else text[:cut].rstrip()
