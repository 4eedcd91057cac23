"""One encoding of every sequence a student sees: generation prompts, perplexity sequences and
training examples are token ids built here, and nowhere else.

    fmt = ChatFormat.for_model(model_path, "qwen25_math_cot")
    fmt.prompt_ids(problem)              # what the generation engine receives
    ids, start = fmt.example(problem, trace)   # what perplexity scores and training learns
    fmt.stop_token_ids                   # where generation stops

Why one place: real tokenizers differ in ways a test world easily hides. Llama-3 and DeepSeek
tokenizers add a BOS token themselves *and* their chat templates write one, so rendered text that
is tokenized again starts with two; Qwen2.5-Math is a base model whose EOS (`<|endoftext|>`) is not
the token that ends an assistant turn (`<|im_end|>`). Here the chat is rendered to text by the
model's own template, tokenized without added special tokens, and given exactly one BOS where the
family has one; the response is closed by the template's turn-end token, which generation stops on.
Engines get these ids, never text to tokenize again, so the learner is sampled, measured and trained
under the same prefix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qup_ray.prompts import chat_messages, load_prompt, render_chat

_MARKER = "QUPRESPONSEMARKER"


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token: the named ones and added tokens flagged special (Llama-3's
    `<|eot_id|>` is only the latter)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return ids


def derive_turn_end(tokenizer: Any) -> list[int]:
    """The token that closes an assistant turn, read off the chat template: render a chat whose
    assistant message is a marker and take the special token that follows it (`<|im_end|>` for
    ChatML, `<|eot_id|>` for Llama-3, the EOS for DeepSeek). Falls back to the EOS token when the
    template writes nothing special after the message."""
    messages = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": _MARKER}]
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    after = text.split(_MARKER, 1)[1] if _MARKER in text else ""
    special = special_token_ids(tokenizer)
    for tok in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if tok in special:
            return [tok]
        if tokenizer.decode([tok]).strip():
            break  # ordinary text after the message: the template has no turn-end token
    if tokenizer.eos_token_id is None:
        raise ValueError("the chat template ends no turn with a special token and there is no EOS")
    return [tokenizer.eos_token_id]


def generation_eos_ids(model_path: str | Path) -> list[int]:
    """EOS ids of the checkpoint's generation_config.json (an int or a list), [] without one."""
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("1", add_special_tokens=True)["input_ids"][:1] == [bos]


@dataclass(frozen=True)
class ChatFormat:
    """A student's prompt file + tokenizer: how its prompts, traces and stops are encoded."""

    tokenizer: Any
    prompt: dict
    turn_end_ids: tuple[int, ...]
    """Token(s) that close an assistant turn; appended to every trace (and labelled in training)."""
    stop_token_ids: tuple[int, ...]
    """Generation stops on these: the turn end, the tokenizer's EOS and the checkpoint's
    generation-config EOS ids (Qwen's own evaluation stops on `<|im_end|>` and `<|endoftext|>`)."""
    bos_token_id: int | None
    """The BOS every sequence starts with exactly once, or None for families without one."""

    @classmethod
    def for_model(
        cls, model_path: str | Path, prompt_name: str | None, tokenizer: Any | None = None
    ) -> ChatFormat:
        """The format of a local model folder (or hub id in the cache) with a prompt file (None
        for a model that is sent whole chats, such as an open-weights oracle: `chat_ids`).

        The prompt file may name the turn-end token(s) (`turn_end: ["<|im_end|>"]`); otherwise
        they are read off the chat template (`derive_turn_end`)."""
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        prompt = load_prompt(prompt_name) if prompt_name else {}
        if prompt.get("turn_end"):
            turn_end = [tokenizer.convert_tokens_to_ids(t) for t in prompt["turn_end"]]
        else:
            turn_end = derive_turn_end(tokenizer)
        stops = [*turn_end]
        for tok in [tokenizer.eos_token_id, *generation_eos_ids(model_path)]:
            if tok is not None and tok not in stops:
                stops.append(tok)
        bos = tokenizer.bos_token_id if _tokenizer_adds_bos(tokenizer) else None
        return cls(tokenizer, prompt, tuple(turn_end), tuple(stops), bos)

    # ---- text (for manifests and reading) ----------------------------------------------------

    def messages(self, problem: str) -> list[dict[str, str]]:
        return chat_messages(self.prompt, problem=problem)

    def prompt_text(self, problem: str) -> str:
        """The rendered chat up to the assistant turn, as the template writes it."""
        return render_chat(self.tokenizer, self.messages(problem))

    # ---- token ids ---------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Rendered template text -> ids with exactly one leading BOS where the family has one
        (the template may or may not have written it; the tokenizer adds none here)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.bos_token_id is not None:
            while ids[:2] == [self.bos_token_id, self.bos_token_id]:
                ids = ids[1:]
            if ids[:1] != [self.bos_token_id]:
                ids = [self.bos_token_id, *ids]
        return ids

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A whole chat up to the assistant turn, as the engine receives it."""
        return self.encode_text(render_chat(self.tokenizer, messages))

    def prompt_ids(self, problem: str) -> list[int]:
        """The generation prompt: what the engine receives for `problem`."""
        return self.chat_ids(self.messages(problem))

    def response_ids(self, response: str) -> list[int]:
        """A trace's own tokens, without the turn end."""
        return self.tokenizer(response, add_special_tokens=False)["input_ids"]

    def example(self, problem: str, response: str) -> tuple[list[int], int]:
        """prompt ids + response ids + turn end, and where the response starts.

        The prompt and the response are tokenized separately, so the response's tokens do not
        depend on how a tokenizer would merge across the boundary. The turn-end token belongs to
        the response: perplexity scores it and training labels it, which is what teaches a student
        to stop."""
        prompt = self.prompt_ids(problem)
        return [*prompt, *self.response_ids(response), *self.turn_end_ids], len(prompt)


def count_bos(ids: Sequence[int], bos_token_id: int | None) -> int:
    """Leading BOS tokens of a sequence (1 is right for BOS families, 0 for the others)."""
    if bos_token_id is None:
        return 0
    n = 0
    while n < len(ids) and ids[n] == bos_token_id:
        n += 1
    return n


def fit_generation(prompt_len: int, max_new_tokens: int, max_model_len: int) -> int | None:
    """New tokens a request may generate within the engine's context: `max_new_tokens`, lowered
    so prompt + generation fits; None when the prompt leaves no room at all (a rejected row)."""
    room = max_model_len - prompt_len
    if room < 1:
        return None
    return min(max_new_tokens, room)
