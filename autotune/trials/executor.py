"""One trial's ranks on Ray: a placement group holds them, warm worker processes run them.

A fresh Ray Train `TorchTrainer` per trial costs ~24 s on a 2-core machine before its first
step (FACTS.md). Here every rank is a plain Ray task scheduled into the trial's own placement
group bundle; Ray's worker pool hands it a process that already ran an earlier rank, so torch
is imported once per worker, not once per trial, and a trial only pays for a new process
group (TCPStore on rank 0's node, on a port the OS picks) and for building its model. The
placement group is asked for by the trial itself, so trials of any world size keep Tune's
coordinator actor reusable, and it works across nodes: rank 0 reports its node's address, the
other ranks dial it. Within a study the placement group and every rank process belong to the
study's owner (`autotune.trials.owner`), which frees them however the trial ends.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, NodeDiedError, RayError, RayTaskError, TaskCancelledError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from autotune.redaction import error_line
from autotune.schema import Status
from autotune.trials.outcome import TrialOutcome, wait_for_placement
from autotune.trials.owner import give_back, owner_handle, reserve, start_time
from autotune.trials.placement import Placement, single
from trainables.moe.run_config import RunConfig



_context: Any = None


def _fork_context():
    """This worker's fork server, with torch and the trainable imported once (started lazily)."""
    global _context
    if _context is None:
        import multiprocessing

        _context = multiprocessing.get_context("forkserver")
        # torch._dynamo too: torch imports it lazily on a rank's first parameter init (through its
        # compile-disable wrappers), which would cost every trial over a second.
        _context.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed",
                                         "torch.distributed.pipelining",
                                         "torch.distributed.fsdp.sharded_grad_scaler",
                                         "trainables.moe.train", "autotune.trials.rank_process"])
    return _context


