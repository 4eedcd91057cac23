"""An interactive Ray cluster over a SLURM allocation (`slurm/ray_cluster.sbatch`), for notebooks.

    srun python -m qup_ray.grid.interactive [CLUSTER_YAML]

One task per node: SLURM's task 0 starts the Ray head, the others join it. Ports, temp dir,
object store and dashboard binding follow the cluster YAML (or its defaults) exactly as the
grid's jobs do. Runs until the job ends (time limit or `scancel`), then stops only its own Ray
processes. The head prints the `ssh -L` line to reach the dashboard and the Ray client.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from qup_ray.config import ClusterConfig, load_cluster_config
from qup_ray.grid import ray_cluster
from qup_ray.rundir import write_json

logger = logging.getLogger("qup_ray.grid.interactive")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cluster = load_cluster_config(argv[0]) if argv and argv[0] else ClusterConfig()
    job_id, rank = os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_PROCID", "0"))
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    multi = len(hosts) > 1
    rendezvous = Path(os.environ.get("SLURM_SUBMIT_DIR", ".")) / ".qup-ray" / job_id
    mem_gb = int(os.environ.get("SLURM_MEM_PER_NODE", "16384")) / 1024
    settings = {
        "num_cpus": int(os.environ.get("SLURM_CPUS_ON_NODE", "1")),
        "num_gpus": len([g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]),
        "object_store_bytes": int(mem_gb * cluster.object_store_fraction * 2**30),
        "dashboard_host": cluster.dashboard_host,
        "temp_dir": ray_cluster.temp_dir_for(job_id, cluster.ray_temp_root),
    }
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    if rank == 0:
        ports = ray_cluster.pick_ports(job_id, cluster.ray_port_range, cluster.ray_port_block)
        node_ip = ray_cluster.node_ip_for(hosts[0], multi)
        node = ray_cluster.start_node(head_address=None, node_ip=node_ip, ports=ports, **settings)
        ray_cluster.wait_for_port(node_ip, ports.port("gcs"), node)
        address = f"{node_ip}:{ports.port('gcs')}"
        write_json(rendezvous / "head.json", {"address": address, **ray_cluster.describe(ports)})
        dash, client = ports.port("dashboard"), ports.port("client_server")
        logger.info("Ray cluster of job %s: RAY_ADDRESS=%s (from the allocation's nodes)",
                    job_id, address)  # fmt: skip
        logger.info("from your machine: ssh -N -L %d:127.0.0.1:%d -L %d:127.0.0.1:%d %s",
                    dash, dash, client, client, socket.gethostname())  # fmt: skip
        logger.info("then: dashboard http://127.0.0.1:%d, client ray.init('ray://127.0.0.1:%d')",
                    dash, client)  # fmt: skip
    else:
        while not (rendezvous / "head.json").is_file() and not stop["now"]:
            time.sleep(1)
        node = ray_cluster.join_head(rendezvous, settings)
    try:
        while not stop["now"] and node.process.poll() is None:
            time.sleep(2)
    finally:
        node.stop()
        ray_cluster.remove_temp_dir(settings["temp_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
