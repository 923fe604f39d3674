"""Run the trainable on N local gloo ranks from a test, in forked processes.

A forkserver that has already imported torch and the trainable makes each rank start in
milliseconds instead of paying `import torch` per process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable

import torch

from trainables.moe.train import RankResult, RunConfig

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "trainables.moe.train"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(cfg: RunConfig, rank: int, world: int, port: int, keep_params: bool, out: str,
               setup: Callable[[], None] | None) -> None:
    torch.set_num_threads(1)
    from trainables.moe.train import run_rank

    if setup is not None:
        setup()

    result = run_rank(cfg, rank, world, "127.0.0.1", port, keep_params=keep_params)
    torch.save(result, out)


def launch(cfg: RunConfig, keep_params: bool = False, timeout: float = 180.0,
           setup: Callable[[], None] | None = None) -> list[RankResult]:
    """All ranks' results, in rank order; raises if any rank fails or hangs. `setup` (a
    module-level function) runs in every rank before it starts: a test's deliberate fault."""
    world = cfg.dims.world_size
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
        procs = [_CTX.Process(target=_rank_main, args=(cfg, r, world, port, keep_params, outs[r], setup))
                 for r in range(world)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join(timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        codes = [p.exitcode for p in procs]
        if any(c != 0 for c in codes):
            raise RuntimeError(f"ranks exited with codes {codes} for {cfg.dims.name()}")
        return [torch.load(Path(o), weights_only=False) for o in outs]
