"""Tiny reward models in the two checkpoint layouts the paper's reward models use.

Each uses the tokenizer layout of its backbone's student (``tiny-qwen-rm``: Qwen2.5, no BOS;
``tiny-llama-rm``: Llama-3, whose tokenizer adds ``<|begin_of_text|>`` itself).

- ``tiny-qwen-rm``: the Qwen2.5-Math-RM layout. ``config.json`` names the architecture
  ``Qwen2ForRewardModel``; the weights are a Qwen2 backbone (``model.*``) plus a score head
  ``score.0`` Linear(hidden, hidden), ReLU, ``score.2`` Linear(hidden, 1). transformers has no
  such class, so the safetensors and config are written here directly. In vLLM:
  ``LLM(model=dir, runner="pooling")`` and ``llm.encode(texts, pooling_task="token_classify")``;
  the reward is the last token's score.
- ``tiny-llama-rm``: the Skywork-Reward layout, a transformers ``LlamaForSequenceClassification``
  with ``num_labels=1`` (head ``score.weight``, no bias). In vLLM: ``llm.classify(texts)``; the
  reward is ``outputs[i].outputs.probs[0]``.

Give vLLM token ids (``TokensPrompt``) of the rendered chat tokenized without special tokens:
given text, vLLM tokenizes it again with the Llama-3 tokenizer's own BOS, a second one.
Pass ``pooling_params=PoolingParams(use_activation=False)`` in both cases for the raw reward
(the number a transformers forward pass gives, and the one the paper reports): vLLM's default
is raw for ``Qwen2ForRewardModel`` but a sigmoid for a one-label sequence classifier.

Each reward model reuses the backbone of the trained student of its family (so scores depend
on what the text says) and fits its head for a few hundred steps on chat-formatted traces:
correct compact (oracle-style) traces high, reference traces and native ones with each step's
result in inline LaTeX (what the rule oracle's refinement writes) in between, plain native ones
lower, wrong answers lowest, which mimics the paper's reward models preferring the oracle's
polished style (the paper's refined traces sit about halfway between the student's own and the
synthesized ones: rewards 1.47, 1.70, 1.88).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Model,
)

from qup_ray.cpu_world.settings import CpuWorldSettings
from qup_ray.cpu_world.students import corrupt_one_digit, heldout_problems, pad_batch
from qup_ray.cpu_world.synthetic import latex_results

logger = logging.getLogger(__name__)

# Regression targets of the head fit, by trace kind. "latex": a native trace with each step's
# result in inline LaTeX (`synthetic.latex_results`), the refine rule's partial compaction;
# without it the head never saw such a trace, and whether it ranked refined traces above the
# student's own depended on the build (0.56 vs 0.49 on one machine, 0.508 vs 0.509 on another).
_TARGETS = {"compact": 2.0, "reference": 1.5, "latex": 1.5, "native": 1.0, "wrong": -0.5}


def chat_text(tokenizer: PreTrainedTokenizerFast, problem: str, response: str) -> str:
    """The text a CPU-world reward model scores: the problem and response as a chat, through
    the reward model's chat template (BOS included where the family has one, so tokenize it
    with ``add_special_tokens=False``)."""
    messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _fit_texts(
    settings: CpuWorldSettings, tokenizer: PreTrainedTokenizerFast
) -> tuple[list[str], torch.Tensor]:
    rng = random.Random(settings.seed + 17)
    texts, targets = [], []
    for p in heldout_problems(settings, 120, seed=20_000):
        for style in ("compact", "reference", "native"):
            texts.append(chat_text(tokenizer, p.problem, p.render(style)))
            targets.append(_TARGETS[style])
        texts.append(chat_text(tokenizer, p.problem, latex_results(p.native)))
        targets.append(_TARGETS["latex"])
        wrong = p.render(rng.choice(["compact", "native"])).replace(
            f"{{{p.answer}}}", "{" + corrupt_one_digit(p.answer, rng) + "}"
        )
        texts.append(chat_text(tokenizer, p.problem, wrong))
        targets.append(_TARGETS["wrong"])  # every answer has a digit, so it did change
    return texts, torch.tensor(targets)


@torch.no_grad()
def _last_hidden(
    backbone: nn.Module, tokenizer: PreTrainedTokenizerFast, texts: list[str], batch_size: int = 32
) -> torch.Tensor:
    """Final hidden state at each text's last token.

    Right padding leaves a causal model's states at real positions unchanged, so batching
    gives the same numbers as running each text alone.
    """
    rows = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]
        # Padded by hand: the Llama-3 layout, like the real one, has no pad token.
        input_ids, attention = pad_batch(ids, pad_id=0, side="right")
        hidden = backbone(input_ids=input_ids, attention_mask=attention).last_hidden_state
        last = attention.sum(dim=1) - 1
        rows.append(hidden[torch.arange(hidden.size(0)), last])
    return torch.cat(rows)


def _fit_head(head: nn.Module, features: torch.Tensor, targets: torch.Tensor, steps: int) -> float:
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = nn.functional.mse_loss(head(features).squeeze(-1), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def build_reward_model(
    layout: str,
    student_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    settings: CpuWorldSettings,
    out_dir: Path,
) -> dict:
    """Write a reward model of ``layout`` ("qwen-rm" or "llama-rm") on the student's backbone."""
    student = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    backbone, hidden = student.model, student.config.hidden_size
    torch.manual_seed(settings.seed + (1 if layout == "qwen-rm" else 2))
    if layout == "qwen-rm":
        head: nn.Module = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    elif layout == "llama-rm":
        head = nn.Linear(hidden, 1, bias=False)
    else:
        raise ValueError(f"unknown reward model layout {layout!r}")
    mse = None
    if settings.reward_fit_steps:
        texts, targets = _fit_texts(settings, tokenizer)
        mse = _fit_head(
            head, _last_hidden(backbone, tokenizer, texts), targets, settings.reward_fit_steps
        )
        logger.info("%s head fit on %d texts: mse %.3f", layout, len(texts), mse)

    out_dir.mkdir(parents=True, exist_ok=True)
    if layout == "qwen-rm":
        _save_qwen_rm(student, head, out_dir)
    else:
        _save_llama_rm(student, head, out_dir)
    tokenizer.save_pretrained(str(out_dir))
    return {"layout": layout, "fit_mse": None if mse is None else round(mse, 4)}