def _exit_text(pid: int, code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"process {pid} was killed by {name}"
    return f"process {pid} exited with code {code} before reporting"


def task_environment(threads: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The environment a rank's process must run with: this task's, not the fork server's.

    The fork server was started once, with the environment of this worker's first task; Ray
    reuses workers, so a later task may hold other GPUs and another CPU share. The accelerator
    ids Ray assigned to this task are set explicitly (CUDA_VISIBLE_DEVICES also where Ray was
    told not to set it), with the thread count and a local rank of 0 (the task sees only its
    own devices)."""
    env = dict(os.environ)
    ids = {k: [str(i) for i in v] for k, v in ray.get_runtime_context().get_accelerator_ids().items()}
    if ids.get("GPU"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids["GPU"])
    env["OMP_NUM_THREADS"] = str(threads)
    env["LOCAL_RANK"] = "0"
    return env, ids


def _rank_main(cfg: RunConfig, rank: int, world: int, addr: str, port: int, threads: int,
               owner: str | None = None, number: int = -1):
    """One rank as a streaming Ray task: fork the rank's process, tell the study's owner about it,
    relay its items, reap it."""
    from autotune.trials.rank_process import rank_process

    ip = ray.util.get_node_ip_address()
    node = ray.get_runtime_context().get_node_id()
    env, accelerators = task_environment(threads)
    ctx = _fork_context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=rank_process, args=(cfg, rank, world, addr, port, threads, send, ip, env), daemon=True)
    proc.start()
    send.close()
    if owner is not None:  # a trial the study already released gets its process killed here
        ray.get(owner_handle(owner).rank_started.remote(number, rank, node, proc.pid, start_time(proc.pid)))
    yield {"type": "started", "rank": rank, "pid": proc.pid, "node": node, "ip": ip, "worker_pid": os.getpid(),
           "accelerators": {k: v for k, v in accelerators.items() if v}}
    try:
        while True:
            if recv.poll(0.2):
                try:
                    item = recv.recv()
                except EOFError:  # the process closed its end: it exited, cleanly or not
                    break
                yield item
                if item["type"] in ("result", "error"):
                    return
            elif not proc.is_alive():
                break
        proc.join(10)
        yield {"type": "error", "status": Status.CRASHED.value, "rank": rank,
               "reason": f"rank {rank}: {_exit_text(proc.pid, proc.exitcode)}"}
    finally:
        if proc.is_alive():  # cancelled, or a peer failed: nothing of this trial may outlive it
            proc.kill()
        proc.join(10)
        recv.close()


rank_task = ray.remote(max_retries=0)(_rank_main)


CANCEL_GRACE_S = 5.0
# After a first error, how long to keep listening to the other ranks: when a rank dies, its
# peers fail too (connection reset), and the report must name the cause, not a symptom.
FAILURE_GRACE_S = 3.0
_PEER_SYMPTOMS = ("connection reset", "connection closed", "closed by peer", "read error", "broken pipe",
                  "timed out", "timeout", "socket", "nccl", "gloo")


def _root_cause(errors: list[tuple[Status, str]]) -> tuple[Status, str]:
    """The most causal of several ranks' errors: a lost node or dead process, then out of
    memory, then a plain exception, and only then a peer's communication failure."""
    def weight(error: tuple[Status, str]) -> int:
        status, reason = error
        text = reason.lower()
        if status == Status.NODE_LOST:
            return 5
        if "was killed by" in text or "exited with code" in text or "ray worker died" in text:
            return 4
        if status == Status.OOM:
            return 3
        return 1 if any(s in text for s in _PEER_SYMPTOMS) else 2
    return max(errors, key=weight)
# A node whose raylet died keeps reporting alive until the GCS health checks give up on it.
NODE_DEATH_WAIT_S = float(os.environ.get("AUTOTUNE_NODE_DEATH_WAIT_S", "30"))


def _node_alive(node_id: str | None) -> bool | None:
    if not node_id:
        return None
    for n in ray.nodes():
        if n.get("NodeID") == node_id:
            return bool(n.get("Alive"))
    return False


def _classify(rank: int, exc: BaseException, node_id: str | None) -> tuple[Status, str]:
    """A rank's task failed in Ray itself: its node went away, or its worker process died.

    Workers on a lost node fail at once, but the node is only declared dead after the GCS
    health checks fail, so a dead worker waits (up to NODE_DEATH_WAIT_S) for that verdict.
    """
    first = error_line(exc, 2000)
    lost = isinstance(exc, NodeDiedError)
    if not lost and not isinstance(exc, RayTaskError) and node_id:
        deadline = time.monotonic() + NODE_DEATH_WAIT_S
        while not lost and time.monotonic() < deadline:
            lost = _node_alive(node_id) is False
            if not lost:
                time.sleep(1.0)
    if lost:
        return Status.NODE_LOST, f"rank {rank}: node {str(node_id)[:12]} was lost ({first})"
    if isinstance(exc, RayTaskError):
        return Status.CRASHED, f"rank {rank}: {first}"
    return Status.CRASHED, f"rank {rank}: its Ray worker died ({type(exc).__name__}: {first})"


def run_trial(cfg: RunConfig, placement: Placement | dict[str, float], strategy: str = "PACK",
              timeout_s: float = 600.0, on_step: Callable[[dict[str, Any]], None] | None = None,
              placement_wait_s: float | None = None,
              on_event: Callable[[dict[str, Any]], None] | None = None,
              owner: str | None = None, number: int = -1) -> TrialOutcome:
    """Reserve the ranks (a placement, or one bundle of these resources per rank), run each in
    its bundle, and always give them back. With `owner` (the study's `autotune.trials.owner` actor) the
    placement group and rank processes are the owner's, which frees them even if this never
    returns.

    The time budget starts once the ranks are reserved: waiting for another trial to free
    them is queueing, not this trial's cost (it may last `placement_wait_s`). Whatever ends the
    trial (success, a failed rank, a hang), no rank process outlives it.
    """
    start = time.monotonic()
    world = cfg.dims.world_size
    outcome = TrialOutcome(Status.OK)
    if not isinstance(placement, Placement):
        placement = single(placement, strategy)
    bundle, strategy = placement.rank, placement.strategy
    handle = owner_handle(owner)
    pg = reserve(handle, number, placement.bundles(world), placement.strategy)
    gens: dict[int, Any] = {}
    finished: set[int] = set()
    started: dict[int, dict[str, Any]] = {}
    try:
        unplaced = wait_for_placement(pg, timeout_s, placement_wait_s, outcome)
        if on_event is not None:
            on_event({"type": "reserved", "wait_s": outcome.placement_wait_s})
        if unplaced is not None:
            outcome.status = Status.CRASHED
            outcome.reason = (f"the cluster could not place {world} ranks of {bundle} in groups of {placement.group} "
                              f"({strategy}) within {unplaced:.0f} s")
            return outcome
        deadline = time.monotonic() + timeout_s
        threads = max(1, int(bundle.get("CPU", 1)))

        def launch(rank: int, addr: str, port: int):
            return rank_task.options(
                num_returns="streaming", num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=placement.bundle_of(rank)),
            ).remote(cfg, rank, world, addr, port, threads, owner, number)

        gens[0] = launch(0, "", 0)
        errors: list[tuple[Status, str]] = []
        failing_until: float | None = None
        while len(finished) < world:
            active = [g for r, g in gens.items() if r not in finished]
            now = time.monotonic()
            if failing_until is not None and now >= failing_until:
                break
            remaining = (failing_until or deadline) - now
            if remaining <= 0:
                outcome.status = Status.TIMEOUT
                outcome.reason = (f"trial exceeded its {timeout_s:.0f} s budget; ranks still running: "
                                  f"{sorted(set(range(world)) - finished)}")
                return outcome
            ready, _ = ray.wait(active, num_returns=1, timeout=remaining)
            for gen in ready:
                rank = next(r for r, g in gens.items() if g is gen)
                try:
                    ref = next(gen)
                except StopIteration:
                    finished.add(rank)
                    continue
                try:
                    item = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
                except GetTimeoutError:
                    continue
                except RayError as exc:
                    finished.add(rank)
                    errors.append(_classify(rank, exc, started.get(rank, {}).get("node")))
                    failing_until = failing_until or time.monotonic() + FAILURE_GRACE_S
                    continue
                if on_event is not None:
                    on_event(item)
                kind = item.get("type")
                if kind == "started":
                    started[rank] = {k: v for k, v in item.items() if k != "type"}
                elif kind == "placed":  # what the rank's process runs with (devices, threads, priority)
                    started.setdefault(rank, {"rank": rank}).update(env=item["env"], torch_threads=item["torch_threads"],
                                                                    nice=item.get("nice"))
                elif kind == "rendezvous":
                    for r in range(1, world):
                        gens[r] = launch(r, item["addr"], item["port"])
                elif kind == "step":
                    outcome.steps.append(item)
                    if on_step is not None:
                        on_step(item)
                elif kind == "result":
                    started.setdefault(rank, {"rank": rank})["memory"] = item["memory"]
                    if item.get("summary") is not None:
                        outcome.summary = item["summary"]
                elif kind == "error":
                    errors.append((Status(item["status"]), item["reason"]))
                    failing_until = failing_until or time.monotonic() + FAILURE_GRACE_S
        if errors:
            outcome.status, outcome.reason = _root_cause(errors)
            outcome.summary = None
        return outcome
    finally:
        outcome.ranks = [started[r] for r in sorted(started)]
        _stop(gens, finished)
        give_back(handle, number, pg)
        outcome.duration_s = time.monotonic() - start


def _stop(gens: dict[int, Any], finished: set[int]) -> None:
    """Cancel ranks still running: politely first (their worker kills the rank's process and
    stays warm for the next trial), then by killing the worker if that does not end them."""
    pending = [g for r, g in gens.items() if r not in finished]
    for gen in pending:
        try:
            ray.cancel(gen, force=False)
        except Exception:
            pass
    deadline = time.monotonic() + CANCEL_GRACE_S
    while pending and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
        still = []
        for gen in ready:
            try:
                ray.get(next(gen), timeout=1)
                still.append(gen)  # it produced another item: not finished yet
            except StopIteration:
                pass
            except (TaskCancelledError, RayError, GetTimeoutError):
                pass
        pending += still
    for gen in pending:
        try:
            ray.cancel(gen, force=True)
        except Exception:
            pass
