"""The study's owner frees a trial's placement group and rank processes itself, whether or not the
trial's own code ever gets to its cleanup: checked with Ray's state API and by pid."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import ray
from ray.util import placement_group_table

from autotune.study.connect import WORKER_NICENESS
from autotune.trials.owner import FREE_WAIT_S, TrialOwner, free_now, owner_handle, reserve, start_time
from tests.faults import alive, wait_gone

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # wall-clock bounds: nothing beside it


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             _system_config={"worker_niceness": WORKER_NICENESS})  # the owner's priority in a study
    yield
    ray.shutdown()


def _live_groups() -> list[str]:
    """Placement groups Ray's control store still holds (any state but REMOVED)."""
    return [pid for pid, g in placement_group_table().items() if g["state"] != "REMOVED"]


def _sleeper() -> multiprocessing.Process:
    proc = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(120,), daemon=True)
    proc.start()
    return proc


def _register(owner: TrialOwner, number: int, proc: multiprocessing.Process) -> bool:
    node = ray.get_runtime_context().get_node_id()
    return ray.get(owner_handle(owner.name).rank_started.remote(number, 0, node, proc.pid, start_time(proc.pid)))


def test_release_kills_ranks_and_removes_the_placement_group_the_trial_never_freed():
    owner = TrialOwner()
    try:
        handle = owner_handle(owner.name)
        pg = reserve(handle, 7, [{"CPU": 1.0}], "PACK")
        assert pg.wait(timeout_seconds=30)
        proc = _sleeper()
        assert _register(owner, 7, proc)
        assert owner.held() == {7: {"placement_groups": 1, "ranks": 1}}
        assert pg.id.hex() in _live_groups()

        freed = owner.release(7)  # what the driver does when Tune says the trial ended
        # Then, as the driver's admission does, wait (at most FREE_WAIT_S) for Ray's view to show
        # the group's resources free: a whole-cluster group asked for then places within a second.
        # Asked for at once, before that view catches up (a tenth of a second here), Ray's own
        # retries place it about a second later.
        need = {"CPU": 2.0}
        deadline = time.monotonic() + FREE_WAIT_S
        while not free_now(need, ray.available_resources()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert free_now(need, ray.available_resources())
        t0 = time.monotonic()
        other = reserve(handle, 8, [need], "PACK")
        assert other.wait(timeout_seconds=5)
        assert time.monotonic() - t0 < 1.0

        assert [r["pid"] for r in freed] == [proc.pid]
        assert wait_gone([proc.pid], timeout=5) == []
        assert pg.id.hex() not in _live_groups()
        assert owner.held() == {8: {"placement_groups": 1, "ranks": 0}}
    finally:
        owner.close()
    assert _live_groups() == []


def test_a_released_trial_is_refused_later_ranks_and_placements():
    owner = TrialOwner()
    try:
        owner.release(3)
        late = _sleeper()  # a rank that starts after the scheduler stopped its trial
        assert _register(owner, 3, late) is False
        assert wait_gone([late.pid], timeout=5) == []
        assert reserve(owner_handle(owner.name), 3, [{"CPU": 1.0}], "PACK") is None
    finally:
        owner.close()


def test_closing_the_owner_frees_every_trial_and_spares_a_reused_pid():
    owner = TrialOwner()
    procs = [_sleeper() for _ in range(2)]
    bystander = _sleeper()
    try:
        for n, p in enumerate(procs):
            assert reserve(owner_handle(owner.name), n, [{"CPU": 0.5}], "PACK").wait(timeout_seconds=30)
            assert _register(owner, n, p)
        # A rank recorded with another start time is another process that reuses a pid: never killed.
        node = ray.get_runtime_context().get_node_id()
        ray.get(owner_handle(owner.name).rank_started.remote(9, 0, node, bystander.pid, "1"))
    finally:
        owner.close()  # the study ends, or is interrupted
    assert wait_gone([p.pid for p in procs], timeout=5) == []
    assert _live_groups() == []
    assert alive(bystander.pid)
    bystander.kill()


def test_a_user_commands_whole_process_group_goes_even_after_its_leader_exited():
    """A command trial's program runs in its own session and may start processes of its own
    (torchrun's workers): the owner kills every process of that group, not only the one it saw."""
    import subprocess

    owner = TrialOwner()
    # The leader starts two workers in its group, then exits at once (as a launcher may).
    leader = subprocess.Popen(["sh", "-c", "sleep 120 & sleep 120 & echo started"], start_new_session=True,
                              stdout=subprocess.PIPE, text=True)
    started = start_time(leader.pid)
    outsider = _sleeper()  # not in the group
    try:
        assert leader.stdout.readline().strip() == "started"
        leader.wait(timeout=10)
        members = [int(p) for p in subprocess.run(["pgrep", "-g", str(leader.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert len(members) == 2 and leader.pid not in members
        node = ray.get_runtime_context().get_node_id()
        assert ray.get(owner_handle(owner.name).rank_started.remote(4, 0, node, leader.pid, started, True))
        freed = owner.release(4)
        assert [(r["pid"], r["group"]) for r in freed] == [(leader.pid, True)]
        assert wait_gone(members, timeout=5) == []
        assert alive(outsider.pid)
    finally:
        owner.close()
        outsider.kill()
