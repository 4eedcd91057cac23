"""A Ray cluster the suite starts listens on loopback only: no service is reachable from the
network of a shared node (issue 15, point 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from qup_ray.ray_session import is_loopback

pytestmark = pytest.mark.cluster

# Started the way a stage starts Ray (`init_ray`), in a process of its own so the test process
# keeps no Ray state. `ray` is imported first, as the stages do, before `init_ray` runs. A task
# and an actor make Ray start worker processes (each has its own gRPC server).
START = """
    import ray
    from qup_ray.config import RayConfig
    from qup_ray.ray_session import init_ray

    init_ray(RayConfig(num_cpus=1))
"""
# A one-node grid job's driver: it joins the `ray start` head of its job (grid/job.py).
JOIN = """
    import os, sys
    from qup_ray.ray_session import stay_on_loopback

    stay_on_loopback(os.environ)
    import ray

    ray.init(address=sys.argv[1])
"""
# Then: a task and an actor, and every bound socket of this process and its children.
PROBE = """
    import json, os, socket, time
    import psutil

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self):
            return os.getpid()

    ray.get(ray.remote(num_cpus=0)(lambda: 1).remote())
    probe = Probe.remote()
    ray.get(probe.pid.remote())
    time.sleep(5)  # the dashboard agent and the metrics exporter open their ports last
    me = psutil.Process()
    bound = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:
            continue
        for c in conns:
            listening = c.status == psutil.CONN_LISTEN
            udp_bound = c.type == socket.SOCK_DGRAM and not c.raddr
            if listening or udp_bound:
                bound.append({"pid": proc.pid, "name": name, "ip": c.laddr.ip,
                              "port": c.laddr.port})
    print("SOCKETS " + json.dumps({"bound": bound,
                                   "node_ip": ray.util.get_node_ip_address()}))
    ray.shutdown()
"""


def _loopback_or_mapped(ip: str) -> bool:
    """127.0.0.1, ::1, or an IPv4-mapped loopback (`::ffff:127.0.0.1`, a dual-stack socket)."""
    return is_loopback(ip.removeprefix("::ffff:"))


def _probe(start: str, tmp_path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = textwrap.dedent(start) + textwrap.dedent(PROBE)
    out = subprocess.run([sys.executable, "-c", driver, *args], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=env)  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("SOCKETS ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("SOCKETS "))


def test_every_listening_socket_of_a_local_ray_cluster_is_on_loopback(tmp_path):
    result = _probe(START, tmp_path)
    bound = result["bound"]
    names = {s["name"] for s in bound}
    # The cluster really ran: its GCS, raylet and dashboard listen (so the check is not vacuous).
    assert {"gcs_server", "raylet"} <= names, bound
    assert any(s["port"] == 8265 or "Dashboard" in s["name"] for s in bound), bound
    exposed = [s for s in bound if not _loopback_or_mapped(s["ip"])]
    assert exposed == [], f"Ray services bound beyond loopback: {exposed}"
    assert result["node_ip"] == "127.0.0.1"


def test_a_one_node_grid_job_cluster_listens_on_loopback_only(tmp_path):
    """The `ray start` head a grid job starts (grid/job.py), and its driver joining it."""
    import psutil

    from qup_ray.grid import ray_cluster

    temp_dir = ray_cluster.temp_dir_for(f"lo{os.getpid()}", "/tmp")
    ports = ray_cluster.pick_ports(temp_dir.name, (20000, 60000), 200)
    node = ray_cluster.start_node(
        head_address=None, node_ip="127.0.0.1", ports=ports, temp_dir=temp_dir, num_cpus=1,
        num_gpus=0, object_store_bytes=2**28, dashboard_host="127.0.0.1",
    )  # fmt: skip
    try:
        ray_cluster.wait_for_port("127.0.0.1", ports.port("gcs"), node)
        result = _probe(JOIN, tmp_path, f"127.0.0.1:{ports.port('gcs')}")
        bound = list(result["bound"])
        for proc in ray_cluster.own_processes(temp_dir, session=node.process.pid):
            try:
                conns, name = proc.net_connections(kind="inet"), proc.name()
            except psutil.Error:
                continue
            bound += [{"name": name, "ip": c.laddr.ip, "port": c.laddr.port} for c in conns
                      if c.status == psutil.CONN_LISTEN]  # fmt: skip
    finally:
        node.stop()
        ray_cluster.remove_temp_dir(temp_dir)
    assert {"gcs_server", "raylet"} <= {s["name"] for s in bound}, bound
    exposed = [s for s in bound if not _loopback_or_mapped(s["ip"])]
    assert exposed == [], f"Ray services of a grid job bound beyond loopback: {exposed}"
    assert result["node_ip"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("localhost", True),
     ("10.0.0.5", False), ("0.0.0.0", False), ("node13", False)],
)  # fmt: skip
def test_is_loopback(address: str, loopback: bool):
    assert is_loopback(address) is loopback
