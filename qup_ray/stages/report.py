"""Stage `report`: the paper's analysis of a run directory, in `report/`.

    qup run report -c configs/paper.yaml     (or: qup report runs/qup-paper)

Reads whatever finished: scores (reward, PPL, style, retention per trace), training metrics and
per-sample evaluation rows, and writes report.md, a self-contained report.html, CSV tables
(correlations.csv, quality_*, accuracy_*, verdict.csv, missing.csv) and PNG plots. A partial run
gives a partial report: absent cells keep their rows, empty, and `missing.csv` lists them. The
report reruns when any input stage finishes anew (its manifest is among the inputs).
"""

from __future__ import annotations

import logging
from pathlib import Path

from qup_ray.config import ExperimentConfig
from qup_ray.report import BootstrapSettings, build_report, from_run_dir
from qup_ray.rundir import MANIFEST, Stage, StageError

logger = logging.getLogger(__name__)


def _finished_inputs(root: Path) -> list[Path]:
    """Every finished stage folder the report reads: scores, streams/final, train cells, eval
    cells and their (model, benchmark) units."""
    patterns = ("scores/*/*", "streams/*/final", "train/*/*/*", "eval/*/*/*", "eval/*/*/*/*")
    found = {p.parent for pattern in patterns for p in root.glob(f"{pattern}/{MANIFEST}")}
    return sorted(found)


def report_run_dir(cfg: ExperimentConfig, root: Path, *, force: bool = False) -> Path:
    """Write `<root>/report/` for the run directory `root` of `cfg` (which may have moved)."""
    root = Path(root)
    inputs = _finished_inputs(root)
    if not any(p.relative_to(root).parts[0] in ("scores", "eval") for p in inputs):
        raise StageError(f"{root}: nothing to report yet (no finished scores or evaluations)")
    config_hash = cfg.section_hash(
        "report", "students", "streams", "scoring", "training", "evaluation"
    )
    stage = Stage(root / "report", config_hash, inputs=inputs, force=force)
    if stage.is_done():
        return stage.dir
    settings = BootstrapSettings(
        num_resamples=cfg.report.num_bootstrap,
        seed=cfg.report.seed,
        level=cfg.report.confidence_level,
    )
    with stage.running():
        with stage.timed("collect"):
            data = from_run_dir(cfg, root)
        with stage.timed("analyse_and_render"):
            counts = build_report(data, stage.dir, settings)
        if data.missing:
            logger.warning(
                "report: %d expected inputs missing (see %s)",
                len(data.missing),
                stage.dir / "missing.csv",
            )
        stage.finish(row_counts=counts)
    return stage.dir


def run(cfg: ExperimentConfig, *, force: bool = False, cells: list[str] | None = None) -> Path:
    """The report of `cfg`'s run directory; `cells` is ignored (the report covers every cell)."""
    return report_run_dir(cfg, cfg.run_dir, force=force)
