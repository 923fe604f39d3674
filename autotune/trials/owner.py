"""The study's owner of every trial's resources: placement groups and rank processes.

A trial's own `finally` is not enough to free what it holds. When Tune's scheduler stops a
function trial, the trial's thread keeps running until its next report and the coordinator
actor may be killed without running any cleanup (ray 2.60 `FunctionTrainable.reset_config`
gives the thread 2 s); a placement group made by that coordinator belongs to the job, so it
outlives the trial and later trials wait for resources nobody uses (ray#54305).

Here one actor per study, started by the driver on the head node, makes every trial's
placement group and is told every rank process as it starts. The driver releases a trial as
soon as Tune reports it ended, whatever the way (finished, failed, timed out, stopped by the
scheduler), and releases everything when the study ends or is interrupted. A released trial
is closed: a rank or a placement request that arrives late for it is refused and killed.
Placement groups made by this actor die with it, and it dies with the driver's job.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# Between killing a trial's rank processes and removing its placement group: long enough for
# each rank's task to see its process gone and return (it polls every 0.2 s), so that the warm
# worker hosting it is not killed with the group. The driver waits it out before admitting the
# next trial.
REMOVE_DELAY_S = 0.5
# The longest the study's start waits for its warm-up placement (a busy shared cluster may not
# place it at once; the first trial then pays the first placement itself).
WARM_WAIT_S = 5.0
# The longest a proposal that fits waits for Ray to see a freed group's resources as free.
FREE_WAIT_S = 5.0
# Trial coordinators and the owner run on the head node, beside the driver.
HEAD = {"node:__internal_head__": 0.001}
# The resources trial admission counts: what ranks take (a bundle's other keys pin it to a node).
ADMITTED = ("CPU", "GPU")


def start_time(pid: int) -> str | None:
    """When a process started (clock ticks since boot, /proc/PID/stat field 22), or None if it is
    gone: with its pid, it names the process even after the pid is reused."""
    f = _stat(pid)
    return f[19] if f is not None and len(f) > 19 else None


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, pgrp, ... starttime at 19)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_members(pgid: int, started: str) -> list[int]:
    """The processes of the group `pgid` whose leader started at `started`: every process in that
    group that started no earlier than the leader (a later group of a reused pid started later
    than all of them only if the whole first group was gone, and then none is ours)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat(int(entry))
            if f is not None and int(f[2]) == pgid and int(f[19]) >= int(started):
                out.append(int(entry))
    return out


def _kill(pid: int, started: str | None, group: bool = False) -> bool:
    """SIGKILL the process `pid` that started at `started`; never another one that reuses its pid.
    With `group`, `pid` leads its own process group (a user command run in a new session) and
    every process of that group goes too, also when the leader itself has already exited."""
    if started is None:
        return False
    victims = group_members(pid, started) if group else ([pid] if start_time(pid) == started else [])
    for v in victims:
        try:
            os.kill(v, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return bool(victims)


_kill_task = ray.remote(num_cpus=0, max_retries=0)(_kill)


@ray.remote(num_cpus=0, max_concurrency=16)
class _Owner:
    def __init__(self) -> None:
        self.node = ray.get_runtime_context().get_node_id()
        self.lock = threading.Lock()
        self.pgs: dict[int, list[PlacementGroup]] = {}
        self.ranks: dict[int, list[dict[str, Any]]] = {}
        self.closed: set[int] = set()
        self.freed: dict[int, list[dict[str, Any]]] = {}  # every rank process a trial ever had

    def reserve(self, number: int, bundles: list[dict[str, float]], strategy: str) -> PlacementGroup | None:
        """A placement group for trial `number`, or None when the trial was already released."""
        with self.lock:
            if number in self.closed:
                return None
            pg = placement_group(bundles, strategy=strategy)
            self.pgs.setdefault(number, []).append(pg)
            return pg

    def rank_started(self, number: int, rank: int, node: str, pid: int, started: str | None,
                     group: bool = False) -> bool:
        """Record a rank's process (with `group`: a process group it leads, e.g. a user command and
        every process it starts); False (and it is killed) if its trial was released."""
        entry = {"rank": rank, "node": node, "pid": pid, "started": started, "group": group}
        with self.lock:
            self.freed.setdefault(number, []).append(entry)
            if number not in self.closed:
                self.ranks.setdefault(number, []).append(entry)
                return True
        self._kill_ranks([entry])
        return False

    def finish(self, number: int, close: bool = False) -> list[dict[str, Any]]:
        """Free trial `number`'s ranks and placement groups now; `close` refuses it anything later.
        Returns every rank process the trial had (rank, node, pid)."""
        return self._free([number], close)[number]

    def finish_all(self) -> int:
        """Free everything still held (the study ends or is interrupted); returns how many trials."""
        with self.lock:
            numbers = sorted(set(self.pgs) | set(self.ranks))
        self._free(numbers, True)
        return len(numbers)

    def _free(self, numbers: list[int], close: bool) -> dict[int, list[dict[str, Any]]]:
        """Kill the trials' ranks, then remove their groups, and only then return: the driver admits
        the next trial once this returns, so the wait for a freed group is the driver's, before
        that trial starts, and never inside it. Ranks still running get REMOVE_DELAY_S to let their
        tasks return, so that the warm workers hosting them are not killed with the group."""
        pgs: list[PlacementGroup] = []
        ranks: list[dict[str, Any]] = []
        had: dict[int, list[dict[str, Any]]] = {}
        with self.lock:
            for n in numbers:
                pgs += self.pgs.pop(n, [])
                ranks += self.ranks.pop(n, [])
                if close:
                    self.closed.add(n)
                had[n] = list(self.freed.get(n, []))
        self._kill_ranks(ranks)
        if pgs and ranks:
            time.sleep(REMOVE_DELAY_S)
        self._remove(pgs)
        return had

    def warm(self) -> None:
        """Place and remove one tiny group: a fresh cluster's first placement is its slowest (over
        a second here), and this pays it at study start instead of inside the first trial."""
        pg = placement_group([{"CPU": 0.001}], strategy="PACK")
        try:
            pg.wait(timeout_seconds=WARM_WAIT_S)
        finally:
            self._remove([pg])

    def held(self) -> dict[int, dict[str, int]]:
        """What each trial holds now: placement groups and live rank processes (for tests)."""
        with self.lock:
            return {n: {"placement_groups": len(self.pgs.get(n, [])), "ranks": len(self.ranks.get(n, []))}
                    for n in set(self.pgs) | set(self.ranks)}

    def _remove(self, pgs: list[PlacementGroup]) -> None:
        for pg in pgs:
            try:
                remove_placement_group(pg)
            except Exception:  # already removed
                pass

    def _kill_ranks(self, ranks: list[dict[str, Any]]) -> None:
        for r in ranks:
            if r["node"] == self.node:
                _kill(r["pid"], r["started"], r.get("group", False))
            else:  # a rank on another node: kill it there
                _kill_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(r["node"], soft=False)
                                   ).remote(r["pid"], r["started"], r.get("group", False))


