"""SIGTERM/SIGUSR2 during training: a stop file the workers poll, then the handler that was
installed before (submitit's USR2 handler checkpoints and requeues the job) still runs."""

from __future__ import annotations

import os
import signal
import time

from qup_ray.stages.train import stop_on_signals


def test_signal_asks_workers_to_stop_then_chains_the_previous_handler(tmp_path):
    calls: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda signum, _frame: calls.append(signum))
    try:
        stop = tmp_path / ".stop-test"
        with stop_on_signals(stop) as seen:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.1)
            assert stop.is_file()  # what the workers poll at each step boundary
            assert calls == []  # not before the workers have checkpointed and stopped
        assert seen["signal"] == "SIGUSR2"
        assert calls == [signal.SIGUSR2]
        assert not stop.exists()
        assert signal.getsignal(signal.SIGUSR2) is not None
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_no_signal_no_stop_file_and_handlers_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(tmp_path / ".stop-test") as seen:
        assert signal.getsignal(signal.SIGTERM) is not before
    assert seen["signal"] is None
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (tmp_path / ".stop-test").exists()
