"""Interrupting a stage for the kill-and-resume tests: start it in its own process group, wait
for its first finished shard, SIGKILL the whole group (engine actors and Ray included)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_after_first_shard(command: list[str], shards: Path, timeout_s: float = 1200) -> int:
    """Run `command`, SIGKILL its process group once `shards` holds a finished shard, and
    return how many shards were finished at that moment."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + timeout_s
        while (
            not list(shards.glob("shard-*.parquet"))
            and time.time() < deadline
            and proc.poll() is None
        ):
            time.sleep(0.2)
        finished = len(list(shards.glob("shard-*.parquet")))
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return finished
