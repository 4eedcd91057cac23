"""Connecting a stage driver to Ray: the configured cluster, `RAY_ADDRESS`, or a local one."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from collections.abc import MutableMapping

from qup_ray.config import RayConfig

logger = logging.getLogger(__name__)

# Ray's switch for clusters of one machine (named for Windows and macOS, where it is the default).
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by `cfg.address` or `RAY_ADDRESS`; otherwise start a local one.

    A local cluster binds every service (GCS, raylet, object manager, workers, dashboard and its
    agent, metrics, runtime-env agent) to `cfg.node_ip_address`, 127.0.0.1 by default, and its
    dashboard to `cfg.dashboard_host`; it runs without token auth, which Ray would otherwise
    switch on by itself once `~/.ray/auth_token` exists. The address is never "auto": on a
    shared node that can pick someone else's cluster.
    """
    if is_loopback(cfg.node_ip_address) and not (cfg.address or os.environ.get("RAY_ADDRESS")):
        stay_on_loopback(os.environ)
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    if is_loopback(cfg.node_ip_address):
        stay_on_loopback(os.environ)  # again: ray may have been imported before the switch
    store = int(cfg.object_store_memory_gb * 2**30) if cfg.object_store_memory_gb else None
    context = ray.init(
        num_cpus=cfg.num_cpus,
        object_store_memory=store,
        include_dashboard=cfg.include_dashboard,
        dashboard_host=cfg.dashboard_host,
        _node_ip_address=cfg.node_ip_address,
        log_to_driver=True,
    )
    if cfg.include_dashboard and context.dashboard_url:
        logger.info("Ray dashboard: http://%s", context.dashboard_url)


def stay_on_loopback(env: MutableMapping[str, str]) -> None:
    """Keep a one-machine Ray cluster on 127.0.0.1: set Ray's single-machine switch in `env`
    (the environment of this process or of the Ray processes it starts) and, if ray is already
    imported here, in its constants.

    Ray turns a loopback node address into the machine's network address unless it runs as a
    single-machine cluster; its gRPC servers then listen on every interface. The switch (read
    when ray is imported, and inherited by the processes Ray starts) keeps the node address, and
    with it every listening socket, on loopback.
    """
    env[_SINGLE_MACHINE_ENV] = "0"
    if env is os.environ and "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
