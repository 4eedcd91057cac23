"""Typed experiment configuration: YAML in, validated pydantic models out.

Every setting of a run lives in one YAML file (see `configs/`), optionally changed on the command
line with `key.sub=value` overrides. Unknown keys are errors. Validation collects *every* problem,
names it by its dotted path as the user spells it, and raises one `ConfigError`; the CLI prints it
and exits with code 2, without a traceback.

Secrets never live in a config: an oracle names the *environment variable* that holds its key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from qup_ray.cpu_world.settings import CpuWorldSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"

STREAMS = ("slm_rft", "oracle_refined", "oracle_synthesized", "numina_subset", "style_aligned",
           "slm_min_ppl", "compat_select", "reward_select")  # fmt: skip
"""Stream kinds; the last three are chosen from the others by `qup_ray.selection` (issue 18)."""
OBJECTIVES = ("sft", "dft")


def default_cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir` if given, else `$QUP_CACHE_DIR`, else `~/.cache/qup_ray`: the rule behind
    `ExperimentConfig.cache_root`, for code that holds no config (a dataset source)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("QUP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qup_ray"


class ConfigError(Exception):
    """One or more problems in a configuration, each `path: message (got value)`."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, fields documented in place."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    THROUGHPUT: ClassVar[frozenset[str]] = frozenset()
    """Fields that change how fast work is done, never its results (left out of stage hashes)."""


def cpu_world_identity(settings: CpuWorldSettings) -> dict:
    """What a run's stages hash the CPU world by: its content hash, which covers the settings,
    the code that builds the models and the versions of torch, transformers and tokenizers. A
    change to any of them reruns every stage that used the world, not only a change of a
    setting."""
    from qup_ray.cpu_world.build import world_hash

    return {"world_hash": world_hash(settings)}


# Top-level sections that change no result: how Ray is reached and where the run is written.
NOT_RESULTS = ("ray", "output_dir")


