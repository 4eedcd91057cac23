"""Where an oracle is reached, and with which key.

- ``oracle_endpoint(cfg)``: the OpenAI ``base_url`` of an oracle. For ``backend: rule`` it starts
  the CPU world's rule oracle for the duration of the ``with`` block; otherwise it is the
  configured ``base_url`` (the OpenAI API, or a vLLM server started on the cluster).
- ``resolve_api_key(cfg)``: the key, read from the environment variable the config names, at the
  moment of use. Configs hold only the variable's *name*; the key never reaches a file or a log.
- ``redact(text, secret)``: ``text`` with the key masked, for anything recorded from a server's
  error message (some servers echo what they were sent).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from qup_ray.config import OracleConfig

if TYPE_CHECKING:
    from qup_ray.cpu_world.oracle_server import FaultConfig

logger = logging.getLogger(__name__)

# The openai client insists on some key; local servers (rule oracle, vLLM) ignore it.
DUMMY_API_KEY = "EMPTY"
REDACTED = "***"


class OracleKeyError(RuntimeError):
    """The environment variable that should hold an oracle's API key is unset or empty."""


def resolve_api_key(cfg: OracleConfig) -> str:
    """The API key from ``os.environ[cfg.api_key_env]``, or a dummy key when no variable is named."""
    if not cfg.api_key_env:
        return DUMMY_API_KEY
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise OracleKeyError(
            f"environment variable {cfg.api_key_env} is not set or empty; it should hold the API"
            f" key of oracle model {cfg.model!r} (oracles.<name>.api_key_env names it)"
        )
    return key


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***`` (short secrets are kept:
    masking a 1-3 character dummy key would garble ordinary words)."""
    if not secret or len(secret) < 4 or secret == DUMMY_API_KEY:
        return text
    return text.replace(secret, REDACTED)


@contextmanager
def oracle_endpoint(cfg: OracleConfig, faults: FaultConfig | None = None) -> Iterator[str]:
    """The ``base_url`` to send ``cfg``'s requests to, valid inside the ``with`` block.

    ``backend: rule`` starts a rule oracle on 127.0.0.1 (with ``faults``, for tests) and stops it
    on exit; ``openai`` and ``vllm`` use ``cfg.base_url`` (a ``vllm`` oracle without one runs as
    batch engine actors, not through this client).
    """
    if cfg.backend == "rule":
        from qup_ray.cpu_world import start_rule_oracle

        with start_rule_oracle(host="127.0.0.1", port=0, faults=faults) as handle:
            yield handle.base_url
        return
    if not cfg.base_url:
        raise ValueError(
            f"oracle {cfg.model!r} (backend {cfg.backend!r}) has no base_url: set"
            " oracles.<name>.base_url to its OpenAI-compatible endpoint"
        )
    yield cfg.base_url
