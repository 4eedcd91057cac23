"""One Ray cluster per SLURM job, on shared nodes: own ports, own short temp dir, own processes.
(A local grid starts one such cluster for all its jobs: `start_local_cluster`.)

Ray's `symmetric-run` does not fit shared GPU nodes: it refuses a node where Ray already runs and
ends with a plain `ray stop`, which kills every Ray process on the node, other users' included.
So each job:
- takes a free block of ports from `ray_port_range` (every Ray port: GCS, raylet, object manager,
  client server, dashboard, dashboard agent, metrics, runtime env agent, workers);
- keeps its sockets and logs under `<ray_temp_root>/qup-ray-<job id>`, short enough for Unix
  socket paths (107 bytes) where SLURM's job tmpdirs are not;
- starts `ray start --block` in a session of its own, and stops exactly that session's processes
  plus any process still naming its temp dir (what a killed earlier attempt of the same job,
  e.g. after a requeue, left behind), never with `ray stop`;
- sizes the object store from the allocation (Ray reads the whole node's memory otherwise),
  binds the dashboard to `dashboard_host` (127.0.0.1) and switches token auth off: nothing but
  this host reaches it, through the `ssh -L` line printed in the job log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from qup_ray.ray_session import is_loopback, stay_on_loopback

logger = logging.getLogger(__name__)

MAX_SOCKET_PATH = 107
# Offsets inside a job's port block; the rest of the block are worker ports.
PORT_NAMES = (
    "gcs", "node_manager", "object_manager", "client_server", "dashboard", "dashboard_agent_listen",
    "dashboard_agent_grpc", "metrics_export", "runtime_env_agent",
)  # fmt: skip
NUM_FIXED_PORTS = 16


@dataclass(frozen=True)
class RayPorts:
    """Every port one job's Ray cluster listens on."""

    base: int
    block: int

    def port(self, name: str) -> int:
        return self.base + PORT_NAMES.index(name)

    @property
    def worker_range(self) -> tuple[int, int]:
        return self.base + NUM_FIXED_PORTS, self.base + self.block - 1

    def all(self) -> list[int]:
        return list(range(self.base, self.base + self.block))


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def pick_ports(job_id: str, port_range: tuple[int, int], block: int) -> RayPorts:
    """The first block, from one derived from the job id, whose fixed ports are all free here.

    Consecutive job ids start at different blocks, so jobs sharing a node rarely even probe the
    same ports; the probe makes sure."""
    low, high = port_range
    num_blocks = (high - low) // block
    first = zlib.crc32(job_id.encode()) % num_blocks
    for i in range(num_blocks):
        base = low + ((first + i) % num_blocks) * block
        if all(port_is_free(base + k) for k in range(NUM_FIXED_PORTS)):
            return RayPorts(base, block)
    raise RuntimeError(f"no free block of {block} ports in {low}-{high} on {socket.gethostname()}")


def temp_dir_for(job_id: str, root: str) -> Path:
    """`<root>/qup-ray-<job id>`, refused when Ray's socket paths under it would be too long."""
    path = Path(root) / f"qup-ray-{job_id}"
    # Ray's longest socket: <temp>/session_YYYY-MM-DD_HH-MM-SS_ffffff_<pid>/sockets/plasma_store
    longest = len(str(path)) + len(
        "/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store"
    )
    if longest > MAX_SOCKET_PATH:
        raise ValueError(
            f"Ray temp dir {path} is too long for Unix sockets ({longest} > {MAX_SOCKET_PATH} "
            "bytes): set a shorter ray_temp_root in the cluster YAML"
        )
    return path


def ray_env(address: str) -> dict[str, str]:
    """Environment of the Ray processes a job starts, in a cluster whose GCS is `address`."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"  # bound to 127.0.0.1; ~/.ray/auth_token would turn it on
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM stops at once, no 30 s drain
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Every worker inherits it: Ray's own helpers that look the cluster up (Ray Train's
    # placement group cleaner, state API calls) then find this one, not "multiple active Ray
    # instances" on a shared node.
    env["RAY_ADDRESS"] = address
    return env


@dataclass
class RayNode:
    """A `ray start --block` process (head or worker) and the session it leads."""

    process: subprocess.Popen
    temp_dir: Path
    log_path: Path

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop this node's Ray processes (its session) and anything naming its temp dir."""
        stop_own_processes(self.temp_dir, session=self.process.pid, timeout_s=timeout_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)


def own_processes(temp_dir: Path, session: int | None = None) -> list[psutil.Process]:
    """Processes of session `session`, or whose command line names `temp_dir`; never ours."""
    me = os.getpid()
    # The exact folder: `qup-ray-5` must not match the processes of job 57.
    pattern = re.compile(re.escape(str(temp_dir)) + r"(?![\w.-])")
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == me:
            continue
        try:
            in_session = session is not None and os.getsid(p.pid) == session
            names_dir = any(pattern.search(part) for part in (p.info["cmdline"] or []))
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
        if in_session or names_dir:
            found.append(p)
    return found


