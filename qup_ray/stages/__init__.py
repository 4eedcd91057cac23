"""The pipeline's stages, in order. Each is one module with `run(cfg, *, force=False) -> Path`.

A stage reads its inputs from the run directory and writes its outputs there (see
`qup_ray.rundir`); stages never call each other. The CLI, the dry run and the SLURM grid all go
through `run_stage`, so the same code runs on a laptop and on a cluster.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path

from qup_ray.config import ExperimentConfig

logger = logging.getLogger(__name__)

STAGE_ORDER = ("problems", "rollouts", "streams", "score", "train", "eval", "report")


class StageNotBuilt(Exception):
    """The stage's module does not exist yet in this version of qup_ray."""


def module_name(stage: str) -> str:
    return f"qup_ray.stages.{stage}"


def is_built(stage: str) -> bool:
    """True when the stage's module is part of this installation."""
    return importlib.util.find_spec(module_name(stage)) is not None


def run_stage(
    stage: str, cfg: ExperimentConfig, *, force: bool = False, cells: list[str] | None = None
) -> Path:
    """Run one stage on `cfg`; skipped inside the stage when its manifest is up to date.

    `cells` ("student/stream/objective" ids) restricts the train and eval stages to those cells,
    which is how the SLURM grid runs one job per cell; other stages take no cells."""
    if stage not in STAGE_ORDER:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_ORDER)}")
    if not is_built(stage):
        raise StageNotBuilt(f"stage {stage!r} is not built yet in this version of qup_ray")
    module = importlib.import_module(module_name(stage))
    logger.info("stage %s: starting", stage)
    out = (
        module.run(cfg, force=force, cells=cells)
        if cells is not None
        else module.run(cfg, force=force)
    )
    logger.info("stage %s: outputs in %s", stage, out)
    return out
