"""The oracle's tasks as chat messages, and the parsing of what comes back.

The prompts are data files in ``configs/prompts/`` (``system`` and ``user``, ``user`` a Python
format string): ``refine`` ({problem} {trace}), ``synthesize`` ({problem}), ``style_align``
({problem} {trace} {exemplars}) and ``retention_judge`` ({original} {refined}). The functions
here fill them in; ``check_*`` are reply checks for ``OracleClient.complete_many(check=...)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from qup_ray.prompts import chat_messages, load_prompt

REFINE_PROMPT = "refine"
SYNTHESIZE_PROMPT = "synthesize"
STYLE_ALIGN_PROMPT = "style_align"
RETENTION_JUDGE_PROMPT = "retention_judge"


def refine_messages(problem: str, trace: str) -> list[dict[str, str]]:
    """Ask the oracle to repair a student trace with minimal intervention (Oracle-Refined)."""
    return chat_messages(load_prompt(REFINE_PROMPT), problem=problem, trace=trace)


def synthesize_messages(problem: str) -> list[dict[str, str]]:
    """Ask the oracle to solve a problem from scratch (Oracle-Synthesized)."""
    return chat_messages(load_prompt(SYNTHESIZE_PROMPT), problem=problem)


def format_exemplars(traces: Sequence[str]) -> str:
    """The student's example traces as one numbered block for the style-align prompt."""
    if not traces:
        return "(none)"
    return "\n\n".join(f"Example {i}:\n{t.strip()}" for i, t in enumerate(traces, start=1))


def style_align_messages(
    problem: str, trace: str, exemplars: Sequence[str]
) -> list[dict[str, str]]:
    """Ask the oracle to fix a trace's logic in the student's own style (Style-Aligned); the
    ``exemplars`` are other traces by the same student, showing that style."""
    return chat_messages(
        load_prompt(STYLE_ALIGN_PROMPT),
        problem=problem,
        trace=trace,
        exemplars=format_exemplars(exemplars),
    )


def retention_judge_messages(original: str, refined: str) -> list[dict[str, str]]:
    """Ask a judge how much of ``original``'s reasoning ``refined`` keeps (1-5)."""
    return chat_messages(
        load_prompt(RETENTION_JUDGE_PROMPT), original=original.strip(), refined=refined.strip()
    )


# Patterns from the most to the least explicit; within one, the last match wins (a judge that
# explains the scale first gives its own score last).
# A number that is not the start of a scale ("1-5", "1 to 5") nor part of a longer number.
_NUMBER = r"(\d+(?:\.\d+)?)(?!\d|\.\d|\s*(?:-|–|to)\s*\d)"
_SCORE_PATTERNS = (
    # "Score: 4", "**Score:** 4", "Final score = 4/5", "score (1-5): 4", "the score is 4"
    re.compile(
        r"\bscore\b\s*(?:\(\s*1\s*(?:-|–|to)\s*5\s*\))?[\s:*=_]*(?:is\s+|of\s+)?\**\s*" + _NUMBER,
        re.IGNORECASE,
    ),
    # "**4/5**", "4 out of 5"
    re.compile(_NUMBER + r"\s*(?:/|out\s+of)\s*5\b", re.IGNORECASE),
    # "I'd rate it a 4", "Rating: 3"
    re.compile(
        r"\b(?:rate|rating|rated)\b(?:[^\d\n]|1\s*(?:-|–|to)\s*5){0,40}?" + _NUMBER, re.IGNORECASE
    ),
    # a bare "4" as the whole reply
    re.compile(r"\A\s*\**\s*" + _NUMBER + r"\s*\**\s*\.?\s*\Z"),
)


def parse_retention_score(text: str | None) -> int | None:
    """The judge's 1-5 retention score in ``text``; ``None`` when there is none, or it is not a
    whole number from 1 to 5 ("cannot tell" is ``None``, never a guess)."""
    if not text:
        return None
    for pattern in _SCORE_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            value = matches[-1]
            if "." in value:
                return None
            score = int(value)
            return score if 1 <= score <= 5 else None
    return None


def check_boxed_answer(content: str) -> str | None:
    """Reply check of solving tasks: the reply must end in a ``\\boxed{}`` final answer."""
    return None if "\\boxed{" in content else "no \\boxed{} final answer"


def check_retention_score(content: str) -> str | None:
    """Reply check of the retention judge: the reply must hold a parseable 1-5 score."""
    return None if parse_retention_score(content) is not None else "no 1-5 score in the reply"
