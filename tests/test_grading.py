"""Bounded, parallel grading: child workers, deadlines, restarts, JSONL in and out."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from qup_ray import answers
from qup_ray.grading import BoundedChecker, grade_jsonl, grade_pairs

TIMEOUT_S = 2.0
CASES = yaml.safe_load((Path(__file__).parent / "answer_cases.yaml").read_text(encoding="utf-8"))
# Normal checks that need a worker (plain numbers and identical text are settled without one).
NORMAL = [
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", True),
    ("\\frac{\\pi}{2}", "\\boxed{\\frac{\\pi}{3}}", False),
]
PATHOLOGICAL = {
    "tower of nines": "\\boxed{9^{9^{9^{9}}}}",
    "tower of tens": "\\boxed{10^{10^{10^{10}}}}",
    "2000 nested brackets": "\\boxed{" + "(" * 2000 + "1" + ")" * 2000 + "}",
    "1 MB answer": "\\boxed{" + "1" * 1_000_000 + "}",
}


@pytest.fixture(scope="module")
def checker() -> Iterator[BoundedChecker]:
    with BoundedChecker(2, timeout_s=TIMEOUT_S) as bounded:
        bounded.warm_up()
        yield bounded


def _response(case: dict) -> str:
    return case["response"] if "response" in case else "So $\\boxed{" + case["boxed"] + "}$."


def _gold(case: dict) -> str | list[str]:
    return case["gold"] if "gold" in case else answers.gold_from_solution(case["solution"]) or ""


def test_normal_checks_need_a_worker() -> None:
    for gold, response, _ in NORMAL:
        assert answers.quick_verdict(gold, answers.extract_answer(response).text or "") is None


def test_workers_agree_with_the_in_process_checker(checker: BoundedChecker) -> None:
    pairs = [(_gold(case), _response(case)) for case in CASES if not case.get("lenient")]
    results = checker.check_many(pairs)
    assert [r.correct for r in results] == [answers.check(g, r).correct for g, r in pairs]
    assert all(r.status != "timeout" for r in results)


def test_grade_pairs_keeps_order_and_shares_duplicate_verdicts(checker: BoundedChecker) -> None:
    pairs = [
        ("\\frac{1}{2}", "\\boxed{0.5}"),
        ("\\frac{1}{2}", "\\boxed{0.5}"),
        ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}"),
        ("7", "\\boxed{7}"),
        ("7", "no answer"),
        ("7", "the answer is 7"),
    ] * 3
    results = grade_pairs(pairs, lenient=True, checker=checker)
    assert [r.correct for r in results] == [True, True, False, True, None, True] * 3
    assert [r.extract_mode for r in results][:6] == [
        "boxed",
        "boxed",
        "boxed",
        "boxed",
        None,
        "lenient_phrase",
    ]


@pytest.mark.slow
def test_pathological_answers_are_bounded_and_the_checker_recovers(
    checker: BoundedChecker,
) -> None:
    for name, response in PATHOLOGICAL.items():
        started = time.monotonic()
        result = checker.check("5", response)
        elapsed_s = time.monotonic() - started
        assert result.status in {"timeout", "parse_error"}, name
        assert result.correct is None
        assert elapsed_s < 2 * TIMEOUT_S, (name, elapsed_s)
        for gold, response_ok, expected in NORMAL:
            assert checker.check(gold, response_ok).correct is expected, name
    assert checker.check("5", PATHOLOGICAL["tower of nines"]).status == "timeout"


@pytest.mark.slow
def test_bounded_from_a_non_main_thread(checker: BoundedChecker) -> None:
    out: list = []

    def grade() -> None:
        started = time.monotonic()
        out.append(checker.check("5", PATHOLOGICAL["tower of tens"]))
        out.append(time.monotonic() - started)
        out.append(checker.check(*NORMAL[0][:2]))

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join(timeout=60)
    timed_out, elapsed_s, normal = out
    assert timed_out.status == "timeout" and timed_out.correct is None
    # Bounded, not fast: the pathological input runs for minutes unbounded, and a loaded CI
    # machine (load ~20) took 6 s for this 2 s timeout.
    assert elapsed_s < 15 * TIMEOUT_S
    assert normal.correct is True


def test_injections_through_workers(checker: BoundedChecker, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    for lenient in (False, True):
        for response in (
            f"\\boxed{{{code}}}",
            f"The answer is {code}",
            f"\\boxed{{exec('{code}')}}",
        ):
            assert checker.check("\\frac{1}{7}", response, lenient=lenient).correct is None
    assert not marker.exists()


def test_worker_killed_from_outside_is_replaced(checker: BoundedChecker) -> None:
    for worker in checker._workers:
        worker.proc.kill()
        worker.proc.wait()
    gold, response, expected = NORMAL[1]
    assert checker.check(gold, response).correct is expected


def test_worker_sandbox_refuses_processes_and_writes(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    script = (
        "import os, sys\n"
        "from qup_ray.grading import _audit_hook\n"
        "sys.addaudithook(_audit_hook)\n"
        "refused = 0\n"
        f"for attempt in (lambda: os.system('touch {marker}'), lambda: open({str(marker)!r}, 'w'),"
        " lambda: __import__('subprocess').run(['true'])):\n"
        "    try:\n"
        "        attempt()\n"
        "    except PermissionError:\n"
        "        refused += 1\n"
        "print(refused)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "3", run.stderr
    assert not marker.exists()


def test_cpu_limit_kills_a_runaway_worker() -> None:
    script = "from qup_ray.grading import _arm_cpu_limit\n_arm_cpu_limit(1)\nwhile True: pass\n"
    run = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert run.returncode == -signal.SIGXCPU


def test_closed_checker_refuses_work() -> None:
    bounded = BoundedChecker(1, timeout_s=TIMEOUT_S)
    bounded.close()
    with pytest.raises(RuntimeError):
        bounded.check("\\frac{1}{2}", "\\boxed{0.5}")


def test_grade_jsonl_grades_rows_and_reports_malformed_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        json.dumps({"id": 1, "response": "so \\boxed{\\frac{1}{2}}", "answer": "0.5"}),
        json.dumps({"id": 2, "response": "\\boxed{4}", "answer": "5"}),
        "{not json",
        "",
        json.dumps({"id": 3, "answer": "5"}),
        json.dumps({"id": 4, "response": 5, "answer": "5"}),
        json.dumps({"id": 5, "response": "\\boxed{5, 3}", "answer": ["$3$", "$5$"]}),
        json.dumps([1, 2]),
        json.dumps({"id": 6, "response": "nothing boxed", "answer": "5"}),
        json.dumps({"id": 7, "response": "\\boxed{(1,2)}", "answer": {"x": 1}}),
        json.dumps({"id": 8, "response": "\\boxed{0.25}", "answer": 0.25}),
    ]
    in_path, out_path = tmp_path / "in.jsonl", tmp_path / "out" / "graded.jsonl"
    in_path.write_text("\n".join(rows) + "\n", encoding="utf-8")

    summary = grade_jsonl(in_path, out_path, workers=2, timeout_s=TIMEOUT_S)

    out = [json.loads(line) for line in out_path.read_text(encoding="utf-8").splitlines()]
    assert len(out) == 10  # every non-blank line comes out, in order
    assert [row.get("id") for row in out] == [1, 2, None, 3, 4, 5, None, 6, 7, 8]
    verdicts = [True, False, None, None, None, True, None, None, None, True]
    assert [row["correct"] for row in out] == verdicts
    assert out[0]["extracted"] == "\\frac{1}{2}" and out[0]["extract_mode"] == "boxed"
    assert out[2]["raw"] == "{not json" and out[2]["line"] == 3 and "JSON" in out[2]["error"]
    assert "response" in out[3]["error"] and out[3]["status"] == "parse_error"
    assert out[7]["status"] == "no_answer" and "error" not in out[7]
    assert out[9]["answer"] == 0.25  # a JSON number is a gold answer too, and kept as given
    assert summary["rows"] == 10
    assert summary["correct"] == 3 and summary["wrong"] == 1
    assert summary["malformed_lines"] == [3, 5, 6, 8, 10]
    assert summary["status"] == {"ok": 4, "no_answer": 1, "parse_error": 5, "timeout": 0}
    assert not out_path.with_name("graded.jsonl.tmp").exists()
    assert "row" in capsys.readouterr().err  # the tqdm progress bar went to stderr


@pytest.mark.slow
def test_grade_bench_quick() -> None:
    from qup_ray.bench import BENCHES
    from qup_ray.bench.grade import run

    assert BENCHES["grade"] == "qup_ray.bench.grade"
    result = run(quick=True)
    assert result["bench"] == "grade" and result["num_pairs"] == 240 and result["rounds"] == 1
    assert result["pipeline_per_s"] > 0 and result["baseline_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["pipeline_per_s"] / result["baseline_per_s"], rel=0.05
    )
    assert result["agreement"] >= 0.95
    assert result["timeouts"] == 0