def demand(bundles: list[dict[str, float]]) -> dict[str, float]:
    """What a trial's placement group holds in all, by resource."""
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def admits(need: dict[str, float], running: list[dict[str, float]], capacity: dict[str, float]) -> bool:
    """Whether a trial needing `need` can be placed now beside the `running` ones on a cluster of
    `capacity`. A trial larger than the whole cluster is admitted: its placement then fails with
    its own message instead of waiting forever. Starting a trial only when it fits is what keeps
    its wait for placement near zero: queueing happens before a trial starts, not inside it."""
    if any(v > capacity.get(k, 0.0) + 1e-9 for k, v in need.items()):
        return True
    return all(v + sum(r.get(k, 0.0) for r in running) <= capacity.get(k, 0.0) + 1e-9 for k, v in need.items())


def free_now(need: dict[str, float], available: dict[str, float]) -> bool:
    """Whether Ray's current view of free resources (`ray.available_resources()`) holds `need`."""
    return all(available.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if k in ADMITTED)


class TrialOwner:
    """The driver's handle on the study's owner actor; trials find it by `name`."""

    def __init__(self) -> None:
        self.name = f"autotune-owner-{uuid.uuid4().hex[:12]}"
        self.actor = _Owner.options(name=self.name, resources=HEAD).remote()
        ray.get(self.actor.warm.remote())  # started (and placing) before any trial asks

    def release(self, number: int, close: bool = True) -> list[dict[str, Any]]:
        """Trial `number` ended (any way): kill its ranks, remove its placement groups and, with
        `close`, refuse it anything later (without: Tune runs it again after a failure)."""
        return ray.get(self.actor.finish.remote(number, close))

    def held(self) -> dict[int, dict[str, int]]:
        return ray.get(self.actor.held.remote())

    def close(self) -> None:
        """Free everything and end the actor (its placement groups would go with it anyway)."""
        try:
            ray.get(self.actor.finish_all.remote(), timeout=30)
        finally:
            ray.kill(self.actor)


def owner_handle(name: str | None) -> Any:
    """The owner actor a trial was given, or None (a trial run on its own, outside a study)."""
    return ray.get_actor(name) if name else None


def reserve(owner: Any, number: int, bundles: list[dict[str, float]], strategy: str) -> PlacementGroup | None:
    """The trial's placement group: made by the study's owner when there is one, else here."""
    if owner is None:
        return placement_group(bundles, strategy=strategy)
    return ray.get(owner.reserve.remote(number, bundles, strategy))


def give_back(owner: Any, number: int, pg: PlacementGroup | None) -> None:
    """The trial's own end: free what it holds (the owner still frees it if this never runs)."""
    if owner is None:
        if pg is not None:
            remove_placement_group(pg)
        return
    ray.get(owner.finish.remote(number))
