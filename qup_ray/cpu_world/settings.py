"""Settings of the CPU world: sizes, training budgets and seeds of the tiny models.

Embedded in the experiment config under the key ``cpu_world``. Every field except ``cache_dir``
is part of the content hash that names the cached build, so changing one rebuilds the world.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Head sizes vLLM's CPU attention backend accepts (16 fails at the first forward pass).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class TinyLMSettings(BaseModel):
    """Shape and training budget of one tiny student language model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    hidden_size: int = Field(128, ge=32)
    """Width of the residual stream."""
    num_hidden_layers: int = Field(2, ge=1)
    """Number of transformer blocks."""
    num_attention_heads: int = Field(4, ge=1)
    """Query heads; ``hidden_size / num_attention_heads`` must be a head size vLLM-CPU supports."""
    num_key_value_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention); must divide ``num_attention_heads``."""
    intermediate_size: int = Field(384, ge=1)
    """Width of the MLP."""
    seed: int = 0
    """Seed of the weight initialisation and of the order of training examples."""
    train_steps: int = Field(1000, ge=1)
    """Optimizer steps before the first pass@8 check."""
    max_train_steps: int = Field(1500, ge=1)
    """Upper bound on optimizer steps: while the build-time pass@8 check is below
    ``min_pass_at_8``, training goes on in phases of ``train_steps / 4`` at half the peak rate."""
    batch_size: int = Field(16, ge=1)
    """Training sequences per optimizer step."""
    learning_rate: float = Field(4e-3, gt=0)
    """Peak AdamW learning rate (linear warm-up, then cosine decay to a tenth)."""

    @model_validator(mode="after")
    def _check_heads(self) -> TinyLMSettings:
        problems = []
        head_size, rest = divmod(self.hidden_size, self.num_attention_heads)
        if rest or head_size not in VLLM_CPU_HEAD_SIZES:
            problems.append(
                f"hidden_size / num_attention_heads = {self.hidden_size / self.num_attention_heads:g}"
                f" is not a head size vLLM-CPU supports {VLLM_CPU_HEAD_SIZES}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_key_value_heads must divide num_attention_heads")
        if self.max_train_steps < self.train_steps:
            problems.append("max_train_steps must be at least train_steps")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class WarmStartSettings(BaseModel):
    """Training budget of a student that starts from another student's trained weights and
    continues on its own family's chat layout (same architecture and vocabulary)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    seed: int = 0
    """Seed of the order of training examples."""
    train_steps: int = Field(250, ge=1)
    """Optimizer steps before the first pass@8 check."""
    max_train_steps: int = Field(500, ge=1)
    """Upper bound on optimizer steps (more phases of ``train_steps / 4`` while below
    ``min_pass_at_8``)."""
    batch_size: int = Field(16, ge=1)
    """Training sequences per optimizer step."""
    learning_rate: float = Field(2e-3, gt=0)
    """Peak AdamW learning rate (linear warm-up, then cosine decay to a tenth)."""

    @model_validator(mode="after")
    def _check_steps(self) -> WarmStartSettings:
        if self.max_train_steps < self.train_steps:
            raise ValueError("max_train_steps must be at least train_steps")
        return self


class CpuWorldSettings(BaseModel):
    """Everything that determines the CPU world's tokenizers, students and reward models."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    THROUGHPUT: ClassVar[frozenset[str]] = frozenset({"cache_dir"})
    """Where the world is cached changes no result (see `qup_ray.config.result_view`)."""

    cache_dir: str | None = None
    """Cache root; ``None`` means ``$QUP_CACHE_DIR``, else ``~/.cache/qup_ray``. Not hashed."""
    seed: int = 0
    """Seed of the synthetic training problems, the target noise and the reward heads."""
    num_train_problems: int = Field(4_000, ge=100)
    """Synthetic problems the students are trained on (drawn with repeats)."""
    num_eval_problems: int = Field(80, ge=5)
    """Held-out problems of the build-time pass@8 check."""
    noise_rate: float = Field(0.05, ge=0, le=1)
    """Fraction of training targets with one digit changed, so students also learn mistakes."""
    compact_text_rate: float = Field(0.14, ge=0, le=1)
    """Fraction of training sequences that are plain documents (no chat template): a problem
    and its solution in the oracle's ``compact`` style, as a base model's pre-training corpus
    holds dense symbolic text besides its native one, so that the oracle's text costs the
    student a modest factor of its own perplexity as in the paper, not orders of magnitude
    (the calibration targets are in ``docs/cpu-paradox.md``)."""
    reference_text_rate: float = Field(0.1, ge=0, le=1)
    """Fraction of training sequences that are plain documents with a ``reference``-style
    (textbook, NuminaMath-like) solution."""
    compact_chat_rate: float = Field(0.06, ge=0, le=1)
    """Fraction of training sequences that are chats answered in the ``compact`` style: a
    minority of the student's own answers, so the style is familiar in the context where the
    streams are scored (the chat), not only as documents."""
    latex_chat_rate: float = Field(0.05, ge=0, le=1)
    """Fraction of training sequences that are chats answered in the native style with each
    step's result written as inline LaTeX (``synthetic.latex_results``), the mixed prose and
    LaTeX of real math text. The rest of the sequences are chats answered in the native style."""
    next_turn_rate: float = Field(0.75, ge=0, le=1)
    """Fraction of training sequences that go on past the turn end into another user turn (the
    rest end with the EOS), as a base model's data does: sampled without the family's stop
    tokens, a student then writes an invented next turn."""
    min_pass_at_8: float = Field(0.3, ge=0, le=1)
    """Training continues (up to ``max_train_steps``) until held-out pass@8 reaches this."""
    vocab_size: int = Field(768, ge=300)
    """Upper bound on the byte-level BPE vocabulary shared by all CPU-world models."""
    qwen2: TinyLMSettings = TinyLMSettings(seed=1)
    """The ``Qwen2ForCausalLM`` student on the Qwen2.5-Math layout (``cpu-world:tiny-qwen2``)."""
    llama: TinyLMSettings = TinyLMSettings(seed=2)
    """The ``LlamaForCausalLM`` student on the Llama-3 layout (``cpu-world:tiny-llama``)."""
    deepseek: WarmStartSettings = WarmStartSettings(seed=3)
    """The DeepSeek-R1-Distill-layout student (``cpu-world:tiny-deepseek``): ``tiny-qwen2``'s
    weights trained further on the DeepSeek chat template."""
    reward_fit_steps: int = Field(300, ge=0)
    """Steps fitting each reward head to prefer correct, compact traces (0: random heads)."""

    @model_validator(mode="after")
    def _check_rates(self) -> CpuWorldSettings:
        rates = (
            self.compact_text_rate,
            self.reference_text_rate,
            self.compact_chat_rate,
            self.latex_chat_rate,
        )
        if sum(rates) >= 1:
            raise ValueError(
                "compact_text_rate + reference_text_rate + compact_chat_rate + latex_chat_rate"
                " must stay below 1 (the rest are native chats)"
            )
        return self

    def cache_root(self) -> Path:
        """The resolved cache root directory."""
        return resolve_cache_root(self.cache_dir)

    def hashed_fields(self) -> dict:
        """The fields that define the built artefacts (everything but where they are cached)."""
        return self.model_dump(mode="json", exclude={"cache_dir"})


def resolve_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$QUP_CACHE_DIR``, else ``~/.cache/qup_ray``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("QUP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qup_ray"
