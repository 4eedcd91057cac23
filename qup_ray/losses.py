"""SFT and DFT token losses and their normalisation: pure functions over logits, labels, a mask.

Written once and used by the training loop, the training benchmark and the tests.

    terms = token_terms(logits, labels)               # per-token NLL, p(target), mask, top-1 hit
    loss = micro_batch_loss(terms, "dft", "token", denominators)
    engine.backward(loss, scale_wrt_gas=False)         # all scaling is done here, before backward

Labels follow the Hugging Face convention: same shape as the input ids, `IGNORE_INDEX` (-100)
where no loss is taken (the prompt, padding), and position t's logits predict label t+1.

- SFT: the cross-entropy of each target token, `-log p(y_t)`.
- DFT (Dynamic Fine-Tuning, arXiv 2508.05629): `-log p(y_t) * sg(p(y_t))`, the token
  cross-entropy weighted by the target's probability with the gradient stopped through the weight,
  so d(DFT)/d(logits) = p(y_t) * d(SFT)/d(logits) token by token.

Normalisation (recorded in the manifest) decides what one optimizer step minimises:
- `token` (default): the mean over every response token of the global batch, across accumulation
  steps and ranks (TRL's `dft` loss with `num_items_in_batch`);
- `micro_batch`: the mean over micro-batches of each micro-batch's own token mean (what the DFT
  authors' trainer does per rank, but averaged here, not summed);
- `sequence`: the mean over sequences of each sequence's token mean.
Whatever the choice, a micro-batch's loss is scaled *before* `backward()` so that the gradients
summed over accumulation steps and averaged over ranks (DeepSpeed and DDP average the all-reduced
gradients) are the gradient of that global mean; nothing is divided after backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

IGNORE_INDEX = -100

Objective = Literal["sft", "dft"]
Normalization = Literal["token", "micro_batch", "sequence"]


@dataclass(frozen=True)
class TokenTerms:
    """Per-token quantities of one micro-batch, each of shape (batch, seq_len - 1)."""

    nll: torch.Tensor
    """-log p(target), 0 where masked; carries the gradient."""
    prob: torch.Tensor
    """p(target), detached, 0 where masked."""
    mask: torch.Tensor
    """1.0 where a label is taken, else 0.0."""
    correct: torch.Tensor
    """1.0 where the argmax of the logits is the target (masked positions 0)."""


@dataclass(frozen=True)
class Denominators:
    """Counts of one whole optimizer step (all accumulation steps, all ranks)."""

    num_tokens: int
    """Labelled tokens of the global batch."""
    num_sequences: int
    """Sequences of the global batch with at least one labelled token."""
    num_micro_batches: int
    """Micro-batches one rank runs per optimizer step (gradient accumulation steps)."""
    world_size: int = 1
    """Ranks whose gradients are averaged."""


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the logits that predict them: labels[:, 1:]."""
    return labels[:, 1:]


def token_terms(logits: torch.Tensor, labels: torch.Tensor) -> TokenTerms:
    """Per-token NLL, target probability, mask and top-1 hits of `logits` (B, T, V) against
    `labels` (B, T); logits at t predict label t+1, computed in float32."""
    logits = logits[:, :-1].float()
    targets = shifted(labels)
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    maskf = mask.to(logp.dtype)
    nll = -logp * maskf
    prob = logp.detach().exp() * maskf
    correct = (logits.detach().argmax(-1) == safe).to(logp.dtype) * maskf
    return TokenTerms(nll=nll, prob=prob, mask=maskf, correct=correct)


def per_token_loss(terms: TokenTerms, objective: Objective) -> torch.Tensor:
    """The objective's loss of each token (0 where masked)."""
    if objective == "sft":
        return terms.nll
    if objective == "dft":
        return terms.nll * terms.prob  # prob is detached: the weight carries no gradient
    raise ValueError(f"unknown objective {objective!r}")


def micro_batch_loss(
    terms: TokenTerms,
    objective: Objective,
    normalization: Normalization,
    denominators: Denominators,
) -> torch.Tensor:
    """The loss of one micro-batch, scaled so that summing the gradients of every micro-batch of
    a step and averaging them over ranks gives the gradient of the step's global mean."""
    losses = per_token_loss(terms, objective)
    d = denominators
    if normalization == "token":
        return losses.sum() * d.world_size / max(d.num_tokens, 1)
    if normalization == "micro_batch":
        return losses.sum() / terms.mask.sum().clamp(min=1) / max(d.num_micro_batches, 1)
    if normalization == "sequence":
        per_seq = losses.sum(-1) / terms.mask.sum(-1).clamp(min=1)
        return per_seq.sum() * d.world_size / max(d.num_sequences, 1)
    raise ValueError(f"unknown normalization {normalization!r}")
