"""SFT/DFT losses against independent computations: plain per-token Python sums, autograd's
gradient identity, accumulation over micro-batches and ranks, and TRL's own `dft` loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qup_ray.losses import (
    IGNORE_INDEX,
    Denominators,
    micro_batch_loss,
    per_token_loss,
    token_terms,
)

VOCAB = 11


def _batch(seed: int, lengths: list[int], prompt_lens: list[int], vocab: int = VOCAB):
    """Random logits and right-padded labels with the prompt masked, as the data module builds them."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    logits = torch.randn(len(lengths), width, vocab, generator=g) * 2
    ids = torch.randint(0, vocab, (len(lengths), width), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (n, p) in enumerate(zip(lengths, prompt_lens, strict=True)):
        labels[i, p:n] = ids[i, p:n]
    return logits, labels


def _plain_token_losses(logits, labels, objective):
    """Per sequence, the list of per-token losses by an explicit loop over positions."""
    out = []
    for b in range(logits.shape[0]):
        seq = []
        for t in range(1, logits.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            row = logits[b, t - 1].double()
            p = math.exp(row[y].item()) / torch.exp(row).sum().item()
            nll = -math.log(p)
            seq.append(nll if objective == "sft" else nll * p)
        out.append(seq)
    return out


@pytest.mark.parametrize("objective", ["sft", "dft"])
def test_per_token_losses_match_a_plain_loop(objective):
    logits, labels = _batch(0, [9, 6, 12], [3, 2, 5])
    got = per_token_loss(token_terms(logits, labels), objective)
    want = _plain_token_losses(logits, labels, objective)
    flat_got = got[token_terms(logits, labels).mask.bool()].tolist()
    assert flat_got == pytest.approx([v for s in want for v in s], rel=1e-5)
    # and the SFT mean is torch's cross-entropy with ignore_index
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    terms = token_terms(logits, labels)
    assert (terms.nll.sum() / terms.mask.sum()).item() == pytest.approx(ce.item(), rel=1e-6)


def test_dft_gradient_is_p_times_sft_gradient_per_token():
    logits, labels = _batch(1, [8, 10], [2, 4])
    terms_mask = token_terms(logits, labels).mask
    for b, t in terms_mask.nonzero().tolist():
        grads = {}
        for objective in ("sft", "dft"):
            x = logits.clone().requires_grad_(True)
            loss = per_token_loss(token_terms(x, labels), objective)[b, t]
            (grads[objective],) = torch.autograd.grad(loss, x)
        p = token_terms(logits, labels).prob[b, t]
        assert torch.allclose(grads["dft"], p * grads["sft"], atol=1e-7)
        assert grads["sft"].abs().sum() > 0


def _reference(per_token, normalization, micro_batches):
    """The global objective of a step from plain per-token losses (independent of losses.py)."""
    if normalization == "token":
        flat = [v for s in per_token for v in s]
        return sum(flat) / len(flat)
    if normalization == "sequence":
        return sum(sum(s) / len(s) for s in per_token) / len(per_token)
    means = []
    for mb in micro_batches:
        flat = [v for i in mb for v in per_token[i]]
        means.append(sum(flat) / len(flat))
    return sum(means) / len(means)


@pytest.mark.parametrize("normalization", ["token", "micro_batch", "sequence"])
@pytest.mark.parametrize("objective", ["sft", "dft"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_scaled_before_backward_accumulation_averages(normalization, objective, world_size):
    """Sum of micro-batch gradients on each rank, averaged over ranks (what DeepSpeed does with
    scale_wrt_gas=False) == gradient of the step's global objective; so is the loss value."""
    lengths = [9, 6, 12, 7, 10, 5, 8, 11]
    prompts = [3, 2, 5, 1, 4, 2, 3, 6]
    logits, labels = _batch(2, lengths, prompts)
    micro = 2
    micro_batches = [list(range(i, i + micro)) for i in range(0, len(lengths), micro)]
    num_micro = len(micro_batches) // world_size  # micro-batches per rank
    mask = token_terms(logits, labels).mask
    den = Denominators(
        num_tokens=int(mask.sum()),
        num_sequences=len(lengths),
        num_micro_batches=num_micro,
        world_size=world_size,
    )
    x = logits.clone().requires_grad_(True)
    rank_grads, total = [], 0.0
    for rank in range(world_size):
        grad = torch.zeros_like(x)
        for mb in micro_batches[rank::world_size]:
            loss = micro_batch_loss(token_terms(x[mb], labels[mb]), objective, normalization, den)
            (g,) = torch.autograd.grad(loss, x)
            grad += g
            total += loss.item() / world_size
        rank_grads.append(grad)
    averaged = sum(rank_grads) / world_size

    per_token = _plain_token_losses(logits, labels, objective)
    assert total == pytest.approx(_reference(per_token, normalization, micro_batches), rel=1e-5)
    # the gradient of the global objective, built independently from per-token losses
    y = logits.clone().requires_grad_(True)
    terms = token_terms(y, labels)
    tok = per_token_loss(terms, objective)
    if normalization == "token":
        target = tok.sum() / terms.mask.sum()
    elif normalization == "sequence":
        target = (tok.sum(-1) / terms.mask.sum(-1)).mean()
    else:
        target = torch.stack([tok[mb].sum() / terms.mask[mb].sum() for mb in micro_batches]).mean()
    (want,) = torch.autograd.grad(target, y)
    assert torch.allclose(averaged, want, atol=1e-7)


def test_token_accuracy_counts_argmax_hits_on_labels_only():
    logits, labels = _batch(3, [6, 9], [2, 3])
    terms = token_terms(logits, labels)
    hits = total = 0
    for b in range(2):
        for t in range(1, 9):
            if labels[b, t] != IGNORE_INDEX:
                total += 1
                hits += int(logits[b, t - 1].argmax() == labels[b, t])
    assert terms.mask.sum().item() == total
    assert terms.correct.sum().item() == hits


# ---- TRL's own DFT loss --------------------------------------------------------------------


def _tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).float()


def _trl_compute_loss(model, inputs, loss_type: str, num_items_in_batch):
    """`trl.SFTTrainer.compute_loss` itself, on a stand-in trainer holding only what it reads."""
    from collections import defaultdict

    from trl import SFTTrainer

    stub = SimpleNamespace(
        model=model,
        args=SimpleNamespace(loss_type=loss_type, average_tokens_across_devices=False),
        accelerator=SimpleNamespace(
            parallelism_config=None, gather_for_metrics=lambda t: t, num_processes=1
        ),
        aux_loss_enabled=False,
        compute_loss_func=None,
        label_smoother=None,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        get_tp_size=lambda: 1,
    )
    loss = SFTTrainer.compute_loss(stub, model, dict(inputs), num_items_in_batch=num_items_in_batch)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("loss_type,objective", [("dft", "dft"), ("nll", "sft")])
def test_matches_trl_loss_value_gradient_and_accuracy(loss_type, objective):
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    model = _tiny_causal_lm()
    model.train()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (3, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 9:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    # TRL's global token count across accumulation: pretend this micro-batch is one of two
    num_items = int((labels[:, 1:] != IGNORE_INDEX).sum()) * 2
    inputs = {"input_ids": ids, "attention_mask": attention, "labels": labels}

    model.zero_grad()
    trl_loss, trl_metrics = _trl_compute_loss(model, inputs, loss_type, num_items)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attention).logits
    terms = token_terms(logits, labels)
    den = Denominators(num_tokens=num_items, num_sequences=6, num_micro_batches=2)
    ours = micro_batch_loss(terms, objective, "token", den)
    ours.backward()

    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    for a, b in zip(trl_grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    accuracy = (terms.correct.sum() / terms.mask.sum()).item()
    assert accuracy == pytest.approx(trl_metrics["mean_token_accuracy"][-1], abs=1e-6)
