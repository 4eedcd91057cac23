"""Building the CPU world: checkpoints in the expected layouts, usable in transformers; the cache
is fast, keyed by content, and safe against two processes building at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from qup_ray.cpu_world import CpuWorldSettings, build_cpu_world, resolve_model_ref
from qup_ray.cpu_world.boxed import last_boxed
from qup_ray.cpu_world.build import MODEL_LAYOUTS, MODEL_NAMES, REPORT_FILE, STUDENTS, world_dir
from qup_ray.cpu_world.students import encode_prompt, heldout_problems, prompt_messages

pytestmark = pytest.mark.slow


def test_cached_world_loads_in_seconds(cpu_world, cpu_world_settings):
    started = time.perf_counter()
    assert build_cpu_world(cpu_world_settings) == cpu_world
    assert resolve_model_ref("cpu-world:tiny-llama-rm", cpu_world_settings) == str(
        cpu_world["tiny-llama-rm"]
    )
    assert time.perf_counter() - started < 10
    # From a fresh process too, as a pipeline stage would see it.
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "qup_ray.cpu_world", "build"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert time.perf_counter() - started < 10
    assert json.loads(out.stdout)["models"] == {k: str(v) for k, v in cpu_world.items()}


def test_build_report_shows_students_that_solve_part_of_heldout_problems(cpu_world):
    report = json.loads((cpu_world["tiny-qwen2"].parent / REPORT_FILE).read_text())
    for name in ("tiny-qwen2", "tiny-llama", "tiny-deepseek"):
        heldout = report["students"][name]["heldout_hf"]
        assert 0.2 <= heldout["pass_at_k"] <= 0.9, (name, heldout)
        assert heldout["boxed_rate"] >= 0.5, (name, heldout)
        # Sampled until the turn-end token, as the suite does: nearly every sample ends there.
        assert heldout["stop_rate"] >= 0.9, (name, heldout)
        assert report["students"][name]["layout"] == MODEL_LAYOUTS[name]
        print(name, heldout)
    print("build timings (s):", report["timings_s"])


# Per layout: BOS (None: none), the turn end, and generation_config.json's eos.
LAYOUT_TOKENS = {
    "qwen2.5": (None, "<|im_end|>", "<|endoftext|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_ships_its_family_layout(cpu_world, name):
    from transformers import AutoTokenizer

    layout = MODEL_LAYOUTS[name]
    bos, turn_end, eos = LAYOUT_TOKENS[layout]
    tokenizer = AutoTokenizer.from_pretrained(str(cpu_world[name]))
    reference = AutoTokenizer.from_pretrained(str(cpu_world["tiny-qwen2"]))
    assert tokenizer.bos_token == bos
    assert tokenizer.get_vocab() == reference.get_vocab()  # one vocabulary for all
    chat = [{"role": "user", "content": "What is 1 + 1?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == (bos is not None)
    assert tokenizer(prompt)["input_ids"].count(tokenizer.bos_token_id) == 2 * (bos is not None)
    config = json.loads((cpu_world[name] / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids(eos)
    if name in STUDENTS:
        generation = json.loads((cpu_world[name] / "generation_config.json").read_text())
        assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(eos)
        answer = [*chat, {"role": "assistant", "content": "\\boxed{2}"}]
        text = tokenizer.apply_chat_template(answer, tokenize=False)
        assert text.rstrip("\n").endswith("\\boxed{2}" + turn_end)


@pytest.mark.parametrize(
    ("name", "arch"),
    [
        ("tiny-qwen2", "Qwen2ForCausalLM"),
        ("tiny-llama", "LlamaForCausalLM"),
        ("tiny-deepseek", "Qwen2ForCausalLM"),
    ],
)
def test_students_generate_in_transformers(cpu_world, cpu_world_settings, name, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cpu_world[name]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert config["hidden_size"] // config["num_attention_heads"] >= 32
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    turn_end = tokenizer.convert_tokens_to_ids(LAYOUT_TOKENS[MODEL_LAYOUTS[name]][1])

    model = AutoModelForCausalLM.from_pretrained(str(path))
    problem = heldout_problems(cpu_world_settings, 1)[0]
    ids = encode_prompt(tokenizer, prompt_messages(problem.problem))
    out = model.generate(
        torch.tensor([ids]), do_sample=False, max_new_tokens=160, eos_token_id=turn_end
    )
    generated = out[0, len(ids) :].tolist()
    assert generated[-1] == turn_end  # greedy decoding ends its turn
    text = tokenizer.decode(generated, skip_special_tokens=True)
    assert text.startswith("First, we ") and last_boxed(text) is not None


def test_reward_models_have_the_paper_checkpoint_layouts(cpu_world):
    from transformers import AutoModelForSequenceClassification

    qwen = cpu_world["tiny-qwen-rm"]
    assert json.loads((qwen / "config.json").read_text())["architectures"] == [
        "Qwen2ForRewardModel"
    ]
    with safe_open(str(qwen / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        hidden = f.get_tensor("score.0.weight").shape[0]
        assert f.get_tensor("score.0.weight").shape == (hidden, hidden)
        assert f.get_tensor("score.2.weight").shape == (1, hidden)
    assert {
        "score.0.bias",
        "score.2.bias",
        "model.embed_tokens.weight",
        "model.norm.weight",
    } <= keys
    assert not any(k.startswith("lm_head") for k in keys)

    llama = AutoModelForSequenceClassification.from_pretrained(str(cpu_world["tiny-llama-rm"]))
    assert type(llama).__name__ == "LlamaForSequenceClassification" and llama.config.num_labels == 1
    assert llama.score.bias is None


_TINY_BUILD = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from qup_ray.cpu_world import CpuWorldSettings, TinyLMSettings, build_cpu_world
from qup_ray.cpu_world.settings import WarmStartSettings
tiny = dict(train_steps=2, max_train_steps=2, batch_size=4)
settings = CpuWorldSettings(
    cache_dir=sys.argv[1], num_train_problems=200, num_eval_problems=5, min_pass_at_8=0,
    reward_fit_steps=5, qwen2=TinyLMSettings(seed=1, **tiny), llama=TinyLMSettings(seed=2, **tiny),
    deepseek=WarmStartSettings(seed=3, **tiny),
)
print(build_cpu_world(settings)["tiny-qwen2"])
"""


def test_two_processes_build_one_world(tmp_path: Path):
    script = tmp_path / "build.py"
    script.write_text(_TINY_BUILD)
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert results[0][0] == results[1][0]  # the same directory
    logs = "".join(err for _, err in results)
    assert logs.count("building the CPU world") == 1
    assert "built by another process meanwhile" in logs
    worlds = [p for p in (cache / "cpu_world").iterdir() if p.is_dir()]
    assert [w.name for w in worlds] == [
        Path(results[0][0].strip()).parent.name
    ]  # no temp dirs left
    assert (worlds[0] / REPORT_FILE).exists()


def test_world_dir_depends_on_settings(tmp_path):
    a = world_dir(CpuWorldSettings(cache_dir=str(tmp_path)))
    b = world_dir(CpuWorldSettings(cache_dir=str(tmp_path), seed=1))
    assert a != b and a.parent == b.parent
