"""The paper's analysis from a run directory (or a table of per-stream numbers).

    qup report RUN_DIR                       # or: qup run report -c CONFIG
    qup report --from-table paper.csv --out report/

Modules: `collect` (what is read, what is missing), `correlation` (rank correlations and their
bootstrap intervals: the math, pure and written once), `analysis` (tables), `verdict` (the
paper's claims checked in plain words), `plots` (matplotlib figures), `render` (markdown and
self-contained HTML), `build` (writes the report folder).
"""

from qup_ray.report.analysis import BootstrapSettings
from qup_ray.report.build import build_report
from qup_ray.report.collect import ReportData, from_run_dir, from_table

__all__ = ["BootstrapSettings", "ReportData", "build_report", "from_run_dir", "from_table"]
