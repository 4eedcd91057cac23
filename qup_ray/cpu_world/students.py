"""Tiny student language models (Qwen2 and Llama architectures) trained on CPU with plain torch.

A student is trained on native-style solutions of synthetic problems, formatted through the chat
template, with a little target noise (one digit changed), until sampling at T=1.0 solves part of
held-out problems in at least one of 8 tries. The result is a normal transformers checkpoint
(float32 safetensors, config, generation config, tokenizer) that vLLM loads as well.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from qup_ray.cpu_world.boxed import is_correct, last_boxed
from qup_ray.cpu_world.settings import CpuWorldSettings, TinyLMSettings
from qup_ray.cpu_world.synthetic import FAMILIES, SolvedProblem, sample_problems
from qup_ray.cpu_world.tokenizer import COT_INSTRUCTION, IM_END, PAD_TOKEN

logger = logging.getLogger(__name__)

Arch = Literal["qwen2", "llama"]
MAX_NEW_TOKENS = 160  # the longest native solution is about 110 tokens


def prompt_messages(problem: str, form: int = 2) -> list[dict]:
    """The chat a student sees for ``problem``: bare (0), instruction after it (1), or system (2).

    Students train on all three forms, so any zero-shot CoT prompt layout is familiar; form 2
    (the Qwen2.5-Math system prompt, as in ``configs/prompts/tiny.yaml``) is the default and the
    one the build-time check uses.
    """
    if form == 0:
        return [{"role": "user", "content": problem}]
    if form == 1:
        return [{"role": "user", "content": f"{problem}\n{COT_INSTRUCTION}"}]
    return [{"role": "system", "content": COT_INSTRUCTION}, {"role": "user", "content": problem}]


def corrupt_one_digit(text: str, rng: random.Random) -> str:
    """``text`` with one of its digits replaced by a different digit (unchanged if it has none)."""
    positions = [i for i, ch in enumerate(text) if ch.isdigit()]
    if not positions:
        return text
    i = rng.choice(positions)
    new = rng.choice([d for d in "0123456789" if d != text[i]])
    return text[:i] + new + text[i + 1 :]


def training_problems(settings: CpuWorldSettings) -> list[SolvedProblem]:
    """The synthetic problems every CPU-world student is trained on."""
    return sample_problems(settings.num_train_problems, seed=settings.seed)


def heldout_problems(
    settings: CpuWorldSettings, num_problems: int, seed: int = 10_000
) -> list[SolvedProblem]:
    """``num_problems`` distinct problems, none of them trained on, spread evenly over families."""
    seen = {p.problem for p in training_problems(settings)}
    per_family = [
        _unseen(family, -(-num_problems // len(FAMILIES)), seen, seed + i)
        for i, family in enumerate(FAMILIES)
    ]
    # Interleave the families so that any prefix is balanced too.
    mixed = [p for group in zip(*per_family, strict=True) for p in group]
    return mixed[:num_problems]


def _unseen(family: str, count: int, seen: set[str], seed: int) -> list[SolvedProblem]:
    out: dict[str, SolvedProblem] = {}
    for attempt in range(100):
        for p in sample_problems(4 * count, seed=seed + 7919 * attempt, families=[family]):
            if p.problem not in seen:
                out.setdefault(p.problem, p)
        if len(out) >= count:
            return list(out.values())[:count]
    raise ValueError(f"family {family!r} has fewer than {count} problems outside the training set")


@dataclass
class _Example:
    input_ids: list[int]
    num_prompt_tokens: int


def _encode_examples(
    problems: list[SolvedProblem],
    tokenizer: PreTrainedTokenizerFast,
    noise_rate: float,
    rng: random.Random,
) -> list[_Example]:
    prompts, targets = [], []
    for p in problems:
        messages = prompt_messages(p.problem, rng.randrange(3))
        prompts.append(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )
        target = corrupt_one_digit(p.native, rng) if rng.random() < noise_rate else p.native
        targets.append(target + IM_END)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    return [_Example(p + t, len(p)) for p, t in zip(prompt_ids, target_ids, strict=True)]


def _collate(batch: list[_Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        # Loss only on the answer: the student learns to solve, not to write problems.
        labels[row, e.num_prompt_tokens : n] = ids[row, e.num_prompt_tokens : n]
    return ids, attention, labels


def _make_model(
    arch: Arch, cfg: TinyLMSettings, tokenizer: PreTrainedTokenizerFast
) -> PreTrainedModel:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        torch_dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return LlamaForCausalLM(LlamaConfig(**common))


def _lr_at(step: int, num_steps: int, peak: float) -> float:
    warmup = max(1, num_steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, num_steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train_phase(
    model: PreTrainedModel,
    examples: list[_Example],
    cfg: TinyLMSettings,
    num_steps: int,
    peak_lr: float,
    rng: random.Random,
    pad_id: int,
    desc: str,
) -> float:
    """``num_steps`` AdamW steps of masked cross-entropy; returns the mean loss of the last 20."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses: list[float] = []
    # Plain random batches: grouping by length saved a third of the padding but made batches
    # nearly single-family (length follows family) and cost more accuracy than it saved time.
    for step in tqdm(range(num_steps), desc=desc, mininterval=10, leave=False):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, num_steps, peak_lr)
        ids, attention, labels = _collate(rng.sample(examples, cfg.batch_size), pad_id)
        logits = model(input_ids=ids, attention_mask=attention).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return sum(losses[-20:]) / len(losses[-20:])


