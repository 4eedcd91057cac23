"""Tiny student language models (Qwen2 and Llama architectures) trained on CPU with plain torch.

A student is trained on native-style solutions of synthetic problems, formatted through the chat
template of its family's tokenizer layout (``tokenizer.LAYOUTS``), with a little target noise (one
digit changed), on a minority of chats answered in the compact style or with the steps' results in
inline LaTeX, and on a share of plain documents with compact and reference-style solutions (the
rest of a base model's pre-training text; see ``CpuWorldSettings.compact_text_rate``), until
sampling at T=1.0 (stopping on the turn-end token) solves part of held-out problems in at least
one of 8 tries. Like a real base model, a student has also seen text go on past the turn end, so
without the family's stop tokens it writes an invented next turn. The result is a normal
transformers checkpoint (float32 safetensors, config, generation config, tokenizer) that vLLM
loads as well.
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
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from qup_ray.cpu_world.boxed import is_correct, last_boxed
from qup_ray.cpu_world.settings import CpuWorldSettings, TinyLMSettings, WarmStartSettings
from qup_ray.cpu_world.synthetic import FAMILIES, SolvedProblem, latex_results, sample_problems
from qup_ray.cpu_world.tokenizer import COT_INSTRUCTION, Layout, token_ids

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


def encode_prompt(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> list[int]:
    """Token ids of the chat up to the assistant turn: the template's text tokenized without
    adding special tokens, so a family with a BOS gets exactly the template's one."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def next_turn_text(
    tokenizer: PreTrainedTokenizerFast,
    layout: Layout,
    messages: list[dict],
    response: str,
    next_user: str,
) -> str:
    """What the chat template writes after the response's turn-end token when another user
    turn (``next_user``) follows, up to and including the next generation prompt."""
    chat = [
        *messages,
        {"role": "assistant", "content": response},
        {"role": "user", "content": next_user},
    ]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    cut = text.rindex(layout.turn_end, 0, text.rindex(next_user)) + len(layout.turn_end)
    return text[cut:]


def _encode_examples(
    problems: list[SolvedProblem],
    tokenizer: PreTrainedTokenizerFast,
    layout: Layout,
    settings: CpuWorldSettings,
    rng: random.Random,
) -> list[_Example]:
    """Training sequences: mostly chats (prompt, response, turn end, then what a base model's
    data has next), with a share of plain documents in the other styles.

    A chat's response is the native solution, or for a minority (``compact_chat_rate``,
    ``latex_chat_rate``) the compact one or the native one with its results in inline LaTeX.

    Like a real base model's data, a chat goes on past the turn end: mostly into another
    user turn and the next generation prompt (so a student sampled without the family's stop
    tokens runs on into an invented next turn), otherwise into the EOS where it differs.
    A document is the problem, a newline and its compact or reference solution, then the EOS
    (after the BOS where the family has one): text the student has read but does not answer in.
    """
    turn_end = tokenizer.convert_tokens_to_ids(layout.turn_end)
    texts, examples, ends = [], [], []
    for p in problems:
        draw = rng.random()
        if draw < settings.compact_text_rate + settings.reference_text_rate:
            style = "compact" if draw < settings.compact_text_rate else "reference"
            texts += [f"{layout.bos_token or ''}{p.problem}\n", p.render(style), layout.eos_token]
            ends.append([])  # the EOS closes a document, not the turn end
            continue
        draw -= settings.compact_text_rate + settings.reference_text_rate
        if draw < settings.compact_chat_rate:
            response = p.compact
        elif draw < settings.compact_chat_rate + settings.latex_chat_rate:
            response = latex_results(p.native)
        else:
            response = p.native
        form = rng.randrange(3)
        messages = prompt_messages(p.problem, form)
        noisy = rng.random() < settings.noise_rate
        target = corrupt_one_digit(response, rng) if noisy else response
        if rng.random() < settings.next_turn_rate:
            following = prompt_messages(rng.choice(problems).problem, form)[-1]["content"]
            after = next_turn_text(tokenizer, layout, messages, target, following)
        else:
            after = layout.eos_token if layout.eos_token != layout.turn_end else ""
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        texts += [prompt, target, after]
        ends.append([turn_end])
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for i, end in zip(range(0, len(ids), 3), ends, strict=True):
        prompt_ids, target_ids, after_ids = ids[i : i + 3]
        examples.append(_Example([*prompt_ids, *target_ids, *end, *after_ids], len(prompt_ids)))
    return examples


