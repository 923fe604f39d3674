"""One rank of a trial (or of the cluster probe, `autotune.trials.probe`), in a process of its own.

The Ray worker that hosts a rank keeps a fork server with torch already imported and forks
one such process per trial. The rank's lifetime is then the trial's: it is reaped exactly
(the worker sees its exit status, so a kill is reported with its signal), it dies with its
worker, and no state of one trial can leak into the next. Items go back to the worker as
dicts over a pipe: rendezvous (rank 0), steps (rank 0), then a result or an error.
"""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the worker that started it goes away."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker's finally still kills it
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


# What a rank reports back of its environment: enough to see which devices and threads it used.
REPORTED_ENV: tuple[str, ...] = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "LOCAL_RANK")


def apply_environment(env: dict[str, str]) -> None:
    """Run with the task's environment, not the fork server's, before CUDA starts in this process.

    CUDA reads CUDA_VISIBLE_DEVICES once, when it initialises; the fork server never initialises
    it (it only imports torch), so a process forked from it still can choose its devices.
    """
    import torch

    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised before this rank's devices were set (in the fork server?)")
    os.environ.clear()
    os.environ.update(env)


def rank_process(cfg: Any, rank: int, world: int, addr: str, port: int, threads: int, conn: Any,
                 ip: str, env: dict[str, str] | None = None) -> None:
    _die_with_parent()
    import gc
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from autotune.redaction import error_line
    from autotune.schema import Status
    from trainables.moe.train import RankResult, backend_for, iter_run, resolve_device

    store = None
    try:
        if env is not None:
            apply_environment(env)
        torch.set_num_threads(max(1, threads))
        conn.send({"type": "placed", "rank": rank, "env": {k: os.environ.get(k) for k in REPORTED_ENV},
                   "torch_threads": torch.get_num_threads(), "nice": os.nice(0)})
        timeout = timedelta(seconds=cfg.timeout_s or 600)
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # index 0 of the devices this task was given
        if rank == 0:
            store = dist.TCPStore(ip, 0, world, is_master=True, wait_for_workers=False, timeout=timeout)
            conn.send({"type": "rendezvous", "addr": ip, "port": store.port})
        else:
            store = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
        dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world, timeout=timeout)
        from autotune.trials.probe import ProbeConfig, iter_probe

        for item in (iter_probe(cfg) if isinstance(cfg, ProbeConfig) else iter_run(cfg)):
            if isinstance(item, RankResult):
                dist.barrier()  # nobody leaves while a peer still needs it
                conn.send({"type": "result", "rank": rank, "memory": item.memory, "summary": item.summary})
            elif rank == 0:
                conn.send(item)
    except torch.OutOfMemoryError as exc:
        conn.send({"type": "error", "status": Status.OOM.value, "rank": rank,
                   "reason": f"rank {rank}: out of memory: {error_line(exc, 2000)}"})
    except Exception as exc:  # a trial's failure is data, not a crash of the study
        conn.send({"type": "error", "status": Status.CRASHED.value, "rank": rank,
                   "reason": f"rank {rank}: {type(exc).__name__}: {error_line(exc, 2000, empty='')}"[:2000]})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        del store
        gc.collect()
        conn.close()
