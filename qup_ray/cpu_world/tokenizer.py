"""The CPU world's tokenizers: one small byte-level BPE, saved in the layouts of three real families.

Byte-level, so any text (an oracle reply, a real prompt) encodes without unknown tokens; digits
are split one by one like Qwen's tokenizer, which makes arithmetic learnable for a tiny model.
The vocabulary holds the special tokens of all three families, so the token ids are the same in
every layout (a student can start from another's weights). Each layout copies a real
checkpoint's special-token behaviour and chat template, with its traps:

- ``qwen2.5`` (Qwen2.5-Math base): no BOS; EOS and pad ``<|endoftext|>``; ChatML with the
  Qwen2.5-Math default system prompt; the assistant turn ends with ``<|im_end|>``, which is *not*
  the EOS, so a generation without stop tokens runs on into a next turn.
- ``llama3`` (Llama-3.1 base with the Llama-3 chat template): the tokenizer itself prepends
  ``<|begin_of_text|>`` (a post-processor) *and* the template writes ``{{ bos_token }}``, so
  rendered text tokenized again starts with two BOS; turn end ``<|eot_id|>``; EOS
  ``<|end_of_text|>``; no pad token.
- ``deepseek`` (DeepSeek-R1-Distill-Qwen): the tokenizer prepends ``<｜begin▁of▁sentence｜>`` and
  the template writes ``{{ bos_token }}`` too; ``<｜User｜>``/``<｜Assistant｜>`` roles, the system
  prompt bare after the BOS, generation prompt ``<｜Assistant｜><think>\\n``; the assistant turn
  ends with the EOS ``<｜end▁of▁sentence｜>``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

LayoutName = Literal["qwen2.5", "llama3", "deepseek"]

# The Qwen2.5-Math zero-shot chain-of-thought instruction; students see it in training prompts
# (as a system message or after the problem) so the evaluation prompt is familiar to them.
COT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _jinja_str(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'") + "'"


# Qwen2.5-Math's template without the tool branches: ChatML, and the CoT instruction as the
# system prompt when the chat brings none.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- " + _jinja_str(f"<|im_start|>system\n{COT_INSTRUCTION}<|im_end|>\n") + " }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Meta-Llama-3-Instruct's template, verbatim (note `| trim` and the BOS on the first message).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# DeepSeek-R1-Distill's template without the tool branches: BOS, the system prompt bare, then
# <｜User｜>/<｜Assistant｜> turns; an assistant turn keeps only what follows `</think>`.
DEEPSEEK_TEMPLATE = (
    "{%- set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- set ns.system_prompt = message['content'] %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{- bos_token }}{{- ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}"
    "{%- endif %}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Layout:
    """The special tokens and chat template of one real model family."""

    name: LayoutName
    bos_token: str | None
    """The BOS token, or None (Qwen base models have none)."""
    tokenizer_adds_bos: bool
    """Whether ``tokenizer(text)`` prepends the BOS itself (a post-processor)."""
    eos_token: str
    pad_token: str | None
    turn_end: str
    """The token that closes an assistant turn in the chat template."""
    generation_eos: tuple[str, ...]
    """``eos_token_id`` of ``generation_config.json`` (what engines stop on by default)."""
    special_tokens: tuple[str, ...]
    """The family's own special tokens (all of them are in the shared vocabulary)."""
    chat_template: str


LAYOUTS: dict[LayoutName, Layout] = {
    "qwen2.5": Layout(
        name="qwen2.5",
        bos_token=None,
        tokenizer_adds_bos=False,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        turn_end="<|im_end|>",
        generation_eos=("<|endoftext|>",),
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        chat_template=QWEN_TEMPLATE,
    ),
    "llama3": Layout(
        name="llama3",
        bos_token="<|begin_of_text|>",
        tokenizer_adds_bos=True,
        eos_token="<|end_of_text|>",
        pad_token=None,
        turn_end="<|eot_id|>",
        generation_eos=("<|end_of_text|>",),
        special_tokens=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        chat_template=LLAMA3_TEMPLATE,
    ),
    "deepseek": Layout(
        name="deepseek",
        bos_token="<｜begin▁of▁sentence｜>",
        tokenizer_adds_bos=True,
        eos_token="<｜end▁of▁sentence｜>",
        pad_token="<｜end▁of▁sentence｜>",
        turn_end="<｜end▁of▁sentence｜>",
        generation_eos=("<｜end▁of▁sentence｜>",),
        special_tokens=(
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
        ),
        chat_template=DEEPSEEK_TEMPLATE,
    ),
}
# Every family's special tokens, in a fixed order: they get the ids 0..n-1 in the vocabulary.
SPECIAL_TOKENS = tuple(
    dict.fromkeys(t for layout in LAYOUTS.values() for t in layout.special_tokens)
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with at most ``vocab_size`` entries trained on ``texts``, holding every
    family's special tokens; ``as_layout`` turns it into a family's tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    logger.info("trained a byte-level BPE with %d tokens", tok.get_vocab_size())
    return tok


def as_layout(bpe: Tokenizer, layout: Layout) -> PreTrainedTokenizerFast:
    """The shared BPE as a transformers tokenizer with ``layout``'s special tokens and template."""
    tok = copy.deepcopy(bpe)
    if layout.tokenizer_adds_bos:
        bos = layout.bos_token
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    others = [t for t in layout.special_tokens if t not in (layout.bos_token, layout.eos_token)]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=layout.bos_token,
        eos_token=layout.eos_token,
        pad_token=layout.pad_token,
        additional_special_tokens=others,
        chat_template=layout.chat_template,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def token_ids(tokenizer: PreTrainedTokenizerFast, layout: Layout) -> dict[str, int | None]:
    """The layout's BOS, EOS, pad and turn-end ids in ``tokenizer`` (None where absent)."""
    ids = {
        "bos": layout.bos_token,
        "eos": layout.eos_token,
        "pad": layout.pad_token,
        "turn_end": layout.turn_end,
    }
    return {k: None if t is None else tokenizer.convert_tokens_to_ids(t) for k, t in ids.items()}


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Write the tokenizer files (tokenizer.json, config, chat template) into ``out_dir``."""
    tokenizer.save_pretrained(str(out_dir))
