"""Build (or find in the cache) the CPU world: tokenizers, three tiny students, two reward models.

One byte-level BPE vocabulary, saved in three real families' tokenizer layouts (Qwen2.5-Math
base, Llama-3, DeepSeek-R1-Distill; see ``tokenizer``). Each model uses one layout
(``MODEL_LAYOUTS``): ``tiny-qwen2`` (Qwen2 architecture, Qwen layout), ``tiny-llama`` (Llama
architecture, Llama-3 layout), ``tiny-deepseek`` (Qwen2 architecture, DeepSeek layout, continued
from ``tiny-qwen2``'s weights), and the reward models those of their backbone's student.

The build lives in ``<cache root>/cpu_world/<hash>/`` where ``<hash>`` covers the settings (all
but ``cache_dir``), the source of the modules that make the models, and the versions of torch,
transformers and tokenizers: change any of them and the world is rebuilt, keep them and a
second call returns the cached directories at once. A build is written under a temporary
name and renamed when complete, under a file lock, so two processes never build the same world
and nobody ever sees half a world.

``resolve_model_ref("cpu-world:tiny-qwen2")`` returns a model directory usable by transformers
and vLLM; any other reference (a hub id, a local path) is returned unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

from qup_ray.cpu_world.settings import CpuWorldSettings

logger = logging.getLogger(__name__)

REF_PREFIX = "cpu-world:"


class _Student(NamedTuple):
    arch: str  # "qwen2" | "llama"
    layout: str  # a key of tokenizer.LAYOUTS
    settings_field: str  # the CpuWorldSettings field with its training budget
    init_from: str | None  # the student whose trained weights it starts from


STUDENTS = {
    "tiny-qwen2": _Student("qwen2", "qwen2.5", "qwen2", None),
    "tiny-llama": _Student("llama", "llama3", "llama", None),
    "tiny-deepseek": _Student("qwen2", "deepseek", "deepseek", "tiny-qwen2"),
}
# Reward model -> (checkpoint layout, the student whose backbone and tokenizer it uses).
REWARD_MODELS = {
    "tiny-qwen-rm": ("qwen-rm", "tiny-qwen2"),
    "tiny-llama-rm": ("llama-rm", "tiny-llama"),
}
MODEL_NAMES = (*STUDENTS, *REWARD_MODELS)
# The tokenizer layout (family) of every CPU-world model.
MODEL_LAYOUTS = {name: s.layout for name, s in STUDENTS.items()} | {
    name: STUDENTS[student].layout for name, (_, student) in REWARD_MODELS.items()
}
REPORT_FILE = "build_report.json"
# The modules whose code decides what gets built; editing one of them invalidates the cache.
_BUILD_MODULES = (
    "settings",
    "synthetic",
    "tokenizer",
    "students",
    "reward_models",
    "boxed",
    "build",
)
_VERSIONED_PACKAGES = ("torch", "transformers", "tokenizers")


def world_hash(settings: CpuWorldSettings) -> str:
    """Content hash of everything that determines the built models (16 hex digits)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings.hashed_fields(), sort_keys=True).encode())
    here = Path(__file__).parent
    for name in _BUILD_MODULES:
        digest.update(name.encode() + b"\0" + (here / f"{name}.py").read_bytes())
    for package in _VERSIONED_PACKAGES:
        digest.update(f"{package}=={metadata.version(package)}".encode())
    return digest.hexdigest()[:16]


def world_dir(settings: CpuWorldSettings) -> Path:
    """Where the world of ``settings`` is (or will be) cached."""
    return settings.cache_root() / "cpu_world" / world_hash(settings)


def _paths(root: Path) -> dict[str, Path]:
    return {name: root / name for name in MODEL_NAMES}


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_cpu_world(
    settings: CpuWorldSettings | None = None, force: bool = False
) -> dict[str, Path]:
    """The CPU world's model directories by name, building them first if they are not cached."""
    settings = settings or CpuWorldSettings()
    target = world_dir(settings)
    if not force and (target / REPORT_FILE).exists():
        return _paths(target)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if not force and (target / REPORT_FILE).exists():
            logger.info("CPU world %s was built by another process meanwhile", target.name)
            return _paths(target)
        # Holding the lock, no one else builds this world: temp dirs left are from crashed builds.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        logger.info("building the CPU world into %s (a few minutes on 2 cores)", target)
        try:
            _build_in_subprocess(tmp, settings)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: readers see no world or a whole one
    return _paths(target)


def _build_in_subprocess(root: Path, settings: CpuWorldSettings) -> None:
    """Run ``_build_into`` in a fresh Python process.

    The child imports torch with ``OMP_WAIT_POLICY=PASSIVE``: on a busy shared machine, OpenMP
    threads that spin while waiting made a training step 10-15 times slower (measured: 2.9 s
    instead of 0.2 s). A child also keeps training's seeds, thread settings and memory out of the
    caller's process, and its stray prints (DeepSpeed's accelerator notice on
    ``save_pretrained``) out of the caller's stdout, which may carry a result such as the JSON
    of ``qup cpu-world build``: the child writes its stdout to stderr.
    """
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    child = "import sys; from qup_ray.cpu_world.build import _child_main; _child_main(sys.argv[1:])"
    command = [sys.executable, "-c", child, str(root), settings.model_dump_json()]
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"building the CPU world failed (exit code {result.returncode}); see the log above"
        )


