"""One writer per study: the lease beside a journal and in a database, with real holder processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autotune.study.lease import Lease, LeaseBusy, host_identity

pytestmark = pytest.mark.alone  # heartbeats and waits of a few seconds: nothing beside it
REPO = Path(__file__).resolve().parents[3]
HOLD = """
import sys, time
from autotune.study.lease import Lease
lease = Lease(sys.argv[1], "s", timeout_s=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def postgres():
    from tests.services import postgres_bindir, start_postgres

    if postgres_bindir() is None:
        pytest.skip("no PostgreSQL server binaries: sudo apt-get install -y postgresql (make test does)")
    pg = start_postgres()
    yield pg
    pg.stop()


@pytest.fixture(params=["journal", "sqlite", "postgresql"])
def storage(request, tmp_path) -> str:
    if request.param == "journal":
        return str(tmp_path / "s" / "optuna.journal")
    if request.param == "postgresql":
        pg = request.getfixturevalue("postgres")
        return pg.create_database("lease_" + os.urandom(4).hex())
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
    assert f"host {host_identity()} pid {os.getpid()}, started " in text and "changed nothing" in text
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


SLOW = """
import sys, time
for i in range(8):
    time.sleep(0.25)
    print(f"step {i} time 0.25", flush=True)
"""


def test_a_run_whose_lease_is_taken_while_it_runs_stops_within_a_heartbeat_and_writes_nothing_more(tmp_path):
    """A live run whose heartbeat is judged stale (here: taken by a taker with a tiny timeout)
    is fenced: within one heartbeat it launches nothing and records nothing; it exits 3 naming
    the new holder, and the trial it had in flight is left for the new holder to close."""
    import optuna
    import yaml

    (tmp_path / "slow.py").write_text(SLOW)
    journal = tmp_path / "runs" / "fenced" / "optuna.journal"
    space = {
        "model": {"preset": "tiny"},
        "cluster": {"ranks": 1, "device": "cpu", "memory_gb": 1.0, "cpus_per_rank": 1},
        "search": {"ep": [1], "tp": [1], "pp": [1], "world_sizes": [1], "micro_batch_size": [1, 2, 4, 8],
                   "global_batch_size": 8, "seq_len": 32, "precision": ["fp32"], "recompute": ["none", "full"]},
        "budget": {"trials": 8, "warmup_steps": 1, "measure_steps": 3, "trial_timeout_s": 60, "remeasure_share": 0},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "fenced"},
        "study": {"name": "fenced", "output_dir": str(tmp_path / "runs"), "lease_timeout_s": 4},
        "trainable": {"command": [sys.executable, "slow.py"], "metrics_regex": {"step_time_s": r"time (\S+)"},
                      "cwd": str(tmp_path)},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    run = subprocess.Popen([sys.executable, "-m", "autotune.cli", "run", "space.yaml", "--plain"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    def trials() -> list:
        if not journal.exists():
            return []
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        try:
            return optuna.load_study(study_name="fenced", storage=storage).get_trials(deepcopy=False)
        except KeyError:  # the journal exists before the study does
            return []

    deadline = time.monotonic() + 120
    while not (any(t.state.is_finished() for t in trials()) and any(t.state.name == "RUNNING" for t in trials())):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.2)
    taker = None
    while taker is None or taker.took_over is None:  # the holder is alive: only a stale-looking heartbeat is taken
        if taker is not None:
            taker.release()
            taker = None
        try:
            taker = Lease(str(journal), "fenced", timeout_s=0.05).acquire()
        except LeaseBusy:  # asked within 0.05 s of a heartbeat: the holder looks alive, ask again
            time.sleep(0.01)
    taken_at = time.time()
    try:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 3, out[-2000:] + err[-2000:]
        assert f"lost the lease of study 'fenced' to host {host_identity()} pid {os.getpid()}" in err, err[-2000:]
        heartbeat = 4 / 4  # Lease._beat's interval: study.lease_timeout_s / 4
        late = [(t.number, t.state.name) for t in trials()
                if t.datetime_complete is not None and t.datetime_complete.timestamp() > taken_at + heartbeat + 0.5]
        assert not late, late  # nothing finished by the fenced run after it knew
        left = [t.number for t in trials() if t.state.name == "RUNNING"]
        assert left, "the trial in flight is the new holder's to close"
        assert len(trials()) < 8  # it launched nothing more
    finally:
        taker.release()


def test_on_postgresql_heartbeats_use_the_databases_clock_and_two_racing_takers_leave_one_winner(postgres,
                                                                                                 monkeypatch):
    import threading

    import autotune.study.lease as lease_module

    url = postgres.create_database("lease_clock")
    real = time.time
    monkeypatch.setattr(lease_module.time, "time", lambda: real() - 3600)  # a holder whose clock is an hour slow
    slow = Lease(url, "s", timeout_s=3).acquire()
    monkeypatch.setattr(lease_module.time, "time", real)
    with pytest.raises(LeaseBusy):  # by its own clock it beat an hour ago; by the database's, just now
        Lease(url, "s", timeout_s=3).acquire()

    slow._stop.set()  # now it stalls for real
    slow._thread.join()
    time.sleep(3.3)
    start, won, lost = threading.Barrier(2), [], []

    def take() -> None:
        start.wait()
        try:
            won.append(Lease(url, "s", timeout_s=3).acquire())
        except LeaseBusy:
            lost.append(1)

    takers = [threading.Thread(target=take) for _ in range(2)]
    for t in takers:
        t.start()
    for t in takers:
        t.join()
    assert len(won) == 1 and len(lost) == 1 and won[0].took_over.token == slow.me.token
    won[0].release()
