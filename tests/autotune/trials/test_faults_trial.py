"""Faults inside one trial, injected for real: a killed rank, a hung rank, a rank out of memory.

The trial must end with the right status and reason, leave no process behind (checked by pid),
and leave the warm workers able to run the next trial.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import pytest
import ray

from autotune.schema import Status
from autotune.study.connect import WORKER_NICENESS
from autotune.trials.executor import run_trial
from tests.faults import alive, wait_gone
from trainables.moe.run_config import RunConfig

pytestmark = pytest.mark.slow

# Long enough that a fault always lands mid-run; a fault ends it early anyway.
LONG = RunConfig(model="tiny", dp=2, micro_batch_size=2, global_batch_size=4, seq_len=32, steps=500,
                 warmup_steps=1, memory_probe=False, timeout_s=120)
BUNDLE = {"CPU": 1.0}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # ranks at normal priority, as a study's own Ray runs them (autotune.study.connect.WORKER_NICENESS)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR",
             _system_config={"worker_niceness": WORKER_NICENESS})
    yield
    ray.shutdown()


def _fault_at_first_step(action):
    """on_event hook: remember every rank's process, act on one once rank 0 reports a step."""
    pids: dict[int, int] = {}
    done: list[int] = []

    def on_event(item):
        if item["type"] == "started":
            pids[item["rank"]] = item["pid"]
        elif item["type"] == "step" and not done and len(pids) == LONG.dims.world_size:
            action(pids[1])
            done.append(pids[1])

    return pids, done, on_event


def _next_trial_runs():
    out = run_trial(replace(LONG, steps=2), BUNDLE, timeout_s=120)
    assert out.status == Status.OK, out.reason
    assert out.summary["tokens_per_s"] > 0


def test_a_killed_rank_crashes_the_trial_with_rank_and_signal_and_nothing_survives():
    pids, done, on_event = _fault_at_first_step(lambda pid: os.kill(pid, signal.SIGKILL))
    out = run_trial(LONG, BUNDLE, timeout_s=120, on_event=on_event)
    assert done, "the fault was never injected"
    assert out.status == Status.CRASHED
    assert "rank 1" in out.reason and "SIGKILL" in out.reason, out.reason
    assert wait_gone(list(pids.values()), 20) == []
    assert {r["rank"] for r in out.ranks} == {0, 1} and all(r["pid"] in pids.values() for r in out.ranks)
    _next_trial_runs()


def test_a_hung_rank_times_out_within_its_budget_and_every_rank_is_reaped():
    pids, done, on_event = _fault_at_first_step(lambda pid: os.kill(pid, signal.SIGSTOP))
    budget = 20.0
    start = time.monotonic()
    out = run_trial(LONG, BUNDLE, timeout_s=budget, on_event=on_event)
    elapsed = time.monotonic() - start
    assert done
    assert out.status == Status.TIMEOUT and "budget" in out.reason, out.reason
    assert elapsed < budget + 20, f"took {elapsed:.0f} s for a {budget:.0f} s budget"
    assert wait_gone(list(pids.values()), 20) == []
    _next_trial_runs()


def test_a_rank_over_its_memory_limit_is_out_of_memory():
    small = replace(LONG, steps=2, memory_limit_bytes=4_000_000)  # below the parameters + optimizer alone
    out = run_trial(small, BUNDLE, timeout_s=120)
    assert out.status == Status.OOM, out.reason
    assert "out of memory" in out.reason and "memory limit" in out.reason
    assert all(not alive(r["pid"]) for r in out.ranks)
    _next_trial_runs()
