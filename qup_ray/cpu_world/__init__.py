"""The CPU world: everything the dry run and the tests need, made locally, never downloaded.

- synthetic NuminaMath-like problems with exact answers (``synthetic``);
- one tiny BPE vocabulary saved in three real families' tokenizer layouts (Qwen2.5-Math base,
  Llama-3, DeepSeek-R1-Distill: their BOS/EOS/turn-end tokens and chat templates, ``tokenizer``),
  three tiny students trained on CPU (``tiny-qwen2``: Qwen2 architecture, Qwen layout;
  ``tiny-llama``: Llama, Llama-3 layout; ``tiny-deepseek``: Qwen2, DeepSeek layout), and two
  tiny reward models in the Qwen2.5-Math-RM and Skywork layouts (``build``);
- a rule-based, OpenAI-compatible oracle server with fault injection (``oracle_server``).

Model references ``cpu-world:tiny-qwen2``, ``cpu-world:tiny-llama``, ``cpu-world:tiny-deepseek``,
``cpu-world:tiny-qwen-rm`` and ``cpu-world:tiny-llama-rm`` resolve to cached local directories
(``resolve_model_ref``).
Build from a shell with ``python -m qup_ray.cpu_world build``.

Importing this package is cheap: torch and transformers load only when something is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public names and the submodule each lives in. They load on first use (PEP 562), so that
# `python -m qup_ray.cpu_world.oracle_server` does not find its module imported already.
_EXPORTS = {
    "MODEL_NAMES": "build",
    "build_cpu_world": "build",
    "is_cpu_world_ref": "build",
    "resolve_model_ref": "build",
    "FaultConfig": "oracle_server",
    "RuleOracleHandle": "oracle_server",
    "start_rule_oracle": "oracle_server",
    "CpuWorldSettings": "settings",
    "TinyLMSettings": "settings",
    "SolvedProblem": "synthetic",
    "generate_problems": "synthetic",
    "solve_problem_text": "synthetic",
}
__all__ = [
    "MODEL_NAMES",
    "CpuWorldSettings",
    "FaultConfig",
    "RuleOracleHandle",
    "SolvedProblem",
    "TinyLMSettings",
    "build_cpu_world",
    "generate_problems",
    "is_cpu_world_ref",
    "resolve_model_ref",
    "solve_problem_text",
    "start_rule_oracle",
]

if TYPE_CHECKING:
    from qup_ray.cpu_world.build import (
        MODEL_NAMES,
        build_cpu_world,
        is_cpu_world_ref,
        resolve_model_ref,
    )
    from qup_ray.cpu_world.oracle_server import FaultConfig, RuleOracleHandle, start_rule_oracle
    from qup_ray.cpu_world.settings import CpuWorldSettings, TinyLMSettings
    from qup_ray.cpu_world.synthetic import SolvedProblem, generate_problems, solve_problem_text


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
