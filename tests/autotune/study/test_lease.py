"""One writer per study: the lease beside a journal and in a database, with real holder processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autotune.study.lease import Lease, LeaseBusy

pytestmark = pytest.mark.alone  # heartbeats and waits of a few seconds: nothing beside it
REPO = Path(__file__).resolve().parents[3]
HOLD = """
import sys, time
from autotune.study.lease import Lease
lease = Lease(sys.argv[1], "s", timeout_s=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(params=["journal", "sqlite"])
def storage(request, tmp_path) -> str:
    if request.param == "journal":
        return str(tmp_path / "s" / "optuna.journal")
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def holder(storage: str, timeout_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, storage, str(timeout_s)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_waits_then_names_the_holder_and_gets_the_lease_once_released(storage):
    first = Lease(storage, "s", timeout_s=5).acquire()
    started = time.monotonic()
    with pytest.raises(LeaseBusy) as busy:
        Lease(storage, "s", wait_s=1.5, timeout_s=5, poll_s=0.2).acquire()
    assert 1.4 <= time.monotonic() - started < 5
    text = str(busy.value)
    assert f"host {socket.gethostname()} pid {os.getpid()}, started " in text and "changed nothing" in text
    assert "\n" not in text
    Lease(storage, "t", timeout_s=5).acquire().release()  # another study is not blocked
    first.release()
    second = Lease(storage, "s", timeout_s=5).acquire()
    assert second.took_over is None
    second.release()


def test_a_live_holder_keeps_its_lease_past_the_timeout_and_a_killed_one_is_taken_over(storage):
    proc = holder(storage, 3)
    try:
        time.sleep(4)  # longer than the timeout: only its heartbeat keeps it
        with pytest.raises(LeaseBusy, match=f"pid {proc.pid},"):
            Lease(storage, "s", timeout_s=3).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        started = time.monotonic()
        lease = Lease(storage, "s", wait_s=30, timeout_s=3, poll_s=0.2).acquire()
        assert time.monotonic() - started < 10
        assert lease.took_over is not None and lease.took_over.pid == proc.pid
        lease.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_holder_whose_lease_was_taken_over_knows_it(storage):
    stalled = Lease(storage, "s", timeout_s=3).acquire()
    stalled._stop.set()  # its heartbeat stops, as in a process frozen by the OS
    stalled._thread.join()
    time.sleep(3.2)
    new = Lease(storage, "s", timeout_s=3).acquire()
    assert new.took_over.token == stalled.me.token
    assert not stalled.backend.renew(stalled.me, time.time())
    stalled.release()  # must not free the new holder's lease
    with pytest.raises(LeaseBusy):
        Lease(storage, "s", timeout_s=3).acquire()
    new.release()
