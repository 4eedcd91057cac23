"""The grid on SLURM: plan the jobs, submit them through submitit, run each as its own Ray cluster.

    plan.py      the config as jobs (resources, dependencies, GPU-hour estimate)
    submit.py    submitit executors, arrays, afterok dependencies, `<run>/grid/`
    job.py       what a job runs: its own Ray cluster, then `run_stage`
    ray_cluster.py  per-job Ray: ports, short temp dir, start and stop only its own processes

Only this package imports submitit or talks to SLURM; the stages never do.
"""

from qup_ray.grid.plan import GridPlan, Job, format_plan, plan_grid
from qup_ray.grid.submit import GridResult, job_states, launch

__all__ = ["GridPlan", "GridResult", "Job", "format_plan", "job_states", "launch", "plan_grid"]
