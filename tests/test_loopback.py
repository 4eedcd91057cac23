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
DRIVER = textwrap.dedent(
    """
    import json, os, socket, time
    import psutil
    import ray
    from qup_ray.config import RayConfig
    from qup_ray.ray_session import init_ray

    init_ray(RayConfig(num_cpus=1))

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
)


def _loopback_or_mapped(ip: str) -> bool:
    """127.0.0.1, ::1, or an IPv4-mapped loopback (`::ffff:127.0.0.1`, a dual-stack socket)."""
    return is_loopback(ip.removeprefix("::ffff:"))


def test_every_listening_socket_of_a_local_ray_cluster_is_on_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", DRIVER],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("SOCKETS ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("SOCKETS "))
    bound = result["bound"]
    names = {s["name"] for s in bound}
    # The cluster really ran: its GCS, raylet and dashboard listen (so the check is not vacuous).
    assert {"gcs_server", "raylet"} <= names, bound
    assert any(s["port"] == 8265 or "Dashboard" in s["name"] for s in bound), bound
    exposed = [s for s in bound if not _loopback_or_mapped(s["ip"])]
    assert exposed == [], f"Ray services bound beyond loopback: {exposed}"
    assert result["node_ip"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("localhost", True),
     ("10.0.0.5", False), ("0.0.0.0", False), ("node13", False)],
)  # fmt: skip
def test_is_loopback(address: str, loopback: bool):
    assert is_loopback(address) is loopback