def _save_qwen_rm(student: nn.Module, head: nn.Sequential, out_dir: Path) -> None:
    tensors = {f"model.{k}": v.contiguous() for k, v in student.model.state_dict().items()}
    tensors |= {f"score.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = student.config.to_dict()
    config.update(architectures=["Qwen2ForRewardModel"], num_labels=1, tie_word_embeddings=False)
    for key in ("id2label", "label2id"):
        config.pop(key, None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_llama_rm(student: nn.Module, head: nn.Linear, out_dir: Path) -> None:
    config = student.config.__class__.from_dict(student.config.to_dict())
    config.num_labels = 1
    config.architectures = ["LlamaForSequenceClassification"]
    config.tie_word_embeddings = False
    rm = LlamaForSequenceClassification(config)
    rm.model.load_state_dict(student.model.state_dict())
    rm.score.load_state_dict(head.state_dict())
    rm.save_pretrained(str(out_dir), safe_serialization=True)


@torch.no_grad()
def reference_scores(
    model_dir: str | Path, texts: list[str], tokenizer: PreTrainedTokenizerFast
) -> list[float]:
    """Raw rewards of ``texts`` computed with transformers + torch (float32), for checking vLLM.

    Works for both layouts: the backbone's final hidden state at the last token, through the
    score head as stored in the checkpoint.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config["architectures"] == ["LlamaForSequenceClassification"]:
        rm = LlamaForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32)
        backbone = rm.model
        head: nn.Module = rm.score
    else:
        weights = load_file(str(model_dir / "model.safetensors"))
        backbone = Qwen2Model(Qwen2Config.from_pretrained(str(model_dir)))
        backbone.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")})
        hidden = backbone.config.hidden_size
        head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        head.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("score.")})
    backbone.eval()
    return head(_last_hidden(backbone, tokenizer, texts, batch_size=1)).squeeze(-1).tolist()