def pad_batch(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` padded to one length on ``side`` (ids, attention mask); needs no pad token."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        attention[i, span] = 1
    return ids, attention


def _collate(batch: list[_Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, attention = pad_batch([e.input_ids for e in batch], pad_id, "right")
    labels = torch.full_like(ids, -100)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        # Loss only after the prompt: the student learns to solve, not to write the first problem.
        labels[row, e.num_prompt_tokens : n] = ids[row, e.num_prompt_tokens : n]
    return ids, attention, labels


def _special_ids(tokenizer: PreTrainedTokenizerFast, layout: Layout) -> dict[str, int | None]:
    """``config.json``'s bos/eos/pad ids for ``layout`` (as the real checkpoints set them)."""
    ids = token_ids(tokenizer, layout)
    # Qwen2.5-Math's config names <|endoftext|> as both (its tokenizer has no BOS).
    bos = ids["bos"] if ids["bos"] is not None else ids["eos"]
    return {"bos_token_id": bos, "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}


def _make_model(
    arch: Arch, cfg: TinyLMSettings, tokenizer: PreTrainedTokenizerFast, layout: Layout
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
        torch_dtype="float32",
        **_special_ids(tokenizer, layout),
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
    batch_size: int,
    num_steps: int,
    peak_lr: float,
    rng: random.Random,
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
        # Padding is masked out of attention and loss, so any id serves.
        ids, attention, labels = _collate(rng.sample(examples, batch_size), pad_id=0)
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
    layout: Layout,
    problems: list[SolvedProblem],
    k: int = 8,
    seed: int = 0,
    batch_problems: int = 16,
) -> dict[str, float]:
    """pass@k, mean accuracy, boxed rate and stop rate of ``problems`` sampled at T=1.0 with
    transformers, stopping on the layout's turn-end token as the suite's engines do."""
    model.eval()
    torch.manual_seed(seed)
    turn_end = tokenizer.convert_tokens_to_ids(layout.turn_end)
    solved = correct = boxed = stopped = 0
    for start in range(0, len(problems), batch_problems):
        chunk = problems[start : start + batch_problems]
        ids, attention = pad_batch(
            [encode_prompt(tokenizer, prompt_messages(p.problem)) for p in chunk], turn_end, "left"
        )
        out = model.generate(
            input_ids=ids,
            attention_mask=attention,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=MAX_NEW_TOKENS,
            num_return_sequences=k,
            eos_token_id=turn_end,
            pad_token_id=turn_end,
        )
        generated = out[:, ids.shape[1] :].tolist()
        for i, p in enumerate(chunk):
            samples = generated[i * k : (i + 1) * k]
            ends = [s.index(turn_end) if turn_end in s else len(s) for s in samples]
            texts = [tokenizer.decode(s[:e]) for s, e in zip(samples, ends, strict=True)]
            hits = [is_correct(t, p.answer) for t in texts]
            solved += any(hits)
            correct += sum(hits)
            boxed += sum(last_boxed(t) is not None for t in texts)
            stopped += sum(e < len(s) for s, e in zip(samples, ends, strict=True))
    n = len(problems)
    return {
        "pass_at_k": solved / n,
        "mean_accuracy": correct / (n * k),
        "boxed_rate": boxed / (n * k),
        "stop_rate": stopped / (n * k),
    }


def train_student(
    name: str,
    arch: Arch,
    layout: Layout,
    cfg: TinyLMSettings | WarmStartSettings,
    settings: CpuWorldSettings,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    init_dir: Path | None = None,
) -> dict:
    """Train one tiny student on ``layout``'s chat format, save it (with the tokenizer) into
    ``out_dir``; returns a report. With ``init_dir`` it continues from that checkpoint's weights
    (same vocabulary) instead of a fresh initialisation."""
    started = time.perf_counter()
    rng = random.Random(cfg.seed)
    examples = _encode_examples(training_problems(settings), tokenizer, layout, settings, rng)
    eval_problems = heldout_problems(settings, settings.num_eval_problems)
    if init_dir is None:
        assert isinstance(cfg, TinyLMSettings)
        model = _make_model(arch, cfg, tokenizer, layout)
    else:
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_pretrained(str(init_dir), dtype=torch.float32)
        for key, value in _special_ids(tokenizer, layout).items():
            setattr(model.config, key, value)
    logger.info(
        "training %s (%.2fM parameters, %s layout) on %d examples",
        name, sum(p.numel() for p in model.parameters()) / 1e6, layout.name, len(examples),
    )  # fmt: skip
    steps, peak = cfg.train_steps, cfg.learning_rate
    loss = _train_phase(model, examples, cfg.batch_size, steps, peak, rng, name)
    metrics = sample_pass_at_k(model, tokenizer, layout, eval_problems, seed=cfg.seed)
    logger.info("%s after %d steps: loss %.3f, %s", name, steps, loss, metrics)
    # Too weak to give the pipeline data: keep training in short phases at half the peak rate.
    while metrics["pass_at_k"] < settings.min_pass_at_8 and steps < cfg.max_train_steps:
        extra = min(max(1, cfg.train_steps // 4), cfg.max_train_steps - steps)
        peak = cfg.learning_rate / 2
        loss = _train_phase(model, examples, cfg.batch_size, extra, peak, rng, f"{name} (more)")
        steps += extra
        metrics = sample_pass_at_k(model, tokenizer, layout, eval_problems, seed=cfg.seed)
        logger.info("%s after %d steps: loss %.3f, %s", name, steps, loss, metrics)
    if metrics["pass_at_k"] < settings.min_pass_at_8:
        logger.warning("%s stays below pass@8 %.2f", name, settings.min_pass_at_8)

    ids = token_ids(tokenizer, layout)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in layout.generation_eos]
    model.generation_config = GenerationConfig(
        bos_token_id=_special_ids(tokenizer, layout)["bos_token_id"],
        eos_token_id=eos[0] if len(eos) == 1 else eos,
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return {
        "architecture": type(model).__name__,
        "layout": layout.name,
        "token_ids": ids,
        "init_from": None if init_dir is None else init_dir.name,
        "train_steps": steps,
        "final_train_loss": round(loss, 4),
        "heldout_hf": {k: round(v, 4) for k, v in metrics.items()},
        "num_heldout_problems": len(eval_problems),
        "build_s": round(time.perf_counter() - started, 1),
    }
