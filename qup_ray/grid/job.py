"""What one grid job runs: a Ray cluster over its allocation, the stage, then Ray torn down.
(In a local grid every job's driver joins the one cluster the launcher started instead.)

submitit starts one task per node. The first node's task starts the Ray head, writes where it
listens to `<run>/grid/ray/<job id>/head.json` (the run directory is on the shared file system)
and drives the stage through `run_stage`, the same call as `qup run`; the other nodes' tasks join
as Ray workers and leave when the head writes `done`. Every task stops only its own Ray
processes, also when the stage fails or the job is preempted.

Preemption and time limits: SLURM sends USR2 `signal_delay_s` before the limit (and on
preemption where the site sets `preempt_send_user_signal`); submitit then calls `checkpoint()`,
which hands back this same job, and requeues it with `scontrol requeue`. The requeued job runs
the stage again, which resumes from its shards (inference), its checkpoint (training) or the
oracle cache, so no row is produced twice.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from qup_ray.config import ClusterConfig, ExperimentConfig
from qup_ray.grid import ray_cluster
from qup_ray.grid.plan import Resources
from qup_ray.ray_session import is_loopback, stay_on_loopback
from qup_ray.rundir import write_json

logger = logging.getLogger(__name__)

WORKER_JOIN_TIMEOUT_S = 300


def exit_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the teardown must not be interrupted too
    logger.warning("SIGTERM: stopping the stage and this job's Ray processes")
    raise SystemExit(128 + signum)


@dataclass
class StageJob:
    """The callable submitit pickles for one job: `run_stage(stage, cfg, cells=cells)` on a Ray
    cluster of the job's own."""

    name: str
    stage: str
    cells: list[str] | None
    cfg: ExperimentConfig
    cluster: ClusterConfig
    resources: Resources
    workdir: str
    """The directory `qup grid` ran in: relative paths of the config resolve against it."""
    shared_ray: dict | None = None
    """A local grid's one Ray cluster (its `head.json`): the stage joins it and this job
    starts no cluster of its own. None on SLURM: every job has its own."""

    def __call__(self) -> dict:
        import submitit

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        os.chdir(self.workdir)
        env = submitit.JobEnvironment()
        # One folder per attempt: a requeued job must not read the head of its killed attempt.
        attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
        rendezvous = self.cfg.run_dir.resolve() / "grid" / "ray" / f"{env.job_id}.{attempt}"
        # submitit ignores SIGTERM (it waits for USR2 to checkpoint). SLURM sends SIGTERM on
        # scancel, `scontrol requeue` and at the hard limit, then SIGKILL after KillWait: stop
        # the stage at once so the Ray teardown below runs within that grace time.
        signal.signal(signal.SIGTERM, exit_on_sigterm)
        if self.stage == "fetch":  # downloads only: no Ray, one task
            from qup_ray.fetch import fetch_for_run

            return {"job": self.name, "output": str(fetch_for_run(self.cfg))}
        if self.shared_ray is not None:
            return self._on_shared_cluster(self.shared_ray)
        if env.global_rank == 0:
            return self._head(env, rendezvous)
        self._worker(env, rendezvous)
        return {}

    def checkpoint(self, *args, **kwargs):
        """Requeue this same job: the stage resumes from what it already wrote."""
        import submitit

        logger.warning(
            "job %s: checkpointing for requeue (stage %s resumes)", self.name, self.stage
        )
        return submitit.helpers.DelayedSubmission(self)

    # ---- a local grid: the driver joins the launcher's cluster ---------------------------------

    def _on_shared_cluster(self, head: dict) -> dict:
        """The stage on the local grid's cluster, joined as on a job's own (the stage's
        `init_ray` finds it joined); at the end only this driver leaves: the launcher stops the
        cluster after the last job."""
        from qup_ray.stages import run_stage

        stay_on_loopback(os.environ)  # the launcher's cluster is on 127.0.0.1
        os.environ["RAY_ADDRESS"] = head["address"]
        os.environ["RAY_AUTH_MODE"] = "disabled"
        dashboard = head["ports"]["dashboard"]
        logger.info(
            "job %s on the local grid's Ray cluster %s; dashboard %s, from your machine: "
            "ssh -N -L %d:127.0.0.1:%d %s",
            self.name, head["address"], head["dashboard"], dashboard, dashboard, head["hostname"],
        )  # fmt: skip
        t0 = time.time()
        try:
            self._connect(head["address"], 1)
            out = run_stage(self.stage, self.cfg, cells=self.cells)
            return {"job": self.name, "output": str(out), "seconds": round(time.time() - t0, 1)}
        finally:
            self._shutdown_driver()

    # ---- the head node: Ray head + the stage driver ------------------------------------------

    def _node_settings(self, env) -> dict:
        res, cl = self.resources, self.cluster
        cpus = int(os.environ.get("SLURM_CPUS_ON_NODE", res.cpus_per_node))
        return {
            "num_cpus": min(cpus, res.cpus_per_node),
            "num_gpus": res.gpus_per_node,
            "object_store_bytes": int(res.mem_gb * cl.object_store_fraction * 2**30),
            "dashboard_host": cl.dashboard_host,
            "temp_dir": ray_cluster.temp_dir_for(env.job_id, cl.ray_temp_root),
        }

    def _head(self, env, rendezvous: Path) -> dict:
        from qup_ray.stages import run_stage

        cl = self.cluster
        settings = self._node_settings(env)
        # Ray processes of an earlier attempt of this job (killed by a requeue) may hold ports.
        ray_cluster.stop_own_processes(settings["temp_dir"], timeout_s=5)
        ports = ray_cluster.pick_ports(env.job_id, cl.ray_port_range, cl.ray_port_block)
        node_ip = ray_cluster.node_ip_for(env.hostnames[0], env.num_nodes > 1)
        if is_loopback(node_ip):  # this driver must see the node on 127.0.0.1 too
            stay_on_loopback(os.environ)
        node = ray_cluster.start_node(head_address=None, node_ip=node_ip, ports=ports, **settings)
        t0 = time.time()
        try:
            ray_cluster.wait_for_port(node_ip, ports.port("gcs"), node)
            address = f"{node_ip}:{ports.port('gcs')}"
            dashboard = ports.port("dashboard")
            write_json(rendezvous / "head.json", {
                "address": address, "hostname": socket.gethostname(), "job": self.name,
                "dashboard": f"http://{cl.dashboard_host}:{dashboard}",
                "temp_dir": str(settings["temp_dir"]), **ray_cluster.describe(ports),
            })  # fmt: skip
            logger.info(
                "Ray dashboard of job %s on %s:%d; from your machine: "
                "ssh -N -L %d:127.0.0.1:%d %s  then open http://127.0.0.1:%d",
                self.name, cl.dashboard_host, dashboard, dashboard, dashboard,
                socket.gethostname(), dashboard,
            )  # fmt: skip
            os.environ["RAY_ADDRESS"] = address
            os.environ["RAY_AUTH_MODE"] = "disabled"
            self._connect(address, env.num_nodes)
            out = run_stage(self.stage, self.cfg, cells=self.cells)
            return {"job": self.name, "output": str(out), "seconds": round(time.time() - t0, 1)}
        finally:
            self._shutdown_driver()
            write_json(rendezvous / "done", {"time": time.time()})
            node.stop()
            ray_cluster.remove_temp_dir(settings["temp_dir"])

    def _connect(self, address: str, num_nodes: int) -> None:
        """Join the job's cluster as its driver (the stage's `init_ray` then finds it joined) and
        wait until every node's worker is in."""
        import ray

        ray.init(address=address, log_to_driver=True)
        # ray.init installs its own SIGTERM handler, which dies without running `finally`.
        signal.signal(signal.SIGTERM, exit_on_sigterm)
        deadline = time.monotonic() + WORKER_JOIN_TIMEOUT_S
        while sum(n["Alive"] for n in ray.nodes()) < num_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only part of the {num_nodes} Ray nodes joined")
            time.sleep(2)
        if num_nodes > 1:
            logger.info("all %d Ray nodes joined", num_nodes)

    @staticmethod
    def _shutdown_driver() -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    # ---- other nodes: Ray workers until the head is done -------------------------------------

    def _worker(self, env, rendezvous: Path) -> None:
        settings = self._node_settings(env)
        deadline = time.monotonic() + WORKER_JOIN_TIMEOUT_S
        while not (rendezvous / "head.json").is_file() or (rendezvous / "done").is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {self.name}: the Ray head never came up")
            time.sleep(1)
        node = ray_cluster.join_head(rendezvous, settings)
        try:
            while not (rendezvous / "done").is_file() and node.process.poll() is None:
                time.sleep(2)
        finally:
            node.stop()
            ray_cluster.remove_temp_dir(settings["temp_dir"])
