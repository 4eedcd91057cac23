"""Connecting a stage driver to Ray: the configured cluster, `RAY_ADDRESS`, or a local one."""

from __future__ import annotations

import logging
import os

from qup_ray.config import RayConfig

logger = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by `cfg.address` or `RAY_ADDRESS`; otherwise start a local one.

    A local cluster binds its dashboard to `cfg.dashboard_host` (127.0.0.1 by default) and runs
    without token auth, which Ray would otherwise switch on by itself once `~/.ray/auth_token`
    exists. The address is never "auto": on a shared node that can pick someone else's cluster.
    """
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
    store = int(cfg.object_store_memory_gb * 2**30) if cfg.object_store_memory_gb else None
    context = ray.init(
        num_cpus=cfg.num_cpus,
        object_store_memory=store,
        include_dashboard=cfg.include_dashboard,
        dashboard_host=cfg.dashboard_host,
        log_to_driver=True,
    )
    if cfg.include_dashboard and context.dashboard_url:
        logger.info("Ray dashboard: http://%s", context.dashboard_url)
