"""The oracle client: refinement, synthesis, style alignment and retention judging through any
OpenAI-compatible endpoint (GPT-5.2 in the paper, a vLLM server, or the CPU world's rule oracle).

- ``client``: ``OracleClient.complete_many`` / ``run_requests`` (bounded concurrency, retries,
  budget, one result per request);
- ``cache``: the on-disk response cache that makes reruns free;
- ``retry``: which failures are retried and how long to wait;
- ``endpoint``: ``oracle_endpoint`` (starts the rule oracle for ``backend: rule``) and API keys;
- ``prompts``: the tasks' messages from ``configs/prompts/`` and ``parse_retention_score``.
"""

from qup_ray.oracle.cache import CachedResponse, ResponseCache, cache_key
from qup_ray.oracle.client import (
    OracleClient,
    OracleRequest,
    OracleResult,
    ReplyCheck,
    request_cache_key,
    run_requests,
    summarize,
)
from qup_ray.oracle.endpoint import OracleKeyError, oracle_endpoint, redact, resolve_api_key
from qup_ray.oracle.prompts import (
    check_boxed_answer,
    check_retention_score,
    parse_retention_score,
    refine_messages,
    retention_judge_messages,
    style_align_messages,
    synthesize_messages,
)
from qup_ray.oracle.retry import RetryPolicy, classify_error

__all__ = [
    "CachedResponse",
    "OracleClient",
    "OracleKeyError",
    "OracleRequest",
    "OracleResult",
    "ReplyCheck",
    "ResponseCache",
    "RetryPolicy",
    "cache_key",
    "check_boxed_answer",
    "check_retention_score",
    "classify_error",
    "oracle_endpoint",
    "parse_retention_score",
    "redact",
    "refine_messages",
    "request_cache_key",
    "resolve_api_key",
    "retention_judge_messages",
    "run_requests",
    "style_align_messages",
    "summarize",
    "synthesize_messages",
]
