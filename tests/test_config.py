"""Every shipped YAML validates; bad configs give one message listing every problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qup_ray.config import (
    CONFIGS_DIR,
    ConfigError,
    ExperimentConfig,
    dump_config,
    load_cluster_config,
    load_config,
    parse_override,
)

EXPERIMENT_YAMLS = sorted(CONFIGS_DIR.glob("*.yaml"))
CLUSTER_YAMLS = sorted((CONFIGS_DIR / "clusters").glob("*.yaml"))
PROMPT_YAMLS = sorted((CONFIGS_DIR / "prompts").glob("*.yaml"))
DEEPSPEED_JSONS = sorted((CONFIGS_DIR / "deepspeed").glob("*.json"))


def qup(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qup_ray.cli", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_every_config_file_is_covered():
    shipped = {p for p in CONFIGS_DIR.rglob("*") if p.is_file()}
    covered = set(EXPERIMENT_YAMLS + CLUSTER_YAMLS + PROMPT_YAMLS + DEEPSPEED_JSONS)
    assert shipped == covered, f"config files no test loads: {sorted(shipped - covered)}"
    assert {p.name for p in EXPERIMENT_YAMLS} >= {"dryrun.yaml", "paper.yaml"}


@pytest.mark.parametrize("path", EXPERIMENT_YAMLS, ids=lambda p: p.name)
def test_experiment_yaml_validates(path: Path):
    cfg = load_config(path)
    assert cfg.anchor_student in cfg.students
    assert cfg.stream_names()


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_validates(path: Path):
    load_cluster_config(path)


# Placeholders each prompt's `user` template takes; student prompts take only {problem}.
PROMPT_FIELDS = {
    "refine": {"problem", "trace"},
    "synthesize": {"problem"},
    "style_align": {"problem", "trace", "exemplars"},
    "retention_judge": {"original", "refined"},
}


@pytest.mark.parametrize("path", PROMPT_YAMLS, ids=lambda p: p.name)
def test_prompt_files_have_system_and_user(path: Path):
    import string

    prompt = yaml.safe_load(path.read_text())
    assert set(prompt) == {"system", "user"}
    fields = {f for _, f, _, _ in string.Formatter().parse(prompt["user"]) if f is not None}
    assert fields == PROMPT_FIELDS.get(path.stem, {"problem"})
    filled = prompt["user"].format(**{f: f"<{f}>" for f in fields})
    assert all(f"<{f}>" in filled for f in fields)


@pytest.mark.parametrize("path", DEEPSPEED_JSONS, ids=lambda p: p.name)
def test_deepspeed_json_parses(path: Path):
    ds = json.loads(path.read_text())
    assert ds["zero_optimization"]["stage"] in (1, 2, 3)
    # Without torch_adam DeepSpeed compiles fused Adam at start-up (minutes on CPU).
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_paper_config_matches_the_paper():
    cfg = load_config(CONFIGS_DIR / "paper.yaml")
    assert cfg.problems.source.dataset == "AI-MO/NuminaMath-CoT"
    assert cfg.problems.num_problems == 100_000
    assert cfg.students[cfg.anchor_student].path == "Qwen/Qwen2.5-Math-1.5B"
    assert {m.family for m in cfg.students.values()} == {"qwen2.5", "llama3", "deepseek"}
    assert (cfg.rollouts.num_samples_per_problem, cfg.rollouts.temperature) == (8, 1.0)
    assert set(cfg.streams.enabled) == {
        "slm_rft", "oracle_refined", "oracle_synthesized", "numina_subset", "style_aligned",
        "slm_min_ppl", "compat_select", "reward_select",  # issue 18's selection streams
    }  # fmt: skip
    assert len(cfg.scoring.reward_models) == 3
    t = cfg.training
    assert (t.learning_rate, t.global_batch_size, t.num_epochs) == (5e-5, 256, 1)
    assert set(t.objectives) == {"sft", "dft"}
    assert t.robustness == [{"learning_rate": 2e-5, "global_batch_size": 128}]
    e = cfg.evaluation
    assert (e.num_samples, e.temperature, e.max_new_tokens) == (16, 1.0, 4096)
    assert set(e.benchmarks) == {"math500", "aime24", "amc23", "minerva_math", "olympiadbench"}


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        CONFIGS_DIR / "dryrun.yaml",
        ["rollouts.temperature=0.7", "students.tiny-qwen.engine.num_actors=3",
         "streams.style_oracles=[rule]", "experiment=other"],
    )  # fmt: skip
    assert cfg.rollouts.temperature == 0.7
    assert cfg.students["tiny-qwen"].engine.num_actors == 3
    assert cfg.run_dir.name == "other"
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ValueError):
        parse_override("no-equals-sign")


def test_all_problems_reported_at_once(tmp_path: Path):
    data = yaml.safe_load((CONFIGS_DIR / "dryrun.yaml").read_text())
    data["rollouts"]["bogus"] = 1
    data["training"]["learning_rate"] = "fast"
    data["anchor_student"] = "nobody"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(bad, ["students.tiny-qwen.engine.dtype=fp8"])
    text = str(info.value)
    for path in ("rollouts.bogus", "training.learning_rate", "anchor_student",
                 "students.tiny-qwen.engine.dtype"):  # fmt: skip
        assert path in text
    assert "'fast'" in text and "'fp8'" in text and len(info.value.problems) == 4


def test_cli_bad_config_exit_code_2_without_traceback(tmp_path: Path):
    data = yaml.safe_load((CONFIGS_DIR / "dryrun.yaml").read_text())
    data["scoring"]["unknown_key"] = True
    data["rollouts"]["num_samples_per_problem"] = "eight"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    for command in (["validate", "-c", str(bad)], ["run", "problems", "-c", str(bad)]):
        result = qup(*command)
        assert result.returncode == 2, result.stderr
        assert "scoring.unknown_key: unknown key" in result.stderr
        assert "rollouts.num_samples_per_problem" in result.stderr and "'eight'" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_cli_validate_shipped_configs():
    for name in ("paper.yaml", "dryrun.yaml"):
        result = qup("validate", "-c", str(CONFIGS_DIR / name))
        assert result.returncode == 0, result.stderr
        assert ": ok" in result.stdout


def test_missing_or_broken_file_is_a_user_error(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("experiment: [unclosed\n")
    for path in (tmp_path / "absent.yaml", broken):
        result = qup("validate", "-c", str(path))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert str(path) in result.stderr


def test_secrets_are_not_config_values(tmp_path: Path):
    data = yaml.safe_load((CONFIGS_DIR / "paper.yaml").read_text())
    data["oracles"]["gpt-5.2"]["api_key"] = "sk-should-not-be-here"
    bad = tmp_path / "secret.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "oracles.gpt-5.2.api_key: unknown key" in str(info.value)
    # The resolved config names the variable, never its value.
    cfg = load_config(CONFIGS_DIR / "paper.yaml")
    os.environ["OPENAI_API_KEY"] = "sk-test-secret-value"
    try:
        dumped = dump_config(cfg)
    finally:
        del os.environ["OPENAI_API_KEY"]
    assert "OPENAI_API_KEY" in dumped and "sk-test-secret-value" not in dumped


def test_every_field_is_documented():
    undocumented = []

    def walk(model: type, prefix: str) -> None:
        for name, info in model.model_fields.items():
            if not info.description:
                undocumented.append(prefix + name)
            for sub in (*getattr(info.annotation, "__args__", ()), info.annotation):
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    walk(sub, f"{prefix}{name}.")

    walk(ExperimentConfig, "")
    # Top-level sections are documented on their classes.
    sections = {
        "problems",
        "rollouts",
        "streams",
        "scoring",
        "training",
        "evaluation",
        "grading",
        "ray",
    }
    assert [f for f in undocumented if f not in sections] == []


def test_training_seeds_are_a_grid_dimension(tmp_path: Path):
    from qup_ray.grid import plan_grid
    from qup_ray.rundir import RunDir, eval_cells, seed_cells, train_cell_settings, train_cells
    from qup_ray.stages.train import cell_config_hash, deepspeed_template

    one = load_config(CONFIGS_DIR / "dryrun.yaml", [f"output_dir={tmp_path}"])
    three = load_config(
        CONFIGS_DIR / "dryrun.yaml", [f"output_dir={tmp_path}", "training.seeds=[0, 1, 2]"]
    )
    # One seed: today's folder names; three: the seed-0 cells keep them, the others add -seed<N>.
    assert train_cells(one) == ["sft", "dft"]
    assert train_cells(three) == ["sft", "sft-seed1", "sft-seed2", "dft", "dft-seed1", "dft-seed2"]
    assert seed_cells(three)["dft"] == {0: "dft", 1: "dft-seed1", 2: "dft-seed2"}
    assert train_cell_settings(three)["dft-seed2"] == {
        "objective": "dft", "learning_rate": 1e-4, "global_batch_size": 16, "seed": 2,
    }  # fmt: skip
    students = list(three.students)
    trained = [f"{s}/{st}/{c}" for s in students for st in three.stream_names()
               for c in train_cells(three)]  # fmt: skip
    assert eval_cells(three) == [f"{s}/base/base" for s in students] + trained
    # The grid: one train and one eval job per seed cell on SLURM; local.yaml keeps one of each.
    slurm = load_cluster_config(CONFIGS_DIR / "clusters" / "example_slurm.yaml")
    jobs = {j.name: j for j in plan_grid(three, slurm, tmp_path).jobs}
    cell = f"{students[0]}/slm_rft/dft-seed1"
    assert jobs[f"train/{cell}"].cells == [cell]
    assert jobs[f"eval/{cell}"].depends_on == [f"train/{cell}"]
    assert sum(1 for n in jobs if n.startswith("train/")) == len(trained) == 3 * len(
        [c for c in eval_cells(one) if "/base/" not in c]
    )  # fmt: skip
    local = load_cluster_config(CONFIGS_DIR / "clusters" / "local.yaml")
    local_jobs = {j.name: j for j in plan_grid(three, local, tmp_path).jobs}
    assert local_jobs["train"].cells == trained
    # qup status lists every seed's train cell and eval cell.
    paths = {row["path"] for row in RunDir(tmp_path).status(three)}
    assert {f"train/{cell}", f"eval/{cell}", f"eval/{cell}/synthetic_test"} <= paths
    # The seed is the cell's identity: a one-seed run hashes as before (seeds: [0] and unset
    # agree), the seed-0 cell of three seeds is that cell, and seed 1's is a run with seed 1.
    ds = deepspeed_template(one)
    student = students[0]

    def cell_hash(cfg, folder: str) -> str:
        return cell_config_hash(cfg, student, train_cell_settings(cfg)[folder], ds)

    seed_one = load_config(CONFIGS_DIR / "dryrun.yaml", ["training.seed=1"])
    only_zero = load_config(CONFIGS_DIR / "dryrun.yaml", ["training.seeds=[0]"])
    assert cell_hash(one, "dft") == cell_hash(three, "dft") == cell_hash(only_zero, "dft")
    assert cell_hash(three, "dft-seed1") == cell_hash(seed_one, "dft") != cell_hash(one, "dft")


def test_training_seed_mistakes_are_reported():
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS_DIR / "dryrun.yaml", ["training.seeds=[0, 1, 1, -2]"])
    text = str(info.value)
    assert "training.seeds.3" in text and "training.seeds: seeds repeated [1]" in text
    with pytest.raises(ConfigError, match=r"training\.seeds"):
        load_config(CONFIGS_DIR / "dryrun.yaml", ["training.seeds=[]"])
