"""Training data: a stream's (problem, trace) rows -> token ids with labels -> a seeded plan of
length-grouped micro-batches for every optimizer step, rank and accumulation step.

    examples, counts = encode_stream(rows, fmt, max_seq_len)
    plan = plan_steps([len(e.input_ids) for e in examples], global_batch_size=16,
                      micro_batch_size=4, world_size=2, num_epochs=1, seed=0)
    batch = collate([examples[i] for i in plan.micro_batches(step, rank)[0]], pad_id)

Every example is `ChatFormat.example(problem, trace)`, the exact sequence the score stage
measured; labels sit on the response and the closing turn-end token, never on the prompt.
The plan is a pure function of lengths and seed, so each rank computes it alone and a resumed
run continues with the very batches an unbroken run would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from qup_ray.losses import IGNORE_INDEX


@dataclass(frozen=True)
class Example:
    """One training sequence: ids, and the index where the labelled response starts."""

    problem_id: str
    input_ids: list[int]
    response_start: int

    @property
    def num_label_tokens(self) -> int:
        """Tokens that carry a label (response + turn end, after any truncation)."""
        return len(self.input_ids) - self.response_start


def labels_for(input_ids: list[int], response_start: int) -> list[int]:
    """Labels aligned with the ids: IGNORE_INDEX on the prompt, the token itself after."""
    return [IGNORE_INDEX] * response_start + list(input_ids[response_start:])


def encode_stream(
    rows: Iterable[dict], fmt: object, max_seq_len: int
) -> tuple[list[Example], dict[str, int]]:
    """Examples of a stream's rows (`problem_id`, `problem`, `trace`), cut to `max_seq_len`.

    Counts: `rows`, `examples`, `truncated` (cut; the turn end is lost, so these examples do
    not teach stopping), `dropped_too_long` (the prompt alone fills `max_seq_len`)."""
    examples: list[Example] = []
    counts = {"rows": 0, "examples": 0, "truncated": 0, "dropped_too_long": 0}
    for row in rows:
        counts["rows"] += 1
        ids, start = fmt.example(row["problem"], row["trace"])  # type: ignore[attr-defined]
        if start >= max_seq_len:
            counts["dropped_too_long"] += 1
            continue
        if len(ids) > max_seq_len:
            counts["truncated"] += 1
            ids = ids[:max_seq_len]
        examples.append(Example(str(row["problem_id"]), ids, start))
    counts["examples"] = len(examples)
    return examples, counts


@dataclass(frozen=True)
class StepPlan:
    """Example indices of every micro-batch: steps[step][rank][accumulation step]."""

    steps: list[list[list[list[int]]]]
    dropped_tail: int
    """Examples left out: the last incomplete global batch's remainder below a multiple of
    micro batch x workers (counted in the manifest)."""

    def __len__(self) -> int:
        return len(self.steps)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        return self.steps[step][rank]


def plan_steps(
    lengths: list[int],
    *,
    global_batch_size: int,
    micro_batch_size: int,
    world_size: int,
    num_epochs: float,
    seed: int,
) -> StepPlan:
    """A seeded order over `num_epochs` passes cut into global batches; inside each batch the
    sequences are sorted by length and cut into micro-batches, so a micro-batch holds similar
    lengths and wastes little padding (the step's gradient is a sum over its micro-batches, so
    grouping changes nothing but the padding)."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"global batch {global_batch_size} is not a multiple of micro batch x workers "
            f"= {micro_batch_size} x {world_size}"
        )
    n = len(lengths)
    total = math.floor(num_epochs * n)
    order: list[int] = []
    for epoch in range(math.ceil(num_epochs)):
        perm = list(range(n))
        random.Random(f"{seed}-{epoch}").shuffle(perm)
        order += perm
    order = order[:total]
    # The last, incomplete global batch is kept down to a multiple of micro batch x workers
    # (a shorter step with fewer accumulation micro-batches); only that remainder is dropped.
    sizes = [global_batch_size] * (total // global_batch_size)
    tail = (total % global_batch_size) // per_step * per_step
    sizes += [tail] if tail else []
    steps, start = [], 0
    for size in sizes:
        batch = order[start : start + size]
        start += size
        batch.sort(key=lambda i: (-lengths[i], i))
        micro = [batch[j : j + micro_batch_size] for j in range(0, len(batch), micro_batch_size)]
        steps.append([micro[rank::world_size] for rank in range(world_size)])
    return StepPlan(steps=steps, dropped_tail=total - start)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (IGNORE_INDEX on prompt and pad)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(labels_for(e.input_ids, e.response_start))
        attention[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def step_denominator_counts(examples: list[Example], plan: StepPlan, step: int) -> tuple[int, int]:
    """(labelled tokens, sequences) of a whole optimizer step, over every rank."""
    indices = [i for rank in plan.steps[step] for mb in rank for i in mb]
    return sum(examples[i].num_label_tokens for i in indices), len(indices)
