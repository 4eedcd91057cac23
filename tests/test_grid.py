"""The grid's plan, cluster YAML checks and per-job Ray settings: no SLURM, no Ray needed.

Expected jobs, dependencies and GPU-hours are recomputed here from the config by hand, not by
calling the planner's helpers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from qup_ray.config import (
    CONFIGS_DIR,
    ConfigError,
    load_cluster_config,
    load_config,
)
from qup_ray.grid import plan_grid
from qup_ray.grid.ray_cluster import NUM_FIXED_PORTS, pick_ports, temp_dir_for
from qup_ray.grid.submit import _dependency, _submission_units
from qup_ray.rundir import MANIFEST, RunDir, write_json, write_parquet

PAPER = CONFIGS_DIR / "paper.yaml"
SLURM = CONFIGS_DIR / "clusters" / "example_slurm.yaml"


def qup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qup_ray.cli", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def paper():
    return load_config(PAPER)


@pytest.fixture(scope="module")
def slurm():
    return load_cluster_config(SLURM)


def test_every_shipped_cluster_yaml_loads():
    for path in sorted((CONFIGS_DIR / "clusters").glob("*.yaml")):
        load_cluster_config(path)


def test_paper_plan_has_every_cell_with_its_dependencies(paper, slurm, tmp_path: Path):
    plan = plan_grid(paper, slurm, tmp_path)
    jobs = {j.name: j for j in plan.jobs}
    objectives = ["sft", "dft", "sft-lr2e-05-bs128", "dft-lr2e-05-bs128"]
    streams = ["slm_rft", "oracle_refined", "oracle_synthesized", "numina_subset",
               "style_aligned_gpt-5.2", "style_aligned_qwen2.5-72b", "slm_min_ppl", "compat_select",
               "reward_select"]  # fmt: skip
    cells = [f"{s}/{st}/{o}" for s in paper.students for st in streams for o in objectives]
    assert len(cells) == 3 * 9 * 4 == 108
    expected = ["fetch", "problems", "rollouts", "streams", "score"]
    expected += [f"{kind}/{c}" for c in cells for kind in ("train", "eval")]
    expected += [f"eval/{s}/base/base" for s in paper.students] + ["report"]
    assert list(jobs) == expected
    assert jobs["fetch"].depends_on == [] and jobs["problems"].depends_on == ["fetch"]
    assert jobs["rollouts"].depends_on == ["problems"]
    assert jobs["score"].depends_on == ["streams"]
    for c in cells:
        assert jobs[f"train/{c}"].depends_on == ["streams"]
        assert jobs[f"train/{c}"].cells == [c]
        assert jobs[f"eval/{c}"].depends_on == [f"train/{c}"]
    report_deps = set(jobs["report"].depends_on)
    assert report_deps == {"score"} | {n for n in jobs if n.startswith("eval/")}
    # Resources: cluster defaults with the stage overrides of example_slurm.yaml.
    assert jobs["problems"].resources.gpus_per_node == 0
    assert jobs["fetch"].resources.gpus == 0 and jobs["fetch"].gpu_hours == 0
    assert jobs[f"train/{cells[0]}"].resources.timeout_min == 720
    assert jobs["rollouts"].resources.gpus == 8
    assert not any(j.done for j in plan.jobs)


def test_gpu_hours_follow_the_config_sizes(paper, slurm, tmp_path: Path):
    plan = plan_grid(paper, slurm, tmp_path)
    jobs = {j.name: j for j in plan.jobs}
    tokens = 700  # estimate.mean_sample_tokens default
    rollouts = 3 * 100_000 * 8 * tokens / 2500 / 3600
    assert jobs["rollouts"].gpu_hours == pytest.approx(rollouts)
    problem_set = round(100_000 * 0.34)
    # Only the open 72B oracle (style_aligned_qwen2.5-72b) runs on GPUs: one trace per problem
    # per student; the selection streams score their pool (8 samples + 6 stream traces per
    # problem) by perplexity (1 GPU) and RM-72B (TP 4).
    oracle = 3 * problem_set * tokens / 150 / 3600
    pool = 3 * 14 * problem_set * tokens * 5 / 20000 / 3600
    assert jobs["streams"].gpu_hours == pytest.approx(oracle + pool)
    # Perplexity (1 GPU) + RM-72B (TP 4) + Skywork 8B (1) + Nemotron 70B (TP 4) per trace.
    assert jobs["score"].gpu_hours == pytest.approx(
        3 * 9 * problem_set * tokens * 10 / 20000 / 3600
    )
    train = problem_set * tokens / 6000 / 3600
    assert jobs["train/qwen2.5-math-1.5b/slm_rft/sft"].gpu_hours == pytest.approx(train)
    evals = 5 * 300 * 16 * tokens / 2500 / 3600
    assert jobs["eval/llama-3.2-1b/base/base"].gpu_hours == pytest.approx(evals)
    assert jobs["problems"].gpu_hours == jobs["report"].gpu_hours == 0
    total = sum(j.gpu_hours for j in plan.jobs)
    assert total == pytest.approx(rollouts + jobs["streams"].gpu_hours + jobs["score"].gpu_hours
                                  + 108 * train + 111 * evals)  # fmt: skip


def test_measured_throughputs_replace_the_defaults(paper, slurm, tmp_path: Path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(
        json.dumps({"bench": "rollouts", "pipeline_per_s": 40000.0, "actors": 8}) + "\n"
    )
    cluster = slurm.model_copy(update={"estimate": slurm.estimate.model_copy(
        update={"bench_json": [str(bench)]})})  # fmt: skip
    plan = plan_grid(paper, cluster, tmp_path)
    assert plan.rates["generate_tokens_per_gpu_s"] == 5000.0
    assert "qup bench rollouts" in plan.rate_sources["generate_tokens_per_gpu_s"]
    assert "default" in plan.rate_sources["train_tokens_per_gpu_s"]
    rollouts = next(j for j in plan.jobs if j.name == "rollouts")
    assert rollouts.gpu_hours == pytest.approx(3 * 100_000 * 8 * 700 / 5000 / 3600)


def test_earlier_run_calibrates_generation(paper, slurm, tmp_path: Path):
    earlier = tmp_path / "pilot"
    write_json(earlier / "grid" / "jobs.json", {"jobs": [{
        "name": "rollouts", "stage": "rollouts", "outputs": ["rollouts/a", "rollouts/b"],
        "resources": {"nodes": 1, "gpus_per_node": 4}}]})  # fmt: skip
    write_json(earlier / "rollouts" / "a" / MANIFEST,
               {"generated_tokens": 1_000_000, "timings": {"duration_s": 100}})  # fmt: skip
    write_json(earlier / "rollouts" / "b" / MANIFEST,
               {"generated_tokens": 3_000_000, "timings": {"duration_s": 100}})  # fmt: skip
    # A training cell: label tokens and seconds of its optimizer steps, on a 2-GPU job.
    jobs = json.loads((earlier / "grid" / "jobs.json").read_text())
    jobs["jobs"].append({"name": "train/a/b/sft", "stage": "train", "outputs": ["train/a/b/sft"],
                         "resources": {"nodes": 1, "gpus_per_node": 2}})  # fmt: skip
    write_json(earlier / "grid" / "jobs.json", jobs)
    write_json(earlier / "train" / "a" / "b" / "sft" / MANIFEST, {"timings": {"duration_s": 999}})
    write_parquet(earlier / "train" / "a" / "b" / "sft" / "metrics.parquet",
                  [{"label_tokens": 3000, "seconds": 1.0}, {"label_tokens": 5000, "seconds": 1.0}])  # fmt: skip
    cluster = slurm.model_copy(update={"estimate": slurm.estimate.model_copy(
        update={"calibration_runs": [str(earlier)]})})  # fmt: skip
    plan = plan_grid(paper, cluster, tmp_path / "run")
    # 4M tokens in 200 s on 4 GPUs.
    assert plan.rates["generate_tokens_per_gpu_s"] == pytest.approx(4e6 / 800)
    assert str(earlier) in plan.rate_sources["generate_tokens_per_gpu_s"]
    assert plan.rates["train_tokens_per_gpu_s"] == pytest.approx(8000 / 2 / 2)


def test_finished_jobs_are_not_resubmitted_and_nothing_waits_for_them(paper, slurm, tmp_path):
    for folder in ["problems", "rollouts/qwen2.5-math-1.5b"]:
        write_json(tmp_path / folder / MANIFEST, {})
    cell = "llama-3.2-1b/numina_subset/dft"
    write_json(tmp_path / "train" / cell / MANIFEST, {})
    plan = plan_grid(paper, slurm, tmp_path)
    jobs = {j.name: j for j in plan.jobs}
    assert jobs["problems"].done
    assert not jobs["rollouts"].done  # only one student's rollouts are finished
    assert jobs["rollouts"].depends_on == []
    assert jobs["eval/llama-3.2-1b/base/base"].depends_on == []
    # A finished cell whose inputs will be rebuilt (streams is pending) must rerun too.
    assert not jobs[f"train/{cell}"].done
    # With every data stage finished, the cell is skipped and its evaluation waits for nothing.
    assert not jobs["fetch"].done  # pending, yet the finished problems job is not redone
    for folder in jobs["rollouts"].outputs + jobs["streams"].outputs + jobs["score"].outputs:
        write_json(tmp_path / folder / MANIFEST, {})
    write_json(tmp_path / "problem_set" / MANIFEST, {"row_counts": {"problem_set": 1234}})
    plan = plan_grid(paper, slurm, tmp_path)
    jobs = {j.name: j for j in plan.jobs}
    assert jobs[f"train/{cell}"].done and not jobs[f"eval/{cell}"].done
    assert jobs[f"eval/{cell}"].depends_on == []
    assert plan.problem_set == 1234 and plan.problem_set_measured
    assert len(plan.pending) == 1 + 108 - 1 + 111 + 1  # fetch, train, eval, report


def test_a_config_edit_resubmits_and_a_throughput_edit_does_not(paper, slurm, tmp_path: Path):
    for job in plan_grid(paper, slurm, tmp_path).jobs:
        for folder in job.outputs:
            write_json(tmp_path / folder / MANIFEST, {"row_counts": {"problem_set": 100}})
    RunDir(tmp_path).save_config(paper)
    assert plan_grid(paper, slurm, tmp_path).pending == []
    faster = load_config(PAPER, ["ray.num_cpus=4"])
    for student in faster.students.values():
        student.engine.num_actors, student.engine.batch_size = 2, 8
    assert plan_grid(faster, slurm, tmp_path).pending == []
    hotter = load_config(PAPER, ["rollouts.temperature=0.7"])
    plan = plan_grid(hotter, slurm, tmp_path)
    assert len(plan.pending) == len(plan.jobs)  # the stages then decide what really changed


def test_a_change_to_the_cpu_worlds_code_resubmits_the_runs_that_use_it(
    paper, slurm, tmp_path: Path, monkeypatch
):
    """The YAML of a dry run does not change when the code that builds the CPU world does;
    the run's saved results hash (the world's content hash inside) does."""
    from qup_ray.cpu_world import build

    dry = load_config(CONFIGS_DIR / "dryrun.yaml")
    assert dry.uses_cpu_world() and not paper.uses_cpu_world()
    for job in plan_grid(dry, slurm, tmp_path).jobs:
        for folder in job.outputs:
            write_json(tmp_path / folder / MANIFEST, {"row_counts": {"problem_set": 100}})
    RunDir(tmp_path).save_config(dry)
    assert plan_grid(dry, slurm, tmp_path).pending == []
    before = {c.experiment: c.section_hash("rollouts", "cpu_world") for c in (dry, paper)}
    monkeypatch.setattr(build, "world_hash", lambda settings: "0" * 16)  # the code changed
    plan = plan_grid(dry, slurm, tmp_path)
    assert len(plan.pending) == len(plan.jobs)
    after = {c.experiment: c.section_hash("rollouts", "cpu_world") for c in (dry, paper)}
    assert after[dry.experiment] != before[dry.experiment]  # its stages rerun too
    assert after[paper.experiment] == before[paper.experiment]  # real models: untouched


def test_arrays_and_slurm_dependencies(paper, slurm, tmp_path: Path):
    plan = plan_grid(paper, slurm, tmp_path)
    units = _submission_units(plan)
    assert [len(u) for u in units] == [1, 1, 1, 1, 1, 108, 108, 3, 1]
    ids = {"problems": "11", "rollouts": "12", "streams": "13", "score": "14"}
    arrays = {}
    train, evals, base, report = units[5:]
    assert _dependency(train, ids, arrays) == "afterok:13"
    ids.update({j.name: f"20_{i}" for i, j in enumerate(train)})
    arrays["train"] = train
    # Task i of the evaluation array waits for task i of the training array only.
    assert _dependency(evals, ids, arrays) == "aftercorr:20"
    assert _dependency(base, ids, arrays) == "afterok:11"
    ids.update({j.name: f"21_{i}" for i, j in enumerate(evals)})
    ids.update({j.name: f"22_{i}" for i, j in enumerate(base)})
    dep = _dependency(report, ids, arrays)
    assert dep.startswith("afterok:") and "14" in dep.split(":") and "21_107" in dep.split(":")


def test_unsplit_cells_make_one_train_and_one_eval_job(paper, slurm, tmp_path: Path):
    split = plan_grid(paper, slurm, tmp_path)
    plan = plan_grid(paper, slurm.model_copy(update={"split_cells": False}), tmp_path)
    jobs = {j.name: j for j in plan.jobs}
    assert list(jobs) == [
        "fetch", "problems", "rollouts", "streams", "score", "train", "eval", "report"]  # fmt: skip
    assert len(jobs["train"].cells) == 108 and len(jobs["eval"].cells) == 111
    assert jobs["eval"].depends_on == ["problems", "train"]
    assert jobs["report"].depends_on == ["score", "eval"]
    by_stage = split.gpu_hours_by_stage()
    assert jobs["train"].gpu_hours == pytest.approx(by_stage["train"])
    assert jobs["eval"].gpu_hours == pytest.approx(by_stage["eval"])
    only = plan_grid(paper, slurm, tmp_path, cells=["llama-3.2-1b/slm_rft/sft"])
    assert [j.name for j in only.jobs if j.cells] == [
        "train/llama-3.2-1b/slm_rft/sft", "eval/llama-3.2-1b/slm_rft/sft"]  # fmt: skip


def test_plan_command_prints_the_paper_grid():
    result = qup("grid", "--plan", "-c", str(PAPER), "--cluster", str(SLURM))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    paper = load_config(PAPER)
    for s in paper.students:
        assert f"train/{s}/style_aligned_qwen2.5-72b/dft-lr2e-05-bs128" in out
        assert f"eval/{s}/base/base" in out
    assert "225 jobs" in out  # with the fetch job
    assert "GPU-hours by stage" in out and "total" in out
    assert "from default (cluster YAML estimate.generate_tokens_per_gpu_s)" in out
    assert "1n x 8gpu 64cpu 480GB 1440min" in out


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("executor: slurm\npartiton: gpu\n", "partiton: unknown key"),
        ("stages:\n  trian: {nodes: 1}\n", "stages.trian: not a stage"),
        ("gpus_per_node: 4\nstages:\n  score: {gpus_per_node: 8}\n",
         "stages.score.gpus_per_node: more GPUs per job node than a node has"),
        ("executor: local\nstages:\n  train: {nodes: 2}\n", "stages.train.nodes: executor 'local'"),
    ],
)  # fmt: skip
def test_cluster_yaml_mistakes_are_one_message_and_exit_2(tmp_path: Path, yaml_text, message):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_cluster_config(path)
    result = qup("grid", "--plan", "-c", str(PAPER), "--cluster", str(path))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_ray_temp_dir_must_fit_unix_socket_paths():
    assert temp_dir_for("1234", "/tmp") == Path("/tmp/qup-ray-1234")
    long_root = "/scratch/slurm/job_tmpdirs/" + "x" * 60
    with pytest.raises(ValueError, match="too long for Unix sockets"):
        temp_dir_for("1234_17", long_root)


def test_port_blocks_skip_ports_in_use():
    first = pick_ports("42", (30000, 31000), 100)
    assert 30000 <= first.base <= 30900 and first.base % 100 == 0
    assert first.worker_range == (first.base + NUM_FIXED_PORTS, first.base + 99)
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", first.port("dashboard")))
        busy.listen()
        second = pick_ports("42", (30000, 31000), 100)
    assert second.base != first.base
    assert len({first.port(n) for n in ("gcs", "dashboard", "node_manager")}) == 3


@pytest.mark.slow
@pytest.mark.cluster
def test_local_executor_runs_the_jobs_and_skips_dependents_of_a_failure(tmp_path: Path):
    """`executor: local` (the dry run's path): same jobs, one Ray cluster for all, no SLURM; the
    cluster is stopped after the last job, after a failure and after Ctrl-C."""
    from qup_ray.grid import launch
    from qup_ray.grid.submit import SHARED_RAY
    from qup_ray.stages import run_stage

    local = load_cluster_config(CONFIGS_DIR / "clusters" / "local.yaml")
    cfg = load_config(CONFIGS_DIR / "dryrun.yaml",
                      [f"output_dir={tmp_path / 'grid'}", "problems.num_problems=16"])  # fmt: skip
    seen: list[tuple[str, str]] = []
    result = launch(cfg, local, stages=["problems"], progress=lambda n, _, s: seen.append((n, s)))
    assert result.states == {"problems": "COMPLETED"} and result.ok
    assert seen == [(SHARED_RAY, "STARTED"), ("problems", "RUNNING"), ("problems", "COMPLETED"),
                    (SHARED_RAY, "STOPPED")]  # fmt: skip
    assert set(result.shared_ray) == {"start_s", "stop_s"}
    direct = cfg.model_copy(update={"output_dir": str(tmp_path / "direct")})
    run_stage("problems", direct)
    got = pq_rows(tmp_path / "grid" / "dryrun" / "problems" / "problems.parquet")
    assert got == pq_rows(tmp_path / "direct" / "dryrun" / "problems" / "problems.parquet")
    record = json.loads((tmp_path / "grid" / "dryrun" / "grid" / "jobs.json").read_text())["jobs"]
    assert [(r["name"], r["state"], r["job_id"]) for r in record] == [
        ("problems", "COMPLETED", result.job_ids["problems"])
    ]
    (head,) = (tmp_path / "grid" / "dryrun" / "grid" / "ray").glob("local-*/head.json")
    log = tmp_path / "grid" / "dryrun" / local.log_dir / result.job_ids["problems"]
    assert sorted(p.name for p in log.parent.iterdir()) == [result.job_ids["problems"]]
    assert json.loads(head.read_text())["address"] in "".join(
        f.read_text() for f in log.glob("*_log.*"))  # fmt: skip
    assert_no_ray_left(head)

    broken = load_config(CONFIGS_DIR / "dryrun.yaml", [
        f"output_dir={tmp_path / 'broken'}", "problems.source.kind=local",
        f"problems.source.path={tmp_path / 'no-such-file.parquet'}"])  # fmt: skip
    result = launch(broken, local, stages=["problems", "rollouts"])
    assert result.states == {"problems": "FAILED", "rollouts": "DEPENDENCY_FAILED"}
    assert not (tmp_path / "broken" / "dryrun" / "rollouts").exists()
    assert_no_ray_left(next((tmp_path / "broken" / "dryrun" / "grid" / "ray").glob("*/head.json")))

    # Ctrl-C while a job runs: the job's process and the cluster go, the error goes on.
    def interrupt(name: str, job_id: str, state: str) -> None:
        if state == "RUNNING":
            running.append(job_id)
            raise KeyboardInterrupt

    running: list[str] = []
    again = cfg.model_copy(update={"output_dir": str(tmp_path / "interrupted")})
    with pytest.raises(KeyboardInterrupt):
        launch(again, local, stages=["problems"], progress=interrupt)
    assert_no_ray_left(
        next((tmp_path / "interrupted" / "dryrun" / "grid" / "ray").glob("*/head.json"))
    )
    job_ids = [int(j) for j in running]  # the local executor's job id is the job's pid
    assert job_ids and not any(psutil.pid_exists(j) and psutil.Process(j).status() != "zombie"
                               for j in job_ids)  # fmt: skip


def assert_no_ray_left(head_json: Path) -> None:
    """No process of the local grid's cluster runs, and its temp dir is gone."""
    from qup_ray.grid.ray_cluster import own_processes

    temp_dir = Path(json.loads(head_json.read_text())["temp_dir"])
    assert not temp_dir.exists()
    assert own_processes(temp_dir) == []


def pq_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(path).to_pylist(), key=lambda r: r["problem_id"])
