"""One trial's ranks on Ray: a placement group holds them, warm worker processes run them.

A fresh Ray Train `TorchTrainer` per trial costs ~24 s on a 2-core machine before its first
step (FACTS.md). Here every rank is a plain Ray task scheduled into the trial's own placement
group bundle; Ray's worker pool hands it a process that already ran an earlier rank, so torch
is imported once per worker, not once per trial, and a trial only pays for a new process
group (TCPStore on rank 0's node, on a port the OS picks) and for building its model. The
placement group is created and removed by the trial itself, so trials of any world size keep
Tune's coordinator actor reusable, and it works across nodes: rank 0 reports its node's
address, the other ranks dial it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from autotune.schema import Status
from trainables.moe.run_config import RunConfig



def _rank_main(cfg: RunConfig, rank: int, world: int, addr: str, port: int, threads: int):
    """Body of one rank (a streaming Ray task): rendezvous, train, report; never raises."""
    import gc
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from trainables.moe.train import RankResult, backend_for, iter_run, resolve_device

    torch.set_num_threads(max(1, threads))
    ip = ray.util.get_node_ip_address()
    node = ray.get_runtime_context().get_node_id()
    timeout = timedelta(seconds=cfg.timeout_s or 600)
    store = None
    try:
        if rank == 0:
            store = dist.TCPStore(ip, 0, world, is_master=True, wait_for_workers=False, timeout=timeout)
            yield {"type": "rendezvous", "addr": ip, "port": store.port}
        else:
            store = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
        device = resolve_device(cfg.device)
        dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world, timeout=timeout)
        for item in iter_run(cfg):
            if isinstance(item, RankResult):
                yield {"type": "result", "rank": rank, "node": node, "ip": ip, "pid": os.getpid(),
                       "memory": item.memory, "summary": item.summary}
            elif rank == 0:
                yield item
        dist.barrier()
    except torch.OutOfMemoryError as exc:
        yield {"type": "error", "status": Status.OOM.value, "rank": rank,
               "reason": f"rank {rank}: out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # a trial's failure is data, not a crash of the study
        yield {"type": "error", "status": Status.CRASHED.value, "rank": rank,
               "reason": f"rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        del store
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


rank_task = ray.remote(max_retries=0)(_rank_main)


@dataclass
class TrialOutcome:
    status: Status
    reason: str = ""
    summary: dict[str, Any] | None = None  # rank 0's summary when the run finished
    ranks: list[dict[str, Any]] = field(default_factory=list)  # rank, node, ip, pid, memory
    steps: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0


def _describe_failure(rank: int, exc: BaseException) -> tuple[Status, str]:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), type(exc).__name__)
    if isinstance(exc, RayTaskError):
        return Status.CRASHED, f"rank {rank}: {first}"
    return Status.CRASHED, f"rank {rank}: {type(exc).__name__}: {first}"


def run_trial(cfg: RunConfig, bundle: dict[str, float], strategy: str = "PACK", timeout_s: float = 600.0,
              on_step: Callable[[dict[str, Any]], None] | None = None,
              placement_wait_s: float | None = None) -> TrialOutcome:
    """Reserve `world` bundles, run every rank in one, and always give them back.

    The time budget starts once the ranks are reserved: waiting for another trial to free
    them is queueing, not this trial's cost (it may last `placement_wait_s`).
    """
    start = time.monotonic()
    world = cfg.dims.world_size
    outcome = TrialOutcome(Status.OK)
    pg = placement_group([dict(bundle)] * world, strategy=strategy)
    gens: dict[int, Any] = {}
    finished: set[int] = set()
    try:
        wait = placement_wait_s if placement_wait_s is not None else timeout_s
        if not pg.wait(timeout_seconds=wait):
            outcome.status = Status.CRASHED
            outcome.reason = f"the cluster could not place {world} ranks of {bundle} ({strategy}) within {wait:.0f} s"
            return outcome
        deadline = time.monotonic() + timeout_s
        threads = max(1, int(bundle.get("CPU", 1)))

        def launch(rank: int, addr: str, port: int):
            return rank_task.options(
                num_returns="streaming", num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(cfg, rank, world, addr, port, threads)

        gens[0] = launch(0, "", 0)
        while len(finished) < world:
            active = [g for r, g in gens.items() if r not in finished]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome.status = Status.TIMEOUT
                outcome.reason = (f"trial exceeded its {timeout_s:.0f} s budget; ranks still running: "
                                  f"{sorted(set(gens) - finished) or 'not started'}")
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
                    outcome.status, outcome.reason = _describe_failure(rank, exc)
                    return outcome
                kind = item.get("type")
                if kind == "rendezvous":
                    for r in range(1, world):
                        gens[r] = launch(r, item["addr"], item["port"])
                elif kind == "step":
                    outcome.steps.append(item)
                    if on_step is not None:
                        on_step(item)
                elif kind == "result":
                    outcome.ranks.append({k: v for k, v in item.items() if k not in ("type", "summary")})
                    if item.get("summary") is not None:
                        outcome.summary = item["summary"]
                elif kind == "error":
                    outcome.status, outcome.reason = Status(item["status"]), item["reason"]
                    return outcome
        outcome.ranks.sort(key=lambda r: r["rank"])
        return outcome
    finally:
        # Ranks still running (hung, or waiting for a failed peer) are killed, not abandoned.
        for rank, gen in gens.items():
            if rank not in finished:
                try:
                    ray.cancel(gen, force=True)
                except Exception:
                    pass
        remove_placement_group(pg)
        outcome.duration_s = time.monotonic() - start


def tune_trial(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: a thin coordinator that imports no torch.

    Measured steps are reported as they happen (ASHA can stop a slow layout early); the last
    report carries the whole outcome.
    """
    from ray import tune

    measured = 0

    def on_step(step: dict[str, Any]) -> None:
        nonlocal measured
        if step["phase"] == "measure":
            measured += 1
            tune.report({"tokens_per_s": step["tokens_per_s"], "step_time_s": step["step_time_s"],
                         "loss": step["loss"], "step": step["step"], "measured_steps": measured})

    outcome = run_trial(config["run"], config["bundle"], config["strategy"], config["timeout_s"], on_step,
                        config.get("placement_wait_s"))
    # Tune flattens nested results; the outcome travels as one JSON string instead.
    tune.report({
        "autotune_final": True, "status": outcome.status.value, "measured_steps": measured,
        "tokens_per_s": outcome.summary["tokens_per_s"] if outcome.summary is not None else 0.0,
        "outcome": json.dumps({"status": outcome.status.value, "reason": outcome.reason,
                               "summary": outcome.summary, "ranks": outcome.ranks, "steps": outcome.steps,
                               "duration_s": outcome.duration_s}),
    })