def stop_own_processes(temp_dir: Path, session: int | None = None, timeout_s: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`, to this job's Ray processes only. Returns how
    many there were."""
    procs = own_processes(temp_dir, session)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    if procs:
        logger.info("stopped %d Ray processes of %s", len(procs), temp_dir)
    return len(procs)


def start_node(
    *,
    head_address: str | None,
    node_ip: str,
    ports: RayPorts,
    temp_dir: Path,
    num_cpus: int,
    num_gpus: int,
    object_store_bytes: int,
    dashboard_host: str,
    setup: list[str] | None = None,
) -> RayNode:
    """Start a head (`head_address=None`) or a worker joining `head_address`, in a new session.
    `setup`: shell lines run first (the cluster YAML's `setup` and `env`), for a node started
    outside the job whose workers must see the job's environment."""
    # Leftovers of an earlier attempt of this job (killed by a requeue) hold our ports.
    stop_own_processes(temp_dir, timeout_s=5)
    temp_dir.mkdir(parents=True, exist_ok=True)
    low, high = ports.worker_range
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
        f"--node-ip-address={node_ip}", f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
        f"--object-store-memory={object_store_bytes}",
        f"--node-manager-port={ports.port('node_manager')}",
        f"--object-manager-port={ports.port('object_manager')}",
        f"--min-worker-port={low}", f"--max-worker-port={high}",
        f"--dashboard-agent-listen-port={ports.port('dashboard_agent_listen')}",
        f"--dashboard-agent-grpc-port={ports.port('dashboard_agent_grpc')}",
        f"--metrics-export-port={ports.port('metrics_export')}",
        f"--runtime-env-agent-port={ports.port('runtime_env_agent')}",
    ]  # fmt: skip
    if head_address is None:
        cmd += [
            "--head", f"--port={ports.port('gcs')}",
            f"--ray-client-server-port={ports.port('client_server')}",
            "--include-dashboard=true", f"--dashboard-host={dashboard_host}",
            f"--dashboard-port={ports.port('dashboard')}",
        ]  # fmt: skip
    else:
        cmd.append(f"--address={head_address}")
    if setup:
        cmd = ["bash", "-c", "\n".join([*setup, 'exec "$@"']), "qup-ray-node", *cmd]
    env = ray_env(head_address or f"{node_ip}:{ports.port('gcs')}")
    if is_loopback(node_ip):  # a one-node job: every Ray socket on 127.0.0.1, none public
        stay_on_loopback(env)
    log_path = temp_dir.parent / f"{temp_dir.name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return RayNode(process, temp_dir, log_path)


def join_head(rendezvous: Path, settings: dict) -> RayNode:
    """Start this node as a Ray worker of the head described in `<rendezvous>/head.json`."""
    from qup_ray.rundir import read_json

    head = read_json(rendezvous / "head.json")
    ports = RayPorts(head["base"], head["block"])
    node_ip = node_ip_for(socket.gethostname(), True)
    return start_node(head_address=head["address"], node_ip=node_ip, ports=ports, **settings)


def wait_for_port(host: str, port: int, node: RayNode, timeout_s: float = 120.0) -> None:
    """Until `host:port` accepts connections; fails early if the node's process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise RuntimeError(f"Ray exited with {node.process.returncode}; see {node.log_path}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.5)
    raise TimeoutError(f"Ray did not listen on {host}:{port} within {timeout_s:.0f}s")


def node_ip_for(hostname: str, multi_node: bool) -> str:
    """127.0.0.1 for a one-node job (nothing listens outside); else the host's address."""
    if not multi_node:
        return "127.0.0.1"
    return socket.gethostbyname(hostname)


def describe(ports: RayPorts) -> dict:
    return {"ports": {n: ports.port(n) for n in PORT_NAMES}, "worker_ports": ports.worker_range,
            **asdict(ports)}  # fmt: skip


def remove_temp_dir(temp_dir: Path) -> None:
    shutil.rmtree(temp_dir, ignore_errors=True)


def local_cluster_name(run_root: Path) -> str:
    """`local-<hash>` of a run directory (and user): the shared cluster of a local grid. Named
    by the run, not the process, so a launcher killed outright leaves processes that the next
    launch of the same run finds by their temp dir and stops (`start_node` does)."""
    key = f"{os.getuid()}:{Path(run_root).resolve()}"
    return f"local-{zlib.crc32(key.encode()):08x}"


def start_local_cluster(
    name: str,
    rendezvous: Path,
    *,
    port_range: tuple[int, int],
    port_block: int,
    temp_root: str,
    num_cpus: int,
    num_gpus: int,
    object_store_bytes: int,
    dashboard_host: str,
    setup: list[str] | None = None,
) -> tuple[RayNode, dict]:
    """One Ray head on 127.0.0.1 for every job of a local grid (they run one after another, each
    job's driver joins it), instead of a cluster per job: its start-up, driver connection and
    teardown are paid once. Returns the node (stop it with `stop_local_cluster`) and where it
    listens, also written to `<rendezvous>/head.json`. On SLURM each job keeps its own."""
    from qup_ray.rundir import write_json

    temp_dir = temp_dir_for(name, temp_root)
    ports = pick_ports(name, port_range, port_block)
    node = start_node(
        head_address=None, node_ip="127.0.0.1", ports=ports, temp_dir=temp_dir,
        num_cpus=num_cpus, num_gpus=num_gpus, object_store_bytes=object_store_bytes,
        dashboard_host=dashboard_host, setup=setup,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", ports.port("gcs"), node)
        # Until the dashboard listens, a driver's `ray.init` waits for it (some 20 s on a busy
        # 2-core machine): wait here, so that time shows as the cluster's start, not a job's.
        with contextlib.suppress(TimeoutError):
            wait_for_port(dashboard_host, ports.port("dashboard"), node, timeout_s=60)
        head = {
            "address": f"127.0.0.1:{ports.port('gcs')}", "hostname": socket.gethostname(),
            "dashboard": f"http://{dashboard_host}:{ports.port('dashboard')}",
            "temp_dir": str(temp_dir), "log": str(node.log_path), **describe(ports),
        }  # fmt: skip
        write_json(rendezvous / "head.json", head)
    except BaseException:  # its log (named in the error) stays
        stop_local_cluster(node)
        raise
    return node, head


def stop_local_cluster(node: RayNode) -> None:
    """Stop a local grid's cluster: its processes only (never `ray stop`), then its temp dir."""
    node.stop()
    remove_temp_dir(node.temp_dir)
