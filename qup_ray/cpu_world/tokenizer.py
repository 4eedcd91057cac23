"""The CPU world's tokenizer: a small byte-level BPE trained on synthetic math text.

Byte-level, so any text (an oracle reply, a real prompt) encodes without unknown tokens; digits
are split one by one like Qwen's tokenizer, which makes arithmetic learnable for a tiny model.
Saved as a transformers ``PreTrainedTokenizerFast`` with a ChatML chat template
(``<|im_start|>role\\n...<|im_end|>``), so vLLM and transformers render chats identically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# The Qwen2.5-Math zero-shot chain-of-thought instruction; students see it in training prompts
# (as a system message or after the problem) so the evaluation prompt is familiar to them.
COT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ``vocab_size`` entries trained on ``texts``, ready for chat."""
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
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Write the tokenizer files (tokenizer.json, config, chat template) into ``out_dir``."""
    tokenizer.save_pretrained(str(out_dir))
