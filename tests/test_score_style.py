"""Style statistics from a per-tokenizer table of decoded vocabulary pieces give exactly the rows
of the per-token implementation (`tokenizer.decode([i])` for every token, then
`style.style_stats`), for each of the three tokenizer layouts (fast: a small BPE is trained here)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qup_ray.config import ScoringConfig
from qup_ray.cpu_world.synthetic import sample_problems
from qup_ray.cpu_world.tokenizer import (
    LAYOUTS,
)
from qup_ray.scoring import style_rows
from qup_ray.style import style_stats


@pytest.fixture(scope="module")
def tokenizer_paths(layout_tokenizer_dirs: dict[str, str]) -> dict[str, str]:
    return layout_tokenizer_dirs


def _per_token_rows(path: str, texts: list[str], symbol_chars: str, scaffolding) -> list[dict]:
    """The former implementation: one decode per token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = [tokenizer.decode([i]) for i in ids]
        rows.append(style_stats(pieces, text, symbol_chars, scaffolding))
    return rows


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_vocabulary_table_rows_equal_per_token_decoding(tokenizer_paths, layout):
    scoring = ScoringConfig()
    scaffolding = frozenset(w.lower() for w in scoring.scaffolding_words)
    problems = sample_problems(60, seed=7)
    texts = [t for p in problems for t in (p.native, p.compact)]
    # Text the tokenizer never saw (bytes split across tokens), special tokens, empty text.
    texts += ["Ünïcödé √2 ≈ 1.414, so we find x² = 2.\n\n", "<|im_end|> then <|eot_id|>", ""]
    path = tokenizer_paths[layout]
    expected = _per_token_rows(path, texts, scoring.symbol_chars, scaffolding)
    assert style_rows(path, texts, scoring.symbol_chars, scaffolding) == expected
    assert sum(r["symbol_count"] for r in expected) > 0
    assert sum(r["scaffolding_count"] for r in expected) > 0