def _build_into(root: Path, settings: CpuWorldSettings) -> None:
    """Build everything into ``root`` (a temporary directory named ``.<hash>.tmp-<pid>``)."""
    # Heavy imports stay here so that resolving a cached reference never loads torch.
    from transformers import AutoTokenizer

    from qup_ray.cpu_world.reward_models import build_reward_model
    from qup_ray.cpu_world.students import training_problems
    from qup_ray.cpu_world.tokenizer import (
        COT_INSTRUCTION,
        LAYOUTS,
        as_layout,
        save_tokenizer,
        train_tokenizer,
    )

    started = time.perf_counter()
    root.mkdir(parents=True)
    report: dict = {
        "hash": world_hash(settings),
        "settings": settings.hashed_fields(),
        "timings_s": {},
    }

    t0 = time.perf_counter()
    texts = [f"system\n{COT_INSTRUCTION}"]
    for p in training_problems(settings):
        texts += [f"user\n{p.problem}", f"assistant\n{p.native}", p.compact, p.reference]
    bpe = train_tokenizer(texts, settings.vocab_size)
    for name, layout in LAYOUTS.items():
        save_tokenizer(as_layout(bpe, layout), root / "tokenizers" / name)
    report["timings_s"]["tokenizer"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    report["students"] = _train_students_in_parallel(root, settings)
    report["timings_s"]["students"] = round(time.perf_counter() - t0, 1)

    report["reward_models"] = {}
    for name, (layout, student) in REWARD_MODELS.items():
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(root / student))
        report["reward_models"][name] = build_reward_model(
            layout, root / student, tokenizer, settings, root / name
        )
        report["timings_s"][name] = round(time.perf_counter() - t0, 1)

    report["timings_s"]["total"] = round(time.perf_counter() - started, 1)
    report["versions"] = {p: metadata.version(p) for p in _VERSIONED_PACKAGES}
    # Written last: its presence marks a complete build.
    (root / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("CPU world built in %.0f s: %s", report["timings_s"]["total"], report["students"])


def _train_students_in_parallel(root: Path, settings: CpuWorldSettings) -> dict[str, dict]:
    """Train the students at the same time, one process each, the cores split between them; a
    student that starts from another's weights starts when that one is done.

    On 2 cores two single-threaded trainings finish sooner than two two-threaded ones in turn
    (these small matrices scale poorly across threads), and they do not suffer when another
    process takes a core.
    """
    cpus = len(os.sched_getaffinity(0))
    fresh = [name for name, s in STUDENTS.items() if s.init_from is None]
    workers = max(1, min(len(fresh), cpus))
    threads = max(1, cpus // workers)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
    reports: dict[str, dict] = {}
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:

        def submit(name: str) -> Future:
            return pool.submit(_train_student_job, name, settings.model_dump_json(), str(root))

        jobs = {name: submit(name) for name in fresh}
        while jobs:
            done, _ = wait(jobs.values(), return_when=FIRST_COMPLETED)
            for name in [n for n, job in jobs.items() if job in done]:
                reports[name] = jobs.pop(name).result()
                jobs |= {n: submit(n) for n, s in STUDENTS.items() if s.init_from == name}
    return {name: reports[name] for name in STUDENTS}


def _init_worker(num_threads: int) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(num_threads)


def _train_student_job(name: str, settings_json: str, root: str) -> dict:
    from transformers import AutoTokenizer

    from qup_ray.cpu_world.students import train_student
    from qup_ray.cpu_world.tokenizer import LAYOUTS

    settings = CpuWorldSettings.model_validate_json(settings_json)
    spec = STUDENTS[name]
    tokenizer = AutoTokenizer.from_pretrained(str(Path(root) / "tokenizers" / spec.layout))
    return train_student(
        name,
        spec.arch,  # type: ignore[arg-type]
        LAYOUTS[spec.layout],  # type: ignore[index]
        getattr(settings, spec.settings_field),
        settings,
        tokenizer,
        Path(root) / name,
        init_dir=None if spec.init_from is None else Path(root) / spec.init_from,
    )


def is_cpu_world_ref(ref: str) -> bool:
    """Whether ``ref`` names a CPU-world model (``cpu-world:<name>``)."""
    return ref.startswith(REF_PREFIX)


def resolve_model_ref(ref: str, settings: CpuWorldSettings | None = None) -> str:
    """A local directory for ``cpu-world:<name>`` (building the world if needed), else ``ref``.

    Names: ``tiny-qwen2``, ``tiny-llama``, ``tiny-deepseek`` (students), ``tiny-qwen-rm``,
    ``tiny-llama-rm`` (reward models); ``MODEL_LAYOUTS`` gives each one's tokenizer layout. Hub ids and local paths pass through unchanged.
    """
    if not is_cpu_world_ref(ref):
        return ref
    name = ref[len(REF_PREFIX) :]
    if name not in MODEL_NAMES:
        raise ValueError(
            f"unknown CPU-world model {ref!r}; known: {[REF_PREFIX + n for n in MODEL_NAMES]}"
        )
    return str(build_cpu_world(settings)[name])


def read_build_report(settings: CpuWorldSettings | None = None) -> dict:
    """The build report (timings, students' held-out pass@8) of the world of ``settings``."""
    root = build_cpu_world(settings)[MODEL_NAMES[0]].parent
    return json.loads((root / REPORT_FILE).read_text())


def _child_main(argv: list[str]) -> None:
    """Entry of the build child started by ``_build_in_subprocess``: ``ROOT SETTINGS_JSON``."""
    os.dup2(2, 1)  # stdout to stderr, for this process and the training workers it starts
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _build_into(Path(argv[0]), CpuWorldSettings.model_validate_json(argv[1]))
