"""Training data: labels on the response and the closing turn-end token only, the seeded
length-grouped plan, truncation counts, and bad training configs (one message, exit 2)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter

import pytest

from qup_ray.config import CONFIGS_DIR
from qup_ray.losses import IGNORE_INDEX
from qup_ray.training.data import Example, collate, encode_stream, plan_steps

PROBLEM = "What is 12 + 30?"
TRACE = "We add 12 and 30. So the answer is \\boxed{42}."


@pytest.mark.parametrize(
    "student,turn_end", [("tiny-qwen2", "<|im_end|>"), ("tiny-llama", "<|eot_id|>")]
)
def test_turn_end_carries_a_label_and_the_prompt_none(cpu_world, student, turn_end):
    from qup_ray.encoding import ChatFormat

    fmt = ChatFormat.for_model(cpu_world[student], "tiny")
    tok = fmt.tokenizer
    examples, counts = encode_stream(
        [{"problem_id": "a", "problem": PROBLEM, "trace": TRACE}], fmt, max_seq_len=4096
    )
    assert counts == {"rows": 1, "examples": 1, "truncated": 0, "dropped_too_long": 0}
    ex = examples[0]
    batch = collate([ex, Example("b", ex.input_ids[:-3], ex.response_start)], pad_id=0)
    labels, ids = batch["labels"][0].tolist(), batch["input_ids"][0].tolist()

    # the prompt is exactly the generation prompt, and carries no label
    assert ids[: ex.response_start] == fmt.prompt_ids(PROBLEM)
    assert set(labels[: ex.response_start]) == {IGNORE_INDEX}
    # every response token is labelled with itself, the last one is the template's turn end
    assert labels[ex.response_start :] == ids[ex.response_start :]
    assert tok.convert_ids_to_tokens(labels[-1]) == turn_end
    assert tok.decode(labels[ex.response_start : -1]) == TRACE
    # the chat template itself closes the assistant turn with that token right after the trace
    rendered = tok.apply_chat_template(
        [*fmt.messages(PROBLEM), {"role": "assistant", "content": TRACE}], tokenize=False
    )
    assert rendered.split(TRACE, 1)[1].startswith(turn_end)
    # padding carries no label, and the loss's shift lands the turn end on a real position
    assert batch["labels"][1, -3:].tolist() == [IGNORE_INDEX] * 3
    assert batch["attention_mask"][1, -3:].tolist() == [0, 0, 0]


def test_truncated_and_dropped_rows_are_counted(cpu_world):
    from qup_ray.encoding import ChatFormat

    fmt = ChatFormat.for_model(cpu_world["tiny-qwen2"], "tiny")
    prompt_len = len(fmt.prompt_ids(PROBLEM))
    rows = [
        {"problem_id": "short", "problem": PROBLEM, "trace": "42"},
        {"problem_id": "long", "problem": PROBLEM, "trace": TRACE * 20},
        {"problem_id": "huge", "problem": PROBLEM * 40, "trace": TRACE},
    ]
    examples, counts = encode_stream(rows, fmt, max_seq_len=prompt_len + 10)
    assert counts == {"rows": 3, "examples": 2, "truncated": 1, "dropped_too_long": 1}
    assert [e.problem_id for e in examples] == ["short", "long"]
    assert all(len(e.input_ids) <= prompt_len + 10 for e in examples)


def test_plan_is_seeded_complete_and_length_grouped():
    lengths = [(i * 37) % 101 + 5 for i in range(70)]
    kw = {"global_batch_size": 16, "micro_batch_size": 2, "world_size": 2, "num_epochs": 2.0}
    plan = plan_steps(lengths, seed=3, **kw)
    assert plan.steps == plan_steps(lengths, seed=3, **kw).steps
    assert plan.steps != plan_steps(lengths, seed=4, **kw).steps
    # 140 = 8 x 16 + 12: a short last step of 12 (a multiple of 2 x 2), nothing dropped
    assert len(plan) == 9 and plan.dropped_tail == 0
    assert plan_steps(lengths[:69], seed=3, **kw).dropped_tail == 2  # 138 = 8 x 16 + 8 + 2
    seen = Counter()
    for n, step in enumerate(plan.steps):
        size = 16 if n < 8 else 12
        assert len(step) == 2 and all(len(rank) == size // 4 for rank in step)
        flat = [i for rank in step for mb in rank for i in mb]
        assert len(flat) == len(set(flat)) == size
        seen.update(flat)
        # micro-batches are cut from the step's sequences sorted by length
        spans = sorted((max(lengths[i] for i in mb), min(lengths[i] for i in mb))
                       for rank in step for mb in rank)  # fmt: skip
        assert all(hi_prev <= lo for (hi_prev, _), (_, lo) in itertools.pairwise(spans))
    assert max(seen.values()) <= 2  # two epochs: an example at most twice

    # grouping by length pads less than the seeded order would
    def padding(groups):
        return sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g) for g in groups)

    grouped = [mb for step in plan.steps for rank in step for mb in rank]
    ungrouped = []
    for step in plan.steps:
        flat = sorted(i for rank in step for mb in rank for i in mb)
        ungrouped += [flat[j : j + 2] for j in range(0, len(flat), 2)]
    assert padding(grouped) < padding(ungrouped)


def test_plan_refuses_batches_that_do_not_divide():
    with pytest.raises(ValueError, match="not a multiple"):
        plan_steps([5] * 40, global_batch_size=10, micro_batch_size=4, world_size=1,
                   num_epochs=1, seed=0)  # fmt: skip


def test_bad_training_config_is_one_message_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "qup_ray.cli", "validate", "-c", str(CONFIGS_DIR / "dryrun.yaml"),
         "training.global_batch_size=20", "training.streams=[slm_rft, no_such_stream]",
         "training.robustness=[{learning_rate: 2.0e-5, global_batch_size: 12}]"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "3 problem(s)" in proc.stderr
    assert "training.global_batch_size: must be a multiple of" in proc.stderr
    assert "= 8 (got 20)" in proc.stderr
    assert "training.robustness.0.global_batch_size" in proc.stderr
    assert "training.streams.1: not a stream of this experiment" in proc.stderr
    assert "'no_such_stream'" in proc.stderr
