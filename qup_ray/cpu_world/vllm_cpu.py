"""How to run CPU-world models in vLLM on a CPU-only machine (measured settings, no network).

vLLM spawns worker processes, so a script that creates an engine must do it under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from qup_ray.cpu_world.settings import CpuWorldSettings
from qup_ray.engines import shutdown_llm  # noqa: F401  (re-exported for the CPU world's users)

logger = logging.getLogger(__name__)

# The engine arguments that work on a shared CPU machine: an explicit KV cache (the default
# memory fraction fails), eager mode (skips a C++ compile), float32 (else vLLM runs bfloat16),
# and a prefill budget large enough that prompts are never split across steps.
VLLM_CPU_KWARGS: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "kv_cache_memory_bytes": 256 << 20,
    "max_num_batched_tokens": 16384,
}


def offline_env(settings: CpuWorldSettings | None = None, apply: bool = True) -> dict[str, str]:
    """Environment for offline CPU runs: no hub access, vLLM/inductor caches under the cache
    root, and OpenMP threads that sleep rather than spin while they wait.

    ``OMP_WAIT_POLICY=PASSIVE`` matters on a shared machine: with spinning threads a tiny-model
    training step took 2.9 s instead of 0.2 s when another process used the cores. OpenMP reads
    it when torch is imported, so apply this before the first ``import torch``.

    With ``apply`` the variables are set in ``os.environ`` where not already set; the returned
    dict (the effective values) can also go into a Ray ``runtime_env``.
    """
    root = (settings or CpuWorldSettings()).cache_root()
    wanted = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(root / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "torchinductor"),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    if apply:
        for key, value in wanted.items():
            os.environ.setdefault(key, value)
        return {key: os.environ[key] for key in wanted}
    return {key: os.environ.get(key, value) for key, value in wanted.items()}
