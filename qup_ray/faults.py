"""Fault injection for tests and cluster drills: one environment variable makes an engine actor or
a training worker die hard (SIGKILL of itself, as the kernel's out-of-memory killer does) at a
chosen point, so the recovery paths run for real.

    QUP_FAULT="engine:rollouts:after_batches=2"   # a rollouts engine actor dies on its 3rd batch, once
    QUP_FAULT="engine:score:poison=ab12"          # a score engine actor dies on every batch with a
                                                  # row whose text columns contain "ab12"
    QUP_FAULT="engine:eval:poison=<problem_id>"   # one benchmark problem crashes eval every time
    QUP_FAULT="train:rank=1:after_steps=3"        # training worker of rank 1 dies after its 3rd
                                                  # optimizer step, once
    QUP_FAULT="engine:eval:after_batches=0;train:rank=0:after_steps=5"   # several, `;`-separated

Engine roles are the pool's `role` (rollouts, eval, score, oracle). The variable is read by the
driver (`qup run ...`) and handed to the actors and workers it starts, so it reaches every node.
"Once" means once per pool or training run: the first process to fire creates a marker file in
the state directory it is given (the engine pool's events directory, the training cell's
directory), and processes that find the marker (the restarted actor or worker) live on. A poison
fault fires every time: that is what a poison input does. Its TEXT is matched against every text
column of the batch (eval's rows also carry their model's path): a problem id names one row.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENV = "QUP_FAULT"


@dataclass(frozen=True)
class Fault:
    """One parsed fault: where it applies (`kind` engine or train, `target` a pool role or a
    rank) and when it fires."""

    spec: str
    kind: str
    target: str
    after: int | None = None
    """Fire once, on the batch (engine) after this many, or after this many steps (train)."""
    poison: str | None = None
    """Fire on every batch holding a row with this substring in a text column (engine only)."""


def parse(spec: str | None) -> list[Fault]:
    """The faults of a `QUP_FAULT` value; an empty or unset value means none. A malformed value
    is an error (a drill that silently injects nothing proves nothing)."""
    faults = []
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        fields = part.split(":")
        if len(fields) != 3 or fields[0] not in ("engine", "train") or "=" not in fields[2]:
            raise ValueError(f"{ENV}={part!r}: expected engine:<role>:after_batches=N, "
                             "engine:<role>:poison=TEXT or train:rank=R:after_steps=N")  # fmt: skip
        kind, target, (key, value) = fields[0], fields[1], fields[2].split("=", 1)
        if kind == "train":
            if not target.startswith("rank=") or key != "after_steps":
                raise ValueError(f"{ENV}={part!r}: expected train:rank=R:after_steps=N")
            faults.append(Fault(part, kind, target.removeprefix("rank="), after=int(value)))
        elif key == "after_batches":
            faults.append(Fault(part, kind, target, after=int(value)))
        elif key == "poison" and value:
            faults.append(Fault(part, kind, target, poison=value))
        else:
            raise ValueError(f"{ENV}={part!r}: unknown engine fault {key!r}")
    return faults


def from_env() -> str | None:
    """The driver's `QUP_FAULT` value, validated, to hand to the processes it starts."""
    spec = os.environ.get(ENV) or None
    parse(spec)
    return spec


def die(why: str) -> None:
    """Exit now, as an out-of-memory kill does: no cleanup, no exception to catch."""
    logger.error("fault injection: %s: killing process %d", why, os.getpid())
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _first_to_fire(fault: Fault, state_dir: str | Path) -> bool:
    """True for exactly one process per state directory (the marker file is created exclusively)."""
    name = hashlib.sha256(fault.spec.encode()).hexdigest()[:12]
    marker = Path(state_dir) / f"fault-{name}.fired"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(marker, "x") as f:
            f.write(f"{fault.spec}\npid {os.getpid()}\n")
    except FileExistsError:
        return False
    return True


def engine_batch(
    spec: str | None, role: str, batches_done: int, batch: dict[str, Any], state_dir: str | Path
) -> None:
    """Called by an engine actor as it takes a batch (after `batches_done` earlier ones)."""
    for fault in parse(spec):
        if fault.kind != "engine" or fault.target != role:
            continue
        if fault.poison is not None and any(
            isinstance(v, str) and fault.poison in v for column in batch.values() for v in column
        ):
            die(f"{fault.spec}: a row of the batch holds {fault.poison!r}")
        if fault.after == batches_done and _first_to_fire(fault, state_dir):
            die(f"{fault.spec}: batch {batches_done + 1}")


def train_step(spec: str | None, rank: int, steps_done: int, state_dir: str | Path) -> None:
    """Called by a training worker after each optimizer step (`steps_done` counts them)."""
    for fault in parse(spec):
        if (
            fault.kind == "train"
            and fault.target == str(rank)
            and fault.after == steps_done
            and _first_to_fire(fault, state_dir)
        ):
            die(f"{fault.spec}: after step {steps_done}")