def result_view(value: Any) -> Any:
    """A config value as JSON data without its throughput fields (`THROUGHPUT` of each model):
    what a stage's identity is hashed from, so a job requeued onto another allocation (other
    actor counts, batch sizes, memory settings) keeps its finished work."""
    if isinstance(value, BaseModel):
        skip = getattr(type(value), "THROUGHPUT", frozenset())
        return {
            name: result_view(getattr(value, name))
            for name in type(value).model_fields
            if name not in skip
        }
    if isinstance(value, dict):
        return {str(k): result_view(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [result_view(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------
# Engines and models
# --------------------------------------------------------------------------------------------


class EngineConfig(StrictModel):
    """How one vLLM engine (one Ray actor) is built for a model."""

    THROUGHPUT: ClassVar[frozenset[str]] = frozenset(
        {"kv_cache_memory_bytes", "gpu_memory_utilization", "enforce_eager",
         "max_num_batched_tokens", "num_actors", "num_gpus_per_actor", "num_cpus_per_actor",
         "in_process_core", "batch_size", "max_restarts", "max_task_retries"}
    )  # fmt: skip

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights/activation dtype. Use float32 on CPU when numbers must match transformers exactly."""
    max_model_len: int | None = Field(None, gt=0)
    """Longest prompt + generation, in tokens. Unset: the checkpoint's context
    (`max_position_embeddings`). A value above the checkpoint's context is a config error unless
    `allow_long_context` is set. Inputs longer than the limit go to the stage's rejected table;
    a generation whose prompt + `max_new_tokens` would exceed it is shortened and counted."""
    allow_long_context: bool = False
    """Accept a `max_model_len` above the checkpoint's context (RoPE scaling set up by you; vLLM
    also needs `VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`)."""
    kv_cache_memory_bytes: int | None = Field(None, gt=0)
    """Explicit KV-cache size. Needed on CPU and on shared machines (e.g. 268435456)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of GPU memory vLLM may take when `kv_cache_memory_bytes` is not set."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine spans (e.g. 4 or 8 for a 72B model)."""
    enforce_eager: bool = False
    """Skip CUDA graphs / torch.compile. True on CPU saves a ~25 s compile at start-up."""
    max_num_batched_tokens: int | None = Field(None, gt=0)
    """Tokens per engine step. On CPU use >= 16384 so prefills are not split (seeded sampling)."""
    num_actors: int = Field(1, ge=1)
    """Engine actors in the Ray Data actor pool (one model copy each)."""
    num_gpus_per_actor: float = Field(0, ge=0)
    """GPUs reserved per actor; 0 on CPU. Normally equal to `tensor_parallel_size`."""
    num_cpus_per_actor: float = Field(1, gt=0)
    """CPUs reserved per actor. An in-process CPU engine computes with this many threads
    (rounded down, at least 1)."""
    in_process_core: bool | None = None
    """Run vLLM's engine core and model in the actor's own process
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) instead of two extra processes that busy-wait on each
    other. None: on for CPU engines (`num_gpus_per_actor: 0`), where it left a 2-core machine a
    whole core for grading and Ray (generation alone also ran 25% faster with both cores); off
    on GPUs, where the separate process overlaps scheduling with the forward pass. Its cost on
    CPU: vLLM does not pin the threads to cores, which matters only on large NUMA nodes."""
    batch_size: int = Field(64, gt=0)
    """Rows handed to one actor call by Ray Data `map_batches`."""
    max_restarts: int = Field(8, ge=0)
    """Times Ray restarts one engine actor that died (out of memory, a lost GPU, a drained node)
    before the pool gives up on it."""
    max_task_retries: int = Field(2, ge=0)
    """Times a batch whose actor died is sent again. A batch that still kills its actor is
    redone one row at a time, and the rows that keep crashing go to the stage's rejected table
    (reason `engine_crash`)."""


class ModelConfig(StrictModel):
    """A language model used as a student (learner) or an oracle's open-weights engine."""

    path: str
    """Hugging Face hub id, local directory, or `cpu-world:<name>` for the project's tiny models."""
    revision: str | None = None
    """Hub revision (a commit sha; a branch or tag is resolved by `qup fetch` to the sha it
    downloaded and recorded in `<cache_root>/fetch_lock.json`). Unset: the default branch, as
    locked by `qup fetch`. Ignored for local folders and `cpu-world:` refs."""
    family: Literal["qwen2.5", "llama3", "deepseek", "tiny"]
    """Model family; picks the prompt template and is a grid axis in the report."""
    prompt: str
    """Name of the zero-shot CoT prompt file in `configs/prompts/` (without `.yaml`)."""
    engine: EngineConfig = EngineConfig()
    """vLLM engine settings for generation and scoring with this model."""


class OracleConfig(StrictModel):
    """A strong model that refines, synthesizes or style-aligns traces (GPT-5.2 in the paper)."""

    THROUGHPUT: ClassVar[frozenset[str]] = frozenset(
        {"max_concurrency", "timeout_s", "max_retries", "usd_per_million_prompt_tokens",
         "usd_per_million_completion_tokens", "budget_usd"}
    )  # fmt: skip

    backend: Literal["openai", "vllm", "rule"]
    """`openai`: any OpenAI-compatible endpoint; `vllm`: batch vLLM actors of an open model;
    `rule`: the project's rule-based OpenAI-compatible server (CPU world), started by the suite."""
    model: str
    """Model name sent to the endpoint (openai/rule) or model path/hub id (vllm)."""
    revision: str | None = None
    """Hub revision of an open model (`vllm` backend without `base_url`), pinned like a
    student's `revision`. Ignored by the other backends."""
    base_url: str | None = None
    """Endpoint, e.g. `https://api.openai.com/v1`. Unset for the `rule` backend (started locally)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key. The key itself never goes in a config."""
    max_concurrency: int = Field(32, ge=1)
    """Requests in flight at once."""
    timeout_s: float = Field(120.0, gt=0)
    """Per-request timeout."""
    max_retries: int = Field(6, ge=0)
    """Retries on 429, 5xx, timeouts and connection errors (exponential backoff with jitter)."""
    temperature: float | None = Field(0.0, ge=0)
    """Sampling temperature of oracle calls; null sends none (the endpoint's default), as
    reasoning models such as the GPT-5 family accept only their default."""
    max_tokens: int = Field(4096, gt=0)
    """Max completion tokens per oracle call."""
    usd_per_million_prompt_tokens: float = Field(0.0, ge=0)
    """Price of input tokens, for the running cost in progress bars and manifests."""
    usd_per_million_completion_tokens: float = Field(0.0, ge=0)
    """Price of output tokens."""
    budget_usd: float | None = Field(None, gt=0)
    """Stop sending new requests once this much has been spent; unfinished rows stay resumable."""
    engine: EngineConfig | None = None
    """Engine settings for the `vllm` backend."""


class RewardModelConfig(StrictModel):
    """A reward model that scores traces (perceived quality)."""

    path: str
    """Hub id, local directory, or `cpu-world:<name>`."""
    revision: str | None = None
    """Hub revision (a commit sha; a branch or tag is resolved by `qup fetch` to the sha it
    downloaded and recorded in `<cache_root>/fetch_lock.json`). Unset: the default branch, as
    locked by `qup fetch`. Ignored for local folders and `cpu-world:` refs."""
    kind: Literal["qwen_math_rm", "sequence_classifier", "lm_token_logit"]
    """`qwen_math_rm`: Qwen2ForRewardModel, last token's score; `sequence_classifier`:
    AutoModelForSequenceClassification with one label (Skywork reward models);
    `lm_token_logit`: a causal LM scored by the raw logit of `token_id` at the first generated
    position (Llama-3.1-Nemotron-70B-Reward-HF, per its model card).

    Verified here on the CPU world's tiny checkpoints of each layout (vLLM against a torch
    computation of the same head). Not verified without the real weights: that vLLM picks the
    same pooler for the 72B Qwen2.5-Math-RM and the Skywork checkpoints, the chat template each
    ships, and the Nemotron card's recipe (token 0's logit) on the real 70B model."""
    token_id: int = Field(0, ge=0)
    """`lm_token_logit` only: the vocabulary id whose logit is the reward."""
    prompt: str | None = None
    """Prompt file (configs/prompts/) whose `system` message starts the conversation the reward
    model scores (Qwen2.5-Math-RM expects the CoT system prompt); None: user + assistant only."""
    engine: EngineConfig = EngineConfig()
    """vLLM engine settings (set tensor_parallel_size/num_gpus_per_actor for 72B)."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class DatasetSource(StrictModel):
    """Where a problem table comes from: the hub, a local file/folder, or the synthetic generator."""

    kind: Literal["hub", "local", "synthetic"]
    """`hub`: `datasets.load_dataset(dataset, config)`; `local`: Parquet, JSONL or a
    `save_to_disk` folder at `path`; `synthetic`: the CPU world's generator."""
    dataset: str | None = None
    """Hub dataset id (kind=hub), e.g. `AI-MO/NuminaMath-CoT`. Point it at a mirror if needed."""
    config: str | None = None
    """Hub dataset config name, e.g. `OE_TO_maths_en_COMP`."""
    revision: str | None = None
    """Hub revision of the dataset (kind=hub): a commit sha, or a branch or tag that `qup fetch`
    resolves to the sha it downloaded (`<cache_root>/fetch_lock.json`)."""
    split: str = "train"
    """Split to load."""
    path: str | None = None
    """Local file or folder (kind=local)."""
    fields: dict[str, str] = {}
    """Map from the project's field names (problem, answer, solution, source) to the dataset's."""
    num_synthetic: int = Field(200, gt=0)
    """Rows to generate (kind=synthetic)."""
    seed: int = 0
    """Generator seed (kind=synthetic); use different seeds for training problems and benchmarks."""


class ProblemsConfig(StrictModel):
    """Stage `problems`: the pool of training problems."""

    source: DatasetSource
    """The problem pool (NuminaMath-CoT in the paper)."""
    num_problems: int = Field(100_000, gt=0)
    """Seeded random sample size (not the first N)."""
    seed: int = 0
    """Sampling seed."""
    decontaminate: bool = True
    """Drop problems whose n-grams overlap a configured benchmark's problems."""
    ngram_size: int = Field(13, gt=0)
    """n of the word n-grams used for decontamination."""
    max_overlap: float = Field(0.5, ge=0, le=1)
    """Drop a problem when this fraction of its n-grams occurs in a benchmark problem."""


class RftFilterConfig(StrictModel):
    """Light filters of the SLM-RFT stream (the student's own correct traces)."""

    selection: Literal["random", "shortest", "first"] = "random"
    """Which correct trace of a problem is kept."""
    max_repeated_ngram_frac: float = Field(0.3, gt=0, le=1)
    """Drop traces where the most repeated 8-gram covers more than this fraction (degenerate loops)."""
    length_outlier_z: float = Field(4.0, gt=0)
    """Drop traces whose token count is more than this many std devs above the mean."""


class RolloutsConfig(StrictModel):
    """Stage `rollouts`: rejection sampling with every student."""

    THROUGHPUT: ClassVar[frozenset[str]] = frozenset({"shard_size"})

    num_samples_per_problem: int = Field(8, gt=0)
    """N samples per problem (8 in the paper)."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (1.0 in the paper)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling."""
    max_new_tokens: int = Field(4096, gt=0)
    """Generation limit; longer samples are truncated and filtered out of SLM-RFT."""
    seed: int = 0
    """Sampling seed: the same seed and config give the same samples."""
    shard_size: int = Field(1024, gt=0)
    """Problems per resumable shard."""
    rft: RftFilterConfig = RftFilterConfig()
    """Filters and selection for the SLM-RFT stream."""


class StreamsConfig(StrictModel):
    """Stage `streams`: the parallel data streams over the shared problem set."""

    enabled: list[Literal[STREAMS]] = list(STREAMS)  # type: ignore[valid-type]
    """Streams to build (see MISSION.md); style_aligned is built once per style oracle;
    slm_min_ppl, compat_select and reward_select are selected per problem from the student's
    correct samples and the other streams' traces, by PPL under the student or by the reward of
    the first `scoring.reward_models` entry (see `qup_ray.selection`)."""
    refine_oracle: str | None = None
    """Oracle (key of `oracles`) for oracle_refined."""
    synthesize_oracle: str | None = None
    """Oracle for oracle_synthesized."""
    style_oracles: list[str] = []
    """Oracles for style_aligned_<oracle> (GPT-5.2 and a Qwen oracle in the paper)."""
    retention_judge: str | None = None
    """Oracle that scores semantic retention (1-5) of refined and style-aligned traces."""
    num_style_exemplars: int = Field(3, ge=0)
    """Student traces shown to the style-aligned oracle as examples of the student's style."""
    keep_wrong_oracle_answers: bool = False
    """Keep oracle traces whose final answer is wrong (default: drop and count them)."""


class ScoringConfig(StrictModel):
    """Stage `score`: perplexity, reward scores and style statistics of every trace."""

    reward_models: list[str] = []
    """Reward models (keys of `reward_models`) to score with."""
    ppl_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the perplexity engines; float32 for exact agreement with transformers."""
    num_bootstrap: int = Field(1000, gt=0)
    """Bootstrap resamples for the 95% intervals in the summaries."""
    symbol_chars: str = "\\^_{}()[]=+-*/<>|$%!"
    """A token holding any of these characters (or a LaTeX command) counts as `symbol`."""
    scaffolding_words: list[str] = [
        "so", "we", "let", "first", "then", "therefore", "thus", "next", "now", "since",
        "because", "hence", "finally", "step", "this", "means", "gives", "get", "find", "need",
    ]  # fmt: skip
    """Natural-language scaffolding words (lower case) counted as `scaffolding` tokens."""


class TrainingConfig(StrictModel):
    """Stage `train`: SFT and DFT of each student on each stream (Ray Train + DeepSpeed).

    One cell per student x stream x objective x variant (the base learning rate and batch, plus
    each `robustness` entry) x seed (`seeds`), written to
    `train/<student>/<stream>/<objective>[-<variant>][-seed<N>]/`."""

    objectives: list[Literal[OBJECTIVES]] = list(OBJECTIVES)  # type: ignore[valid-type]
    """`sft`: token cross-entropy; `dft`: cross-entropy weighted by stop-grad p(target)."""
    streams: list[str] | None = None
    """Streams to train on (names as in `cfg.stream_names()`, e.g. `style_aligned_gpt52`);
    unset trains on every stream."""
    loss_normalization: Literal["token", "micro_batch", "sequence"] = "token"
    """What one optimizer step averages (see `qup_ray.losses`): `token`, the mean over every
    response token of the global batch across accumulation steps and ranks (TRL's `dft`);
    `micro_batch`, the mean of each micro-batch's token mean (the DFT authors' per-rank mean,
    averaged rather than summed); `sequence`, the mean of per-sequence token means."""
    learning_rate: float = Field(5e-5, gt=0)
    """Peak learning rate (AdamW; betas, eps and weight decay in the DeepSpeed JSON)."""
    global_batch_size: int = Field(256, gt=0)
    """Sequences per optimizer step, over all workers and accumulation steps; must be a multiple
    of `micro_batch_size_per_worker * num_workers` (the quotient is the accumulation steps)."""
    micro_batch_size_per_worker: int = Field(4, gt=0)
    """Sequences per forward pass on one worker."""
    num_epochs: float = Field(1.0, gt=0)
    """Passes over the stream (a fraction trains on the first part of the last pass)."""
    max_seq_len: int = Field(4096, gt=0)
    """Longest training sequence in tokens (prompt + response + turn end). Longer examples are
    cut to it (counted as `truncated`); an example whose prompt alone fills it is dropped
    (counted as `dropped_too_long`)."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of steps of linear warm-up."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay to zero after warm-up."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping (global L2 norm); replaces `gradient_clipping` of the DeepSpeed JSON."""
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON (relative to the repository or absolute); ZeRO stage 2 by default,
    `configs/deepspeed/zero3.json` for stage 3. `auto` values are filled from this section."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (one per GPU on a cluster)."""
    use_gpu: bool = True
    """Train on GPUs in bf16; False trains on CPU in float32 (DeepSpeed over gloo)."""
    gpus_per_worker: float = Field(1, ge=0)
    """GPUs reserved per worker when `use_gpu`."""
    cpus_per_worker: float = Field(1, gt=0)
    """CPUs reserved per worker."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (for 4096-token rows on small GPUs)."""
    checkpoint_every_steps: int = Field(50, ge=0)
    """Save a resumable checkpoint every N optimizer steps (0: only when SIGTERM/SIGUSR2 asks).
    A rerun of a killed or preempted cell resumes from its latest checkpoint."""
    max_failures: int = Field(3, ge=0)
    """Times Ray Train restarts the worker group when a worker dies (out of memory, a lost GPU,
    a drained node); the restarted workers resume from the cell's latest checkpoint."""
    checkpoint_dir: str | None = None
    """Where checkpoints go: unset puts them in the cell folder (`checkpoints/`); a path puts
    them under `<checkpoint_dir>/<experiment>/<student>/<stream>/<cell>/` (a shared
    filesystem all workers reach). Removed once the cell's model is exported."""
    tensorboard: bool = True
    """Write TensorBoard event files to the cell folder (`tensorboard/`)."""
    seed: int = 0
    """Data order and init seed of a cell (with `seeds`: the seed whose cells keep the plain
    folder names)."""
    seeds: list[NonNegativeInt] | None = Field(None, min_length=1)
    """Training seeds, a grid dimension: every student x stream x objective x variant cell is
    trained and evaluated once per seed (data order and init), and the report pools the seeds
    (Total Avg as the mean over seeds, intervals over seeds and problems). Unset: one seed,
    `seed`. The cells of `seed` keep the plain folder names (`dft`), every other seed adds
    `-seed<N>` (`dft-seed1`), so adding seeds to a finished run trains only the new cells."""
    robustness: list[dict[str, float]] = []
    """Extra (learning_rate, global_batch_size) settings run for robustness, e.g.
    `[{learning_rate: 2e-5, global_batch_size: 128}]`."""


def _training_checks(data: dict, stream_names: list[str]) -> list[str]:
    """Batch sizes that do not divide and streams that do not exist, in `training`."""
    training = data.get("training")
    if not isinstance(training, dict):
        return []
    problems: list[str] = []
    micro, workers = training.get("micro_batch_size_per_worker", 4), training.get("num_workers", 1)
    ok = isinstance(micro, int) and isinstance(workers, int) and micro > 0 and workers > 0
    batches = [("training.global_batch_size", training.get("global_batch_size", 256))]
    robustness = training.get("robustness") or []
    for i, extra in enumerate(robustness if isinstance(robustness, list) else []):
        if isinstance(extra, dict) and "global_batch_size" in extra:
            batches.append(
                (f"training.robustness.{i}.global_batch_size", extra["global_batch_size"])
            )
    for path, batch in batches if ok else []:
        if not isinstance(batch, int | float) or batch != int(batch):
            problems.append(f"{path}: must be a whole number of sequences (got {batch!r})")
        elif int(batch) % (micro * workers):
            problems.append(
                f"{path}: must be a multiple of micro_batch_size_per_worker x num_workers = "
                f"{micro} x {workers} = {micro * workers} (got {batch})"
            )
    seeds = training.get("seeds")
    if isinstance(seeds, list):
        repeated = sorted({s for s in seeds if isinstance(s, int) and seeds.count(s) > 1})
        if repeated:
            problems.append(f"training.seeds: seeds repeated {repeated} (got {seeds})")
    wanted = training.get("streams")
    for i, name in enumerate(wanted if isinstance(wanted, list) else []):
        if name not in stream_names:
            problems.append(
                f"training.streams.{i}: not a stream of this experiment {stream_names} (got {name!r})"
            )
    return problems


class BenchmarkConfig(StrictModel):
    """One evaluation benchmark."""

    source: DatasetSource
    """Where the benchmark's rows come from; `fields` maps problem/answer to its columns."""


class EvaluationConfig(StrictModel):
    """Stage `eval`: Avg@k, pass@k and maj@k of every trained model and every base student on
    every benchmark (`qup_ray.metrics`), k samples per problem with the student's prompt."""

    THROUGHPUT: ClassVar[frozenset[str]] = frozenset({"shard_size", "max_parallel_models"})

    benchmarks: dict[str, BenchmarkConfig]
    """Benchmarks by name (MATH500, AIME24, AMC23, Minerva Math, OlympiadBench in the paper);
    the name is the per-sample table's file name, `eval/<cell>/<benchmark>.parquet`."""
    num_samples: int = Field(16, gt=0)
    """k of Avg@k: samples per problem (16 in the paper). pass@k is reported for k in 1, 2, 4,
    8, 16 up to this."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (1.0 in the paper)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling."""
    max_new_tokens: int = Field(4096, gt=0)
    """Generation limit (4096 in the paper), lowered per request where prompt + generation
    would exceed the engine's context; samples cut at it count in `truncation_rate`."""
    seed: int = 0
    """Sampling seed: a problem's samples are seeded by (seed, benchmark, problem id), the same
    for every model, so models are compared on the same random draws."""
    max_problems_per_benchmark: int | None = Field(None, gt=0)
    """Cap for quick checks: the first N problems of each benchmark; unset evaluates every
    problem."""
    evaluate_base: bool = True
    """Also evaluate every base (untrained) student: the reference cell `<student>/base/base`."""
    shard_size: int = Field(256, gt=0)
    """Problems per resumable shard of one (model, benchmark) unit."""
    max_parallel_models: int | None = Field(None, ge=1)
    """Models evaluated side by side in one job, each on its own engine actors. Unset: as many
    as the cluster's GPUs hold; always one on CPU."""


class GradingConfig(StrictModel):
    """The answer checker shared by every stage."""

    THROUGHPUT: ClassVar[frozenset[str]] = frozenset({"num_workers"})

    timeout_s: float = Field(5.0, gt=0)
    """Time bound of one answer check; a check that runs longer is status=timeout."""
    lenient: bool = False
    """Also accept "the answer is X" / the last number when no \\boxed{} is present (recorded)."""
    num_workers: int | None = Field(None, ge=1)
    """Grading processes; unset means one per CPU."""


class ReportConfig(StrictModel):
    """Stage `report`: the paper's tables, rank correlations with bootstrap intervals, plots."""

    num_bootstrap: int = Field(1000, gt=0)
    """Bootstrap resamples behind every interval of the report."""
    seed: int = 0
    """Bootstrap seed: the same seed and inputs give the same intervals."""
    confidence_level: float = Field(0.95, gt=0, lt=1)
    """Level of the percentile bootstrap intervals."""


class RayConfig(StrictModel):
    """How the suite connects to (or starts) a Ray cluster."""

    address: str | None = None
    """Cluster address; unset uses `RAY_ADDRESS` or starts a local cluster."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local cluster (unset: all)."""
    object_store_memory_gb: float | None = Field(None, gt=0)
    """Object store size; set it inside SLURM allocations (Ray sees the whole node)."""
    dashboard_host: str = "127.0.0.1"
    """Where the dashboard binds; reach it with `ssh -L` (the job log prints the command)."""
    include_dashboard: bool = True
    """Start the dashboard with a local cluster."""
    node_ip_address: str = "127.0.0.1"
    """Address every service of a local cluster (GCS, raylet, object manager, workers, dashboard
    agent, metrics) binds to. 127.0.0.1 keeps them off the network, so other users of a shared
    node cannot reach them; name this node's interface address only when other machines must
    join. (Clusters the grid starts over SLURM nodes bind to the node's interface on purpose.)"""


class StageResources(StrictModel):
    """Per-stage resources that differ from the cluster defaults (one job of that stage)."""

    nodes: int = Field(1, ge=1)
    """Nodes of the job (Ray head on the first, workers on the rest)."""
    gpus_per_node: int | None = Field(None, ge=0)
    """GPUs per node; unset uses the cluster default."""
    cpus_per_node: int | None = Field(None, ge=1)
    """CPUs per node; unset uses the cluster default."""
    mem_gb: float | None = Field(None, gt=0)
    """Memory per node; unset uses the cluster default."""
    timeout_min: int | None = Field(None, gt=0)
    """Wall-clock limit; unset uses the cluster default."""


class EstimateConfig(StrictModel):
    """What `qup grid --plan` turns into GPU-hours. Measured throughputs win over the defaults
    here: `qup bench` JSON files first, then earlier runs' manifests; the plan says which."""

    bench_json: list[str] = []
    """Files holding `qup bench NAME --json` lines measured on this cluster's GPUs
    (`rollouts`: generated tokens/s, `ppl`: scored tokens/s; divided by the bench's actors,
    one GPU per actor)."""
    calibration_runs: list[str] = []
    """Run directories of earlier grid runs on this cluster: finished stages' manifests
    (duration, rows, tokens) and the GPUs their jobs held (`grid/jobs.json`)."""
    generate_tokens_per_gpu_s: float = Field(2500.0, gt=0)
    """Default: tokens/s one GPU generates with a 1.5B student in vLLM (rollouts, eval)."""
    oracle_tokens_per_gpu_s: float = Field(150.0, gt=0)
    """Default: tokens/s per GPU of a tensor-parallel open oracle engine (a 72B model)."""
    score_tokens_per_gpu_s: float = Field(20000.0, gt=0)
    """Default: prompt tokens/s one GPU scores (perplexity, reward) for a small model; a
    model spanning `tensor_parallel_size` GPUs counts that many times."""
    train_tokens_per_gpu_s: float = Field(6000.0, gt=0)
    """Default: training tokens/s per GPU (forward + backward, DeepSpeed ZeRO-2, 1.5B)."""
    mean_sample_tokens: int = Field(700, gt=0)
    """Default: tokens of one generated sample or trace (prompt tokens are small beside it)."""
    problem_set_fraction: float = Field(0.34, gt=0, le=1)
    """Default: fraction of problems the anchor student solves (34k of 100k in the paper)."""
    problems_per_benchmark: int = Field(300, gt=0)
    """Default: problems of a benchmark when `evaluation.max_problems_per_benchmark` is unset
    (MATH500 500, AIME24 30, AMC23 40, Minerva 272, OlympiadBench 675: about 300 on average)."""


class ClusterConfig(StrictModel):
    """One cluster's specifics (the file passed with `--cluster`). Nothing cluster-specific lives
    in Python or in sbatch templates."""

    executor: Literal["slurm", "local", "debug"] = "slurm"
    """`slurm` submits through submitit; `local` runs the same jobs and dependencies on this
    machine, one at a time, through submitit's local executor; `debug` runs them in this
    process (submitit's debug executor, for a debugger)."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    qos: str | None = None
    """SLURM QOS."""
    constraint: str | None = None
    """SLURM node feature constraint, e.g. `a100|h100`."""
    gpus_per_node: int = Field(8, ge=0)
    """GPUs of one node, and what a job gets unless its stage says otherwise."""
    cpus_per_node: int = Field(32, ge=1)
    """CPUs a job gets per node unless its stage says otherwise."""
    mem_gb: float = Field(256, gt=0)
    """Memory a job gets per node unless its stage says otherwise."""
    timeout_min: int = Field(1440, gt=0)
    """Default wall-clock limit; jobs that hit it requeue and resume."""
    max_requeues: int = Field(3, ge=0)
    """How often a preempted or timed-out job is requeued."""
    signal_delay_s: int = Field(90, ge=10)
    """Seconds before the time limit at which SLURM sends USR2, so the job checkpoints and
    requeues itself (SLURM may send it up to 60 s early)."""
    setup: list[str] = []
    """Shell lines run at the start of every job (module load, venv activation)."""
    log_dir: str = "slurm_logs"
    """submitit logs and pickles, relative to the run directory."""
    sbatch_extra: dict[str, str | int] = {}
    """Extra `#SBATCH` options (e.g. `exclude: node13`, `mail-type: FAIL`)."""
    env: dict[str, str] = {}
    """Environment variables set in every job (never secrets: those come from your shell)."""
    ray_port_range: tuple[int, int] = (20000, 60000)
    """Ports a job's Ray cluster may use. Each job takes a free block of `ray_port_block`
    ports (GCS, raylet, object manager, dashboard and its agent, metrics, runtime env,
    client server, workers), so several jobs share a node without meeting."""
    ray_port_block: int = Field(200, ge=32)
    """Ports per job; all but the first 16 are Ray worker ports (one per worker process)."""
    ray_temp_root: str = "/tmp"
    """Where a job's Ray temp dir `qup-ray-<job id>` goes: keep it short, Ray's Unix sockets
    fail on paths over 107 bytes (SLURM's per-job tmpdirs are often longer)."""
    object_store_fraction: float = Field(0.3, gt=0, lt=1)
    """Share of a job's memory given to Ray's object store (Ray otherwise sizes it from the
    whole node's memory, not the allocation)."""
    dashboard_host: str = "127.0.0.1"
    """Where each job's Ray dashboard binds. Keep 127.0.0.1: the dashboard runs code for anyone
    who reaches it; the job log prints the `ssh -L` line to reach it."""
    stages: dict[str, StageResources] = {}
    """Resource overrides by stage name (problems, rollouts, streams, score, train, eval, report)."""
    split_cells: bool = True
    """One job per training and per evaluation cell (arrays on SLURM). False: one train job and
    one eval job over all cells, which saves Ray and engine start-ups on one machine (the dry
    run's `local.yaml`)."""
    estimate: EstimateConfig = EstimateConfig()
    """Throughputs behind the GPU-hour estimate of `qup grid --plan`."""


class ExperimentConfig(StrictModel):
    """A whole experiment: data, students, oracles, scoring, training, evaluation."""

    THROUGHPUT: ClassVar[frozenset[str]] = frozenset({"cache_dir"})

    experiment: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Name; the run directory is `<output_dir>/<experiment>/`."""
    output_dir: str = "runs"
    """Parent of run directories."""
    cache_dir: str | None = None
    """Cache root of a run: vLLM and compile caches, the fetch lock, the CPU world's models.
    Unset: `$QUP_CACHE_DIR`, else `~/.cache/qup_ray`. On a cluster, a shared filesystem every
    node reaches. Changes no result, so it is not hashed."""
    seed: int = 0
    """Global seed for anything not seeded by its own section."""
    problems: ProblemsConfig
    students: dict[str, ModelConfig]
    """Target small models by name (the grid's model axis)."""
    anchor_student: str
    """Student whose solved problems define the shared problem set."""
    rollouts: RolloutsConfig = RolloutsConfig()
    oracles: dict[str, OracleConfig] = {}
    """Oracles by name, referenced from `streams`."""
    streams: StreamsConfig = StreamsConfig()
    reward_models: dict[str, RewardModelConfig] = {}
    """Reward models by name, referenced from `scoring.reward_models`."""
    scoring: ScoringConfig = ScoringConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig
    grading: GradingConfig = GradingConfig()
    report: ReportConfig = ReportConfig()
    """Bootstrap settings of the report's intervals."""
    ray: RayConfig = RayConfig()
    cpu_world: CpuWorldSettings = CpuWorldSettings()
    """Tiny models and synthetic data used by `cpu-world:` refs (dry runs, tests)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.experiment

    def cache_root(self) -> Path:
        """The one cache location of a run: `cache_dir`, else `$QUP_CACHE_DIR`, else
        `~/.cache/qup_ray`. Every engine, stage and the CPU world's build take it from here."""
        return default_cache_root(self.cache_dir)

    def stream_names(self) -> list[str]:
        """Streams a student gets, with style_aligned expanded per style oracle."""
        names: list[str] = []
        for stream in self.streams.enabled:
            if stream == "style_aligned":
                names += [f"style_aligned_{o}" for o in self.streams.style_oracles]
            else:
                names.append(stream)
        return names

    def results_hash(self) -> str:
        """`section_hash` of every section that changes results (all but `ray` and
        `output_dir`); the run directory keeps the one its outputs were made with."""
        return self.section_hash(*[k for k in result_view(self) if k not in NOT_RESULTS])

    def uses_cpu_world(self) -> bool:
        """Whether a student or reward model is a `cpu-world:` ref or an oracle the rule oracle."""
        models = [*self.students.values(), *self.reward_models.values()]
        return any(m.path.startswith("cpu-world:") for m in models) or any(
            o.backend == "rule" for o in self.oracles.values()
        )

    def section_hash(self, *keys: str) -> str:
        """Stable hash of some top-level sections without their throughput fields
        (`result_view`): what a stage's manifest compares on rerun. A run on the CPU world
        hashes `cpu_world` by the world's content hash, so a change to the code that builds
        it reruns what used it, not only a change of its settings."""
        data = result_view(self)
        wants_world = not keys or "cpu_world" in keys  # the content hash reads files: only then
        if wants_world and "cpu_world" in data and self.uses_cpu_world():
            data["cpu_world"] = cpu_world_identity(self.cpu_world)
        picked = {k: data[k] for k in keys} if keys else data
        blob = json.dumps(picked, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cross_checks(data: dict) -> list[str]:
    """References between sections that pydantic cannot check field by field.

    Works on the raw (possibly invalid) data, so these problems are reported together with the
    field errors instead of after they are fixed."""

    def section(key: str) -> dict:
        value = data.get(key)
        return value if isinstance(value, dict) else {}

    problems: list[str] = []
    students, oracles, rms = section("students"), section("oracles"), section("reward_models")
    streams, scoring = section("streams"), section("scoring")
    enabled = streams.get("enabled", list(STREAMS))
    enabled = enabled if isinstance(enabled, list) else []

    def check_ref(path: str, name: object, known: dict, what: str) -> None:
        if name is not None and name not in known:
            problems.append(f"{path}: not one of {what} {sorted(known)} (got {name!r})")

    if "anchor_student" in data:
        check_ref("anchor_student", data["anchor_student"], students, "students")
    for key, stream in [
        ("refine_oracle", "oracle_refined"),
        ("synthesize_oracle", "oracle_synthesized"),
    ]:
        if streams.get(key) is None and stream in enabled:
            problems.append(
                f"streams.{key}: required because stream {stream!r} is enabled (got None)"
            )
        check_ref(f"streams.{key}", streams.get(key), oracles, "oracles")
    check_ref("streams.retention_judge", streams.get("retention_judge"), oracles, "oracles")
    style_oracles = streams.get("style_oracles") or []
    for i, name in enumerate(style_oracles if isinstance(style_oracles, list) else []):
        check_ref(f"streams.style_oracles.{i}", name, oracles, "oracles")
    if "style_aligned" in enabled and not style_oracles:
        problems.append(
            "streams.style_oracles: empty but stream 'style_aligned' is enabled (got [])"
        )
    scored = scoring.get("reward_models") or []
    if "reward_select" in enabled and not scored:
        problems.append(
            "scoring.reward_models: empty but stream 'reward_select' is enabled (got [])"
        )
    for i, name in enumerate(scored if isinstance(scored, list) else []):
        check_ref(f"scoring.reward_models.{i}", name, rms, "reward_models")
    for name, model in students.items():
        prompt = model.get("prompt") if isinstance(model, dict) else None
        if isinstance(prompt, str) and not (CONFIGS_DIR / "prompts" / f"{prompt}.yaml").is_file():
            problems.append(
                f"students.{name}.prompt: no file configs/prompts/{prompt}.yaml (got {prompt!r})"
            )
    for name, oracle in oracles.items():
        if not isinstance(oracle, dict):
            continue
        if oracle.get("backend") == "openai" and not oracle.get("base_url"):
            problems.append(f"oracles.{name}.base_url: required for backend 'openai' (got None)")
        if oracle.get("backend") == "vllm" and not oracle.get("engine"):
            problems.append(f"oracles.{name}.engine: required for backend 'vllm' (got None)")
    robustness = section("training").get("robustness") or []
    for i, extra in enumerate(robustness if isinstance(robustness, list) else []):
        unknown = (
            set(extra) - {"learning_rate", "global_batch_size"}
            if isinstance(extra, dict)
            else set()
        )
        if unknown:
            problems.append(
                f"training.robustness.{i}: unknown keys {sorted(unknown)} (got {extra})"
            )
    style_names = [f"style_aligned_{o}" for o in style_oracles if isinstance(o, str)]
    stream_names = [s for s in enabled if s != "style_aligned"]
    stream_names += style_names if "style_aligned" in enabled else []
    problems += _training_checks(data, stream_names)
    return problems


def _cluster_checks(data: dict) -> list[str]:
    """What a cluster YAML's fields cannot check alone: stage names, jobs that fit a node."""
    from qup_ray.stages import STAGE_ORDER

    problems: list[str] = []
    node_gpus = data.get("gpus_per_node", ClusterConfig.model_fields["gpus_per_node"].default)
    stages = data.get("stages")
    for name, res in (stages if isinstance(stages, dict) else {}).items():
        if name not in ("fetch", *STAGE_ORDER):  # fetch: the grid's download job
            problems.append(
                f"stages.{name}: not a stage; one of fetch, {', '.join(STAGE_ORDER)} (got {name!r})"
            )
        if not isinstance(res, dict):
            continue
        gpus = res.get("gpus_per_node")
        if isinstance(gpus, int) and isinstance(node_gpus, int) and gpus > node_gpus:
            problems.append(
                f"stages.{name}.gpus_per_node: more GPUs per job node than a node has "
                f"(gpus_per_node: {node_gpus}) (got {gpus})"
            )
        nodes = res.get("nodes", 1)
        if data.get("executor") in ("local", "debug") and isinstance(nodes, int) and nodes > 1:
            problems.append(
                f"stages.{name}.nodes: executor {data['executor']!r} runs one node (got {nodes})"
            )
    ports = data.get("ray_port_range")
    if (
        isinstance(ports, list | tuple)
        and len(ports) == 2
        and all(isinstance(p, int) for p in ports)
    ):
        block = data.get("ray_port_block", ClusterConfig.model_fields["ray_port_block"].default)
        low, high = ports
        if not (low >= 1024 and high <= 65535 and isinstance(block, int) and high - low >= block):
            problems.append(
                f"ray_port_range: needs 1024 <= low, high <= 65535 and room for one block of "
                f"{block} ports (got {list(ports)})"
            )
    return problems


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors(include_url=False):
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            problems.append(f"{path}: required key is missing")
            continue
        else:
            msg = e["msg"]
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
        if len(shown) > 80:
            shown = shown[:77] + "..."
        problems.append(f"{path}: {msg} (got {shown})")
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 3 is an int and [1,2] a list)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key.sub=value")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> list[str]:
    """Set each `key.sub=value` in `data` in place; returns the problems found."""
    problems = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ValueError as e:
            problems.append(str(e))
            continue
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return problems


def load_yaml(path: str | Path) -> dict:
    """Read one YAML mapping, or raise ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], source=str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [f"<root>: expected a mapping (got {type(data).__name__})"], source=str(path)
        )
    return data


M = TypeVar("M", bound=BaseModel)


def validate_data(
    model: type[M], data: dict, source: str, overrides: list[str] | tuple[str, ...] = ()
) -> M:
    """Apply overrides and validate `data` against `model`; every problem in one ConfigError."""
    data = json.loads(json.dumps(data))  # deep copy; YAML may share nodes through anchors
    problems = apply_overrides(data, list(overrides))
    cfg = None
    try:
        cfg = model.model_validate(data)
    except ValidationError as e:
        problems += _format_validation_error(e)
    if model is ExperimentConfig:
        from qup_ray.models import context_problems

        problems += _cross_checks(data) + context_problems(data)
    if model is ClusterConfig:
        problems += _cluster_checks(data)
    if problems or cfg is None:
        raise ConfigError(problems, source=source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load and validate an experiment YAML with `key.sub=value` overrides."""
    return validate_data(ExperimentConfig, load_yaml(path), str(path), overrides)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML. No secret can appear: configs hold only env-var *names*."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def load_cluster_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> ClusterConfig:
    """Load and validate a cluster YAML (`configs/clusters/*.yaml`)."""
    return validate_data(ClusterConfig, load_yaml(path), str(path), overrides)
