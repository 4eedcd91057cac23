"""Pytest fixtures for the CPU world. Register with ``pytest_plugins = ["qup_ray.cpu_world.pytest_plugin"]``.

- ``cpu_world_settings``: the default ``CpuWorldSettings`` (cache root ``$QUP_CACHE_DIR`` or
  ``~/.cache/qup_ray``, which persists across test runs, so the models are built once);
- ``cpu_world``: the built model directories by name (``tiny-qwen2``, ``tiny-llama``,
  ``tiny-deepseek``, ``tiny-qwen-rm``, ``tiny-llama-rm``), built at most once per session;
- ``rule_oracle``: a running rule oracle without faults (``.base_url`` ends in ``/v1``);
- ``rule_oracle_factory``: ``make(faults: FaultConfig | None = None, **fault_fields)`` starts
  more oracles (with faults); all are stopped at the end of the session.

Loading the plugin also sets the offline environment (no hub access, vLLM and inductor caches
under the cache root) for everything the tests start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qup_ray.cpu_world.build import build_cpu_world
from qup_ray.cpu_world.oracle_server import FaultConfig, RuleOracleHandle, start_rule_oracle
from qup_ray.cpu_world.settings import CpuWorldSettings
from qup_ray.cpu_world.vllm_cpu import offline_env


def pytest_configure(config: pytest.Config) -> None:
    offline_env()


@pytest.fixture(scope="session")
def cpu_world_settings() -> CpuWorldSettings:
    """The CPU-world settings the tests use (the defaults)."""
    return CpuWorldSettings()


@pytest.fixture(scope="session")
def cpu_world(cpu_world_settings: CpuWorldSettings) -> dict[str, Path]:
    """The CPU world's model directories by name (built once, then cached on disk)."""
    return build_cpu_world(cpu_world_settings)


@pytest.fixture(scope="session")
def rule_oracle() -> Iterator[RuleOracleHandle]:
    """A rule oracle without faults, shared by the session."""
    with start_rule_oracle() as handle:
        yield handle


@pytest.fixture(scope="session")
def rule_oracle_factory() -> Iterator[Callable[..., RuleOracleHandle]]:
    """Start rule oracles with faults: ``make(FaultConfig(...))`` or ``make(rate_429=0.1, seed=1)``."""
    handles: list[RuleOracleHandle] = []

    def make(faults: FaultConfig | None = None, **fault_fields) -> RuleOracleHandle:
        handle = start_rule_oracle(faults=faults or FaultConfig(**fault_fields))
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()
