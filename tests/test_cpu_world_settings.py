"""CPU-world settings, model references and the cache key (fast: nothing is built)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qup_ray.cpu_world import MODEL_NAMES, CpuWorldSettings, TinyLMSettings, resolve_model_ref
from qup_ray.cpu_world.build import MODEL_LAYOUTS, world_dir, world_hash
from qup_ray.cpu_world.settings import WarmStartSettings, resolve_cache_root


def _all_fields(model_cls):
    for name, field in model_cls.model_fields.items():
        yield model_cls, name, field


def test_every_field_is_documented():
    classes = (CpuWorldSettings, TinyLMSettings, WarmStartSettings)
    for cls, name, field in [f for c in classes for f in _all_fields(c)]:
        assert field.description, f"{cls.__name__}.{name} has no docstring"


def test_unknown_keys_and_bad_shapes_are_rejected():
    with pytest.raises(ValidationError, match="extra"):
        CpuWorldSettings(nosie_rate=0.1)
    with pytest.raises(ValidationError, match="head size"):
        TinyLMSettings(hidden_size=64, num_attention_heads=4)  # head size 16 fails in vLLM-CPU
    with pytest.raises(ValidationError, match="max_train_steps"):
        TinyLMSettings(train_steps=10, max_train_steps=5)
    with pytest.raises(ValidationError, match="max_train_steps"):
        WarmStartSettings(train_steps=10, max_train_steps=5)
    with pytest.raises(ValidationError, match="compact_text_rate \\+ reference_text_rate"):
        CpuWorldSettings(compact_text_rate=0.6, reference_text_rate=0.2, compact_chat_rate=0.2)
    # Round trip through a plain dict, as the experiment config embeds it.
    settings = CpuWorldSettings(
        qwen2={"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 3}
    )
    assert CpuWorldSettings.model_validate(settings.model_dump()) == settings


def test_hash_covers_the_settings_but_not_the_cache_location(tmp_path):
    base = CpuWorldSettings()
    assert world_hash(base) == world_hash(CpuWorldSettings())
    assert world_hash(base) == world_hash(CpuWorldSettings(cache_dir=str(tmp_path)))
    assert world_hash(base) != world_hash(CpuWorldSettings(noise_rate=0.2))
    assert world_hash(base) != world_hash(CpuWorldSettings(llama=TinyLMSettings(seed=9)))
    assert world_hash(base) != world_hash(CpuWorldSettings(deepseek=WarmStartSettings(seed=9)))
    assert world_hash(base) != world_hash(CpuWorldSettings(next_turn_rate=0.5))
    assert world_hash(base) != world_hash(CpuWorldSettings(compact_text_rate=0.0))
    assert world_hash(base) != world_hash(CpuWorldSettings(reference_text_rate=0.0))
    assert world_hash(base) != world_hash(CpuWorldSettings(compact_chat_rate=0.0))
    assert world_hash(base) != world_hash(CpuWorldSettings(latex_chat_rate=0.0))
    assert world_dir(CpuWorldSettings(cache_dir=str(tmp_path))).parent == tmp_path / "cpu_world"


def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("QUP_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_root() == tmp_path / "env"
    assert resolve_cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert CpuWorldSettings().cache_root() == tmp_path / "env"
    monkeypatch.delenv("QUP_CACHE_DIR")
    assert resolve_cache_root().parts[-2:] == (".cache", "qup_ray")


@pytest.mark.parametrize("ref", ["Qwen/Qwen2.5-Math-1.5B", "/models/local-checkpoint", "gpt-5.2"])
def test_other_references_pass_through_unchanged(ref):
    assert resolve_model_ref(ref) == ref


def test_unknown_cpu_world_names_are_errors():
    with pytest.raises(ValueError, match="tiny-qwen2"):
        resolve_model_ref("cpu-world:tiny-gpt")
    assert set(MODEL_NAMES) == {
        "tiny-qwen2",
        "tiny-llama",
        "tiny-deepseek",
        "tiny-qwen-rm",
        "tiny-llama-rm",
    }
    assert MODEL_LAYOUTS == {
        "tiny-qwen2": "qwen2.5",
        "tiny-llama": "llama3",
        "tiny-deepseek": "deepseek",
        "tiny-qwen-rm": "qwen2.5",
        "tiny-llama-rm": "llama3",
    }
