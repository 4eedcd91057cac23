"""Prompts are data files in `configs/prompts/`; this module reads them and renders chats.

A prompt file has `system` (or null) and `user`, a Python format string with `{problem}`, and
optionally `turn_end`: the token(s) that close an assistant turn, when they should not be read off
the chat template (see `qup_ray.encoding`).
The text a model sees is the chat rendered by the model's own tokenizer chat template, and that
exact text is what stages record in their manifests.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from qup_ray.config import CONFIGS_DIR


@lru_cache(maxsize=64)
def load_prompt(name: str, prompts_dir: Path = CONFIGS_DIR / "prompts") -> dict[str, Any]:
    """The prompt file `<prompts_dir>/<name>.yaml` as {"system": ..., "user": ..., "turn_end": ...}."""
    data = yaml.safe_load((prompts_dir / f"{name}.yaml").read_text())
    return {"system": data.get("system"), "user": data["user"], "turn_end": data.get("turn_end")}


def chat_messages(prompt: dict[str, str | None], **fields: str) -> list[dict[str, str]]:
    """The chat (system?, user) for one problem; `fields` fill the user template."""
    messages = []
    if prompt.get("system"):
        messages.append({"role": "system", "content": prompt["system"]})
    messages.append({"role": "user", "content": str(prompt["user"]).format(**fields)})
    return messages


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
) -> str:
    """The exact prompt text: the chat through the tokenizer's own chat template."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
