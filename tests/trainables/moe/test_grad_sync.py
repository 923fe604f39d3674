"""Bucketed gradient reduction: overlapped with backward, once per step, equal to the flat path.

Two real gloo ranks train a small stack of linear layers with different data; the bucketed
reduction must give exactly what the flat all-reduce after backward gives, start its first
buckets while backward still has layers left, wait for the last micro-batch of gradient
accumulation, and keep every gradient a view of its bucket across optimizer steps.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn

from tests.launch import _CTX, free_port
from trainables.moe.config import ParallelDims
from trainables.moe.grad_sync import BucketedGradSync, build_grad_sync

LAYERS = 4


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(LAYERS)])


def _backward(model: nn.Module, rank: int, micro: int) -> None:
    g = torch.Generator().manual_seed(100 * rank + micro)
    x = torch.randn(4, 16, generator=g)
    (model(x).square().mean() / 2).backward()


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dims, group = ParallelDims(dp=2), dist.group.WORLD
        report: dict = {}
        grads = {}
        for mode in ("flat", "bucketed"):
            model = _model()
            params = list(model.parameters())
            # A layer is 1 KiB of weight and 64 B of bias: this cap gives one bucket per layer.
            sync = build_grad_sync(mode, params, [False] * len(params), dims, group, group,
                                   bucket_mb=(16 * 16 + 16) * 4 / 2**20)
            opt = torch.optim.SGD(params, lr=0.1)
            if isinstance(sync, BucketedGradSync):
                report["buckets"] = len(sync.buckets)
                report["views"] = all(p.grad.untyped_storage().data_ptr() in
                                      {b.buffer.untyped_storage().data_ptr() for b in sync.buckets} for p in params)
                first_weight = model[0].weight  # its gradient is the last one backward produces
                seen: list[list[bool]] = []
                # Registered after the reducer's own hook, so it runs right after it.
                first_weight.register_post_accumulate_grad_hook(
                    lambda p: seen.append([b.launched for b in sync.buckets]))
            for step in range(2):
                sync.begin(2)
                for micro in range(2):
                    _backward(model, rank, 10 * step + micro)
                sync.finish()
                if step == 0:
                    grads[mode] = [p.grad.clone() for p in params]
                opt.step()
                opt.zero_grad(set_to_none=False)
            if isinstance(sync, BucketedGradSync):
                report["launched_when_first_layer_done"] = seen
                report["views_after_steps"] = all(
                    p.grad.untyped_storage().data_ptr() == b.buffer.untyped_storage().data_ptr()
                    for b in sync.buckets for p in b.params)
        report["equal"] = all(torch.equal(a, b) for a, b in zip(grads["flat"], grads["bucketed"]))
        mine = torch.cat([g.reshape(-1) for g in grads["bucketed"]])
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine)
        report["replicas_agree"] = torch.equal(both[0], both[1])
        report["nonzero"] = bool(mine.abs().sum() > 0)
        torch.save(report, out)
    finally:
        dist.destroy_process_group()


def test_bucketed_reduction_overlaps_backward_and_equals_the_flat_one():
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"{r}.pt") for r in range(2)]
        procs = [_CTX.Process(target=_rank, args=(r, port, outs[r])) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.kill()
        assert [p.exitcode for p in procs] == [0, 0]
        reports = [torch.load(o) for o in outs]
    for rep in reports:
        assert rep["buckets"] == LAYERS  # weight + bias of one layer per bucket
        assert rep["views"] and rep["views_after_steps"]
        # Two steps of two micro-batches: the first layer's hook fires four times. After the
        # first micro-batch nothing is launched (accumulation); after the second, every later
        # layer's bucket is already on its way while the first layer's bias is still pending.
        first_mb = rep["launched_when_first_layer_done"][0]
        last_mb = rep["launched_when_first_layer_done"][1]
        assert not any(first_mb)
        assert last_mb[:LAYERS - 1] == [True] * (LAYERS - 1)
        assert rep["equal"] and rep["replicas_agree"] and rep["nonzero"]
