"""`qup fetch` and the offline errors (issue 15, point 2): the plan lists every model and dataset
of the paper's config with its revision, without network; a stage that needs something missing
from an empty Hugging Face cache under HF_HUB_OFFLINE=1 stops with one line naming it.

Nothing here reaches the hub: the Hugging Face caches are folders in tmp_path, laid out as
huggingface_hub lays them out (`datasets--org--name/{refs,snapshots}`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qup_ray.config import CONFIGS_DIR
from qup_ray.fetch import NotFetched

PAPER = CONFIGS_DIR / "paper.yaml"


def offline_env(tmp_path: Path) -> dict[str, str]:
    """An empty Hugging Face cache and cache root, the hub switched off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_ADDRESS"))}
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        QUP_CACHE_DIR=str(tmp_path / "qup_cache"),
        RAY_AUTH_MODE="disabled",
    )
    return env


def qup(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-c", "from qup_ray.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def paper_items() -> list[tuple[str, str]]:
    """(repo id, revision or 'main') of every hub item of paper.yaml, read from the YAML itself."""
    data = yaml.safe_load(PAPER.read_text())
    items = []
    sources = [data["problems"]["source"]]
    sources += [b["source"] for b in data["evaluation"]["benchmarks"].values()]
    items += [(s["dataset"], s.get("revision") or "main") for s in sources]
    items += [(m["path"], m.get("revision") or "main") for m in data["students"].values()]
    items += [
        (data["reward_models"][n]["path"], data["reward_models"][n].get("revision") or "main")
        for n in data["scoring"]["reward_models"]
    ]
    items += [
        (o["model"], o.get("revision") or "main")
        for o in data["oracles"].values()
        if o["backend"] == "vllm" and not o.get("base_url")
    ]
    return items


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_plan_lists_every_model_and_dataset_of_the_paper_with_its_revision(tmp_path: Path):
    out = qup(["fetch", "--plan", "-c", str(PAPER)], offline_env(tmp_path), tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    expected = paper_items()
    assert len(lines) == len(expected) == 13
    for repo_id, revision in expected:
        (line,) = [ln for ln in lines if f" {repo_id} " in f" {ln} "]
        assert f"revision {revision}" in line
        assert line.endswith("size unknown (offline)")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))


