"""Minimal exact-match grading for the CPU world's own checks (not the project's answer checker).

The build-time pass@8 check and the CPU-world tests grade with these few lines so that they do
not depend on ``qup_ray.answers``; synthetic gold answers are canonical, so exact match after
light normalisation is enough.
"""

from __future__ import annotations

import re


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (braces balanced), or ``None``."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: the answer was cut off


def normalize_answer(answer: str) -> str:
    """Spaces, ``$``, ``\\left``/``\\right``, ``\\dfrac`` and a trailing period removed."""
    text = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\\left|\\right|\\!|\\,|\$|\s", "", text)
    return text.rstrip(".")


def is_correct(response: str, gold: str) -> bool:
    """Whether the last boxed answer of ``response`` equals ``gold`` after normalisation."""
    extracted = last_boxed(response)
    return extracted is not None and normalize_answer(extracted) == normalize_answer(gold)
