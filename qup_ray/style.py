"""Style statistics of a trace: token-category frequencies that show "syntactic compaction".

An oracle rewrite replaces a student's natural-language scaffolding ("First, we ...", "So ...")
with dense symbols (`\\(`, `\\frac`, `=`, `^`). Counting each category of the student's own
tokens makes that shift measurable. Categories, checked in this order for every token:
- `symbol`: the token contains a LaTeX command or one of the configured symbol characters;
- `digit`: only digits (and . or ,);
- `scaffolding`: a configured scaffolding word ("so", "we", "let", "first", ...);
- `whitespace`: only spaces and newlines;
- `word`: everything else.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

CATEGORIES = ("symbol", "digit", "scaffolding", "whitespace", "word")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z()\[\]]")
_DIGITS = re.compile(r"^[\d.,]+$")


def token_category(piece: str, symbol_chars: str, scaffolding: frozenset[str]) -> str:
    """The category of one decoded token."""
    stripped = piece.strip()
    if not stripped:
        return "whitespace"
    if _LATEX_COMMAND.search(piece) or any(c in symbol_chars for c in stripped):
        return "symbol"
    if _DIGITS.match(stripped):
        return "digit"
    if stripped.lower().strip(",.:;!?") in scaffolding:
        return "scaffolding"
    return "word"


def style_stats(
    token_pieces: list[str], text: str, symbol_chars: str, scaffolding: frozenset[str]
) -> dict[str, Any]:
    """Counts and frequencies of each category, newlines, steps (non-empty lines), tokens per step."""
    counts = Counter(token_category(p, symbol_chars, scaffolding) for p in token_pieces)
    return stats_from_counts(counts, len(token_pieces), text)


def stats_from_counts(counts: Mapping[str, int], num_tokens: int, text: str) -> dict[str, Any]:
    """The style row of a trace from its category counts (what `style_stats` returns)."""
    total = max(num_tokens, 1)
    steps = sum(1 for line in text.splitlines() if line.strip())
    out: dict[str, Any] = {"num_tokens": num_tokens, "num_steps": steps,
                           "tokens_per_step": num_tokens / steps if steps else None,
                           "num_newlines": text.count("\n")}  # fmt: skip
    for cat in CATEGORIES:
        out[f"{cat}_count"] = counts.get(cat, 0)
        out[f"{cat}_freq"] = counts.get(cat, 0) / total
    return out