def test_plan_of_the_dry_run_fetches_nothing(tmp_path: Path):
    out = qup(["fetch", "--plan", "-c", str(CONFIGS_DIR / "dryrun.yaml")], offline_env(tmp_path),
              tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines and all("not fetched" in line for line in lines)


@pytest.mark.slow
def test_problems_offline_with_an_empty_cache_names_the_missing_dataset(tmp_path: Path):
    out = qup(
        ["run", "problems", "-c", str(PAPER), f"output_dir={tmp_path / 'runs'}"],
        offline_env(tmp_path),
        tmp_path,
    )
    assert out.returncode == 2, out.stderr
    (line,) = error_lines(out.stderr)
    assert "AI-MO/NuminaMath-CoT" in line and "qup fetch -c" in line
    assert "Traceback" not in out.stderr


def test_rollouts_offline_with_problems_done_names_the_missing_model(tmp_path: Path):
    from qup_ray.config import load_config
    from qup_ray.data import PROBLEM_SCHEMA
    from qup_ray.rundir import RunDir, Stage

    overrides = [f"output_dir={tmp_path / 'runs'}", "ray.num_cpus=1", "ray.include_dashboard=false"]
    cfg = load_config(PAPER, overrides)
    # The problems stage's output, written with the project's own stage helpers.
    stage = Stage(RunDir.for_config(cfg).root / "problems", config_hash="made-by-the-test")
    with stage.running():
        row = {"problem_id": "p1", "problem": "What is 1+1?", "answer": "2", "solution": "",
               "source": "test", "benchmark": ""}  # fmt: skip
        stage.write_table("problems", [row])
        stage.finish(row_counts={"problems": 1})
    assert PROBLEM_SCHEMA.names == list(row)

    out = qup(["run", "rollouts", "-c", str(PAPER), *overrides], offline_env(tmp_path), tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = error_lines(out.stderr)
    assert "Qwen/Qwen2.5-Math-1.5B" in line and "qup fetch -c" in line
    assert "Traceback" not in out.stderr
    assert "Ray" not in out.stderr  # it stops before starting a Ray cluster


# --------------------------------------------------------------------------------------------
# Loading from the cache at the pinned revision
# --------------------------------------------------------------------------------------------


def fake_hub_dataset(hub_cache: Path, repo_id: str, rows_by_sha: dict[str, list[dict]]) -> None:
    """A dataset repository in huggingface_hub's cache layout, one snapshot per sha; `main`
    points at the last one."""
    repo = hub_cache / f"datasets--{repo_id.replace('/', '--')}"
    for sha, rows in rows_by_sha.items():
        snapshot = repo / "snapshots" / sha / "data"
        snapshot.mkdir(parents=True)
        (snapshot / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(list(rows_by_sha)[-1])


def test_a_hub_dataset_loads_offline_from_the_cache_at_its_pinned_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import datasets
    from huggingface_hub import constants

    from qup_ray.config import DatasetSource
    from qup_ray.data import load_problems

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    fake_hub_dataset(tmp_path / "hub", "org/toy", {
        "a" * 40: [{"question": "q old", "answer": "old"}],
        "b" * 40: [{"question": "q new", "answer": "new"}],
    })  # fmt: skip
    fields = {"problem": "question", "answer": "answer"}

    def answers(revision: str | None, cache_root: Path) -> list[str]:
        source = DatasetSource(kind="hub", dataset="org/toy", revision=revision, fields=fields)
        return [r["answer"] for r in load_problems(source, cache_root=cache_root)[0]]

    never_fetched, locked = tmp_path / "empty", tmp_path / "locked"
    locked.mkdir()
    (locked / "fetch_lock.json").write_text(json.dumps({"dataset:org/toy@main": "a" * 40}))
    assert answers(None, never_fetched) == ["new"]  # unpinned, never fetched: the cache's main
    assert answers(None, locked) == ["old"]  # the sha `qup fetch` locked, though main moved on
    assert answers("a" * 40, never_fetched) == ["old"]  # pinned to a sha: that snapshot
    with pytest.raises(NotFetched, match="org/toy"):
        answers("c" * 40, never_fetched)


@pytest.mark.parametrize(("revision", "cached"), [("a" * 40, True), ("c" * 40, False)])
def test_fetch_offline_checks_the_cache_and_names_what_is_missing(
    tmp_path: Path, revision: str, cached: bool
):
    env = offline_env(tmp_path)
    fake_hub_dataset(
        tmp_path / "hf" / "hub", "org/toy", {"a" * 40: [{"question": "q", "answer": "1"}]}
    )
    hub_problems = ["problems.source.kind=hub", "problems.source.dataset=org/toy",
                    f"problems.source.revision={revision}"]  # fmt: skip
    out = qup(["fetch", "-c", str(CONFIGS_DIR / "dryrun.yaml"), *hub_problems], env, tmp_path)
    if cached:
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.startswith("fetch: done")
    else:
        assert out.returncode == 2, out.stderr[-3000:]
        (line,) = error_lines(out.stderr)
        assert "org/toy" in line and revision in line
        assert "Traceback" not in out.stderr


def test_a_hub_model_resolves_to_its_cached_snapshot_at_the_configured_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from huggingface_hub import constants

    from qup_ray.config import load_config
    from qup_ray.models import engine_max_len, resolve_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / "models--org--student"
    for sha, context in (("a" * 40, 1024), ("b" * 40, 2048)):
        (repo / "snapshots" / sha).mkdir(parents=True)
        (repo / "snapshots" / sha / "config.json").write_text(
            json.dumps({"max_position_embeddings": context})
        )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", [
        "students.tiny-qwen.path=org/student", f"students.tiny-qwen.revision={'a' * 40}",
        f"cache_dir={tmp_path / 'qup_cache'}",
    ])  # fmt: skip
    student = cfg.students["tiny-qwen"]
    path = resolve_model(student.path, cfg)  # the revision comes from the student's config
    assert Path(path) == repo / "snapshots" / ("a" * 40)
    assert engine_max_len(student.engine.model_copy(update={"max_model_len": None}), path) == 1024
    with pytest.raises(NotFetched, match="org/other"):
        resolve_model("org/other", cfg)


@pytest.mark.slow
def test_the_grid_starts_with_a_fetch_job_that_records_each_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A config naming a hub item gets a CPU-only `fetch` job before `problems` (none for the
    CPU world); the job runs without Ray and its manifest names the commit it found."""
    from qup_ray.config import load_cluster_config, load_config
    from qup_ray.grid import launch

    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)  # the job's process inherits them
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fake_hub_dataset(tmp_path / "hf" / "hub", "org/toy", {"a" * 40: [{"question": "q"}]})
    local = load_cluster_config(CONFIGS_DIR / "clusters" / "local.yaml")
    overrides = [f"output_dir={tmp_path / 'runs'}"]
    cpu_world = launch(load_config(CONFIGS_DIR / "dryrun.yaml", overrides), local, plan_only=True)
    assert cpu_world.plan.jobs[0].name == "problems"
    cfg = load_config(CONFIGS_DIR / "dryrun.yaml", [*overrides, "problems.source.kind=hub",
                                                    "problems.source.dataset=org/toy"])  # fmt: skip
    plan = launch(cfg, local, plan_only=True).plan
    jobs = {j.name: j for j in plan.jobs}
    assert plan.jobs[0].name == "fetch" and jobs["problems"].depends_on == ["fetch"]
    result = launch(cfg, local, stages=["fetch"])
    assert result.states == {"fetch": "COMPLETED"}
    manifest = json.loads((cfg.run_dir / "fetch" / "_manifest.json").read_text())
    assert manifest["commits"] == {"dataset:org/toy": "a" * 40}
    assert launch(cfg, local, plan_only=True).plan.jobs[0].done  # a rerun skips it
