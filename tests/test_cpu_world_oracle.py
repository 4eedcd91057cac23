"""The rule oracle through the real openai client: answers, styles, usage, faults, concurrency."""

from __future__ import annotations

import random
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from qup_ray.cpu_world.boxed import is_correct
from qup_ray.cpu_world.oracle_rules import (
    classify_request,
    judge_score,
    quoted_trace,
    repair_trace,
    strip_answer,
)
from qup_ray.cpu_world.oracle_server import FaultConfig
from qup_ray.cpu_world.students import corrupt_one_digit
from qup_ray.cpu_world.synthetic import latex_results, sample_problems

PROBLEMS = sample_problems(50, seed=21)
REFINE = "Problem:\n{problem}\n\nStudent solution:\n{trace}\n\nRepair any mistake in the solution."
STYLE_ALIGNED_SYSTEM = "You repair math solutions. Fix the logic but keep the student's style."


def _client(oracle, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=oracle.base_url, api_key="test", **kwargs)


def _ask(client, messages, **kwargs):
    return client.chat.completions.create(model="gpt-5.2", messages=messages, **kwargs)


def test_synthesis_is_correct_compact_and_reports_usage(rule_oracle):
    client = _client(rule_oracle)
    for p in PROBLEMS[:10]:
        reply = _ask(client, [{"role": "user", "content": p.problem}])
        text = reply.choices[0].message.content
        assert text == p.compact and is_correct(text, p.answer)
        assert reply.choices[0].finish_reason == "stop"
        assert reply.model == "gpt-5.2" and reply.object == "chat.completion" and reply.id
        assert reply.usage.prompt_tokens == len(p.problem.split())
        assert reply.usage.completion_tokens == len(text.split())
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_refinement_repairs_the_students_trace_and_style_aligned_keeps_its_style(rule_oracle):
    client = _client(rule_oracle)
    for p in PROBLEMS[:10]:
        steps = p.native.splitlines()
        # A wrong number in the first step and a wrong final answer.
        first = corrupt_one_digit(steps[0], random.Random(len(steps[0])))
        wrong = "\n".join([first, *steps[1:-1], "Therefore, the answer is \\boxed{0}."])
        user = {"role": "user", "content": REFINE.format(problem=p.problem, trace=wrong)}
        refined = _ask(client, [user]).choices[0].message.content
        assert is_correct(refined, p.answer) and refined != p.compact
        # Minimal repair: the student's steps in order, the wrong number fixed, the result of
        # each step compacted into symbols, the conclusion the student's with the right answer.
        assert refined == repair_trace(p.native, p, compact=True) == latex_results(p.native)
        assert len(refined.splitlines()) == len(steps)
        assert refined.splitlines()[-1] == steps[-1]
        assert refined.count("\\(") > p.native.count("\\(")
        aligned = _ask(client, [{"role": "system", "content": STYLE_ALIGNED_SYSTEM}, user])
        assert aligned.choices[0].message.content == p.native
        marked = _ask(client, [{"role": "user", "content": "[style-aligned] " + user["content"]}])
        assert marked.choices[0].message.content == p.native
    assert {"refine", "style_aligned"} <= set(rule_oracle.kind_counts)


def test_repair_keeps_correct_steps_and_adds_missing_ones():
    p = next(p for p in PROBLEMS if len(p.native.splitlines()) >= 3)
    steps = p.native.splitlines()
    assert repair_trace(p.native, p, compact=False) == p.native
    # A missing step is put back, steps after the conclusion's place are dropped.
    assert repair_trace("\n".join([steps[0], steps[-1]]), p, compact=False) == p.native
    extra = "\n".join([*steps[:-1], "Then, we add 1 and 1 to get 2.", steps[-1]])
    assert repair_trace(extra, p, compact=False) == p.native
    # Wording of a step with the right numbers is the student's own.
    reworded = "\n".join([steps[0].replace("First, we", "We first"), *steps[1:]])
    assert repair_trace(reworded, p, compact=False).splitlines()[0].startswith("We first")
    # A trace in the compact style is repaired against the compact solution: kept when right.
    assert repair_trace(p.compact, p, compact=True) == p.compact
    wrong = p.compact.replace(f"{{{p.answer}}}", "{0}" if p.answer != "0" else "{1}")
    assert repair_trace(wrong, p, compact=True) == p.compact
    # A trace with its results already in inline LaTeX keeps them.
    assert repair_trace(latex_results(p.native), p, compact=True) == repair_trace(p.native, p, True)


def test_retention_judge_scores_style_preserving_rewrites_higher(rule_oracle):
    client = _client(rule_oracle)
    judge = "Rate from 1 to 5 how much of the original's meaning the rewrite keeps.\n\nOriginal:\n{a}\n\nRewrite:\n{b}"
    scores = Counter()
    for p in PROBLEMS[:20]:
        for style in ("native", "compact"):
            reply = _ask(
                client, [{"role": "user", "content": judge.format(a=p.native, b=p.render(style))}]
            )
            text = reply.choices[0].message.content
            assert text.startswith("Score: ") and 1 <= int(text.split()[-1]) <= 5
            scores[style] += int(text.split()[-1])
    assert scores["native"] > scores["compact"]
    assert judge_score("no traces here") == 3