@torch.no_grad()
def sample_pass_at_k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[SolvedProblem],
    k: int = 8,
    seed: int = 0,
    batch_problems: int = 16,
) -> dict[str, float]:
    """pass@k, mean accuracy and boxed rate of ``problems`` sampled at T=1.0 with transformers."""
    model.eval()
    torch.manual_seed(seed)
    solved = correct = boxed = 0
    for start in range(0, len(problems), batch_problems):
        chunk = problems[start : start + batch_problems]
        prompts = [
            tokenizer.apply_chat_template(
                prompt_messages(p.problem), add_generation_prompt=True, tokenize=False
            )
            for p in chunk
        ]
        enc = tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        )
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=MAX_NEW_TOKENS,
            num_return_sequences=k,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for i, p in enumerate(chunk):
            samples = texts[i * k : (i + 1) * k]
            hits = [is_correct(s, p.answer) for s in samples]
            solved += any(hits)
            correct += sum(hits)
            boxed += sum(last_boxed(s) is not None for s in samples)
    n = len(problems)
    return {
        "pass_at_k": solved / n,
        "mean_accuracy": correct / (n * k),
        "boxed_rate": boxed / (n * k),
    }


def train_student(
    arch: Arch,
    settings: CpuWorldSettings,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
) -> dict:
    """Train one tiny student, save it (with the tokenizer) into ``out_dir``; returns a report."""
    cfg: TinyLMSettings = getattr(settings, arch)
    started = time.perf_counter()
    rng = random.Random(cfg.seed)
    examples = _encode_examples(training_problems(settings), tokenizer, settings.noise_rate, rng)
    eval_problems = heldout_problems(settings, settings.num_eval_problems)
    model = _make_model(arch, cfg, tokenizer)
    pad_id = tokenizer.pad_token_id
    logger.info(
        "training tiny-%s (%.2fM parameters) on %d examples",
        arch, sum(p.numel() for p in model.parameters()) / 1e6, len(examples),
    )  # fmt: skip
    steps, peak = cfg.train_steps, cfg.learning_rate
    loss = _train_phase(model, examples, cfg, steps, peak, rng, pad_id, f"tiny-{arch}")
    metrics = sample_pass_at_k(model, tokenizer, eval_problems, seed=cfg.seed)
    logger.info("tiny-%s after %d steps: loss %.3f, %s", arch, steps, loss, metrics)
    # Too weak to give the pipeline data: keep training in short phases at half the peak rate.
    while metrics["pass_at_k"] < settings.min_pass_at_8 and steps < cfg.max_train_steps:
        extra = min(max(1, cfg.train_steps // 4), cfg.max_train_steps - steps)
        peak = cfg.learning_rate / 2
        loss = _train_phase(model, examples, cfg, extra, peak, rng, pad_id, f"tiny-{arch} (more)")
        steps += extra
        metrics = sample_pass_at_k(model, tokenizer, eval_problems, seed=cfg.seed)
        logger.info("tiny-%s after %d steps: loss %.3f, %s", arch, steps, loss, metrics)
    if metrics["pass_at_k"] < settings.min_pass_at_8:
        logger.warning("tiny-%s stays below pass@8 %.2f", arch, settings.min_pass_at_8)

    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), pad_id],
        pad_token_id=pad_id,
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return {
        "architecture": type(model).__name__,
        "train_steps": steps,
        "final_train_loss": round(loss, 4),
        "heldout_hf": {k: round(v, 4) for k, v in metrics.items()},
        "num_heldout_problems": len(eval_problems),
        "build_s": round(time.perf_counter() - started, 1),
    }