def test_unrecognised_problems_get_an_answerless_reply(rule_oracle):
    reply = _ask(
        _client(rule_oracle),
        [{"role": "user", "content": "Prove that there are infinitely many primes."}],
    )
    text = reply.choices[0].message.content
    assert text and "\\boxed" not in text


def test_models_health_and_bad_requests(rule_oracle):
    assert [m.id for m in _client(rule_oracle).models.list().data] == ["rule-oracle"]
    with urllib.request.urlopen(
        rule_oracle.base_url.removesuffix("/v1") + "/health", timeout=5
    ) as r:
        assert r.status == 200
    with pytest.raises(openai.BadRequestError):
        _client(rule_oracle, max_retries=0).chat.completions.create(
            model="m", messages="not a list"
        )


def test_request_kinds_are_recognised():
    p = PROBLEMS[0]
    assert classify_request([{"role": "user", "content": p.problem}]) == "solve"
    assert (
        classify_request(
            [{"role": "user", "content": f"Keep the student's own style.\n{p.problem}"}]
        )
        == "style_aligned"
    )
    assert (
        classify_request([{"role": "user", "content": f"Score it on a 1-5 scale.\n{p.problem}"}])
        == "judge"
    )
    assert classify_request([{"role": "user", "content": "hello"}]) == "unrecognised"
    refine = REFINE.format(problem=p.problem, trace=p.native)
    assert classify_request([{"role": "user", "content": refine}]) == "refine"
    assert quoted_trace([{"role": "user", "content": refine}]) == p.native
    assert quoted_trace([{"role": "user", "content": p.problem}]) is None
    assert "\\boxed" not in strip_answer(p.compact)


def test_each_fault_happens_at_its_seeded_rate(rule_oracle_factory):
    faults = FaultConfig(
        rate_429=0.1, rate_500=0.1, rate_timeout=0.1, rate_malformed=0.1,
        timeout_delay_s=3.0, retry_after_s=0.25, seed=1234,
    )  # fmt: skip
    oracle = rule_oracle_factory(faults)
    client = _client(
        oracle, max_retries=0, timeout=1.5
    )  # a normal reply under load stays well inside it
    retry_after = []

    def call(i: int) -> str:
        p = PROBLEMS[i % len(PROBLEMS)]
        try:
            text = _ask(client, [{"role": "user", "content": p.problem}]).choices[0].message.content
        except openai.RateLimitError as exc:
            retry_after.append(exc.response.headers.get("retry-after"))
            return "429"
        except openai.InternalServerError:
            return "500"
        except openai.APITimeoutError:
            return "timeout"
        return "ok" if is_correct(text or "", p.answer) else "malformed"

    with ThreadPoolExecutor(max_workers=64) as pool:
        outcomes = Counter(pool.map(call, range(200)))
    # Which request gets which fault depends only on (seed, request number): the counts are
    # deterministic whatever the arrival order, so these bounds cannot flake.
    expected = Counter(f for f in map(faults.fault_for, range(200)) if f)
    assert oracle.num_requests == 200
    assert oracle.fault_counts == dict(expected)
    assert {k: outcomes[k] for k in expected} == dict(expected)
    assert outcomes["ok"] == 200 - sum(expected.values())
    for kind in ("429", "500", "timeout", "malformed"):
        assert 8 <= expected[kind] <= 32, expected  # about 10% of 200
    assert set(retry_after) == {"0.25"}


def test_the_openai_client_honours_retry_after_and_gets_through(rule_oracle_factory):
    oracle = rule_oracle_factory(rate_429=0.4, retry_after_s=0.01, seed=3)
    client = _client(oracle, max_retries=8)
    for p in PROBLEMS[:20]:
        assert is_correct(
            _ask(client, [{"role": "user", "content": p.problem}]).choices[0].message.content,
            p.answer,
        )
    assert oracle.num_requests > 20 and oracle.fault_counts["429"] > 0


def test_serves_at_least_64_requests_in_flight(rule_oracle_factory):
    oracle = rule_oracle_factory(latency_s=1.0)
    client = _client(oracle, max_retries=0, timeout=30)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=96) as pool:
        replies = list(
            pool.map(lambda p: _ask(client, [{"role": "user", "content": p.problem}]), PROBLEMS * 2)
        )
    elapsed = time.perf_counter() - started
    assert len(replies) == 100 and oracle.num_requests == 100
    assert elapsed < 8, f"100 requests of 1 s each took {elapsed:.1f} s: they were not concurrent"


def test_command_line_server():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qup_ray.cpu_world.oracle_server",
            "--port",
            "0",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        base_url = line.strip().rsplit(" ", 1)[-1]
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        client = openai.OpenAI(base_url=base_url, api_key="test")
        p = PROBLEMS[0]
        assert is_correct(
            _ask(client, [{"role": "user", "content": p.problem}]).choices[0].message.content,
            p.answer,
        )
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_n_choices_and_max_tokens_truncation(rule_oracle):
    p = PROBLEMS[0]
    reply = _ask(_client(rule_oracle), [{"role": "user", "content": p.problem}], n=3, max_tokens=2)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(
        c.finish_reason == "length" and len(c.message.content.split()) == 2 for c in reply.choices
    )
    assert reply.usage.completion_tokens == 6
