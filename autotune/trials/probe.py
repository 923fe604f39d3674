"""The cluster probe's ranks: what a study measures of its cluster before the first trial.

Run by the same rank processes as a trial (`autotune.trials.rank_process`, launched by
`autotune.trials.executor.run_trial`), over the same backend (gloo on CPU, NCCL on GPUs):

* on rank 0's device, the rate of the dense and grouped GEMM shapes the candidates run, per
  precision (`bf16` as autocast runs it, both operands cast from fp32 on every call, as a step
  pays it; `bf16-params` on bf16 operands), and the device's copy bandwidth;
* on rank 0's device, a layer's fixed cost: one block of the model (its experts, router and
  attention, every width shrunk to a few values, so that no FLOPs count) forward and backward on a
  few tokens, the kernel launches and framework work a micro-batch pays per layer whatever its size;
* over groups of the sizes the candidates use, the time of an all-reduce, an all-to-all and a
  send/recv pair (ping-pong, halved) against message size.

Every rank must issue the same collectives in the same order, so the repetitions of each point
are decided by rank 0 from a pilot call and broadcast. Fitting the figures and turning them into
a device profile is the driver's (`autotune.study.cluster_profile`); this module only measures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Iterator

from autotune.redaction import error_line
from trainables.moe.config import ModelConfig, ParallelDims

COLLECTIVES = ("all_reduce", "all_to_all", "send_recv")
LAYER_TOKENS = 16  # tokens of the layer-cost call: every kernel of the block runs, next to no FLOPs
LAYER_WIDTH = 16  # d_model, expert and dense FFN widths of the block whose fixed cost is timed
MIN_REPS, MAX_REPS = 3, 200
# What a device or build raises for a shape or kernel it cannot run (a grouped GEMM's dtype or
# alignment on an older card): recorded with the measurement, not the end of the probe.
UNRUNNABLE = (RuntimeError, ValueError, TypeError, NotImplementedError)


@dataclass(frozen=True)
class ProbeConfig:
    """What the probe's ranks measure, and how long they may take."""

    device: str  # "cpu" or "cuda"
    world: int
    gemms: tuple[tuple[int, int, int, int], ...]  # (groups, rows per group, k, n); 1 group: a dense GEMM
    precisions: tuple[str, ...] = ("fp32", "bf16", "bf16-params")
    groups: tuple[int, ...] = (2,)  # collective group sizes (ranks 0..g-1), each <= world
    sizes: tuple[int, ...] = (1 << 12, 1 << 16, 1 << 20)  # message bytes per rank
    seconds: float = 4.0  # measuring time, all points together (start-up not included)
    layer: ModelConfig | None = None  # the shrunk model whose block's fixed cost is timed; None: not timed
    timeout_s: float = 120.0

    @property
    def dims(self) -> ParallelDims:
        """The world, as the trial executor reads it."""
        return ParallelDims(dp=self.world)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn, device: Any, budget: float) -> float:
    """Seconds per call of `fn`, after one warm call, over about `budget` seconds (3 calls at least)."""
    fn()
    _sync(device)
    n, start = 0, time.perf_counter()
    while n < MIN_REPS or (time.perf_counter() - start < budget and n < MAX_REPS):
        fn()
        n += 1
        if device.type == "cuda" and n % 4 == 0:
            _sync(device)
    _sync(device)
    return (time.perf_counter() - start) / n


def measure_gemms(cfg: ProbeConfig, device: Any, budget: float) -> list[dict[str, Any]]:
    """TFLOP/s of each GEMM shape in each precision on this device. A shape this device or build
    cannot run (a grouped GEMM's dtype or alignment on an older card) is recorded with its error
    and left out of the rates, not the end of the probe."""
    import torch
    import torch.nn.functional as F

    # (operand dtype, cast from fp32 on every call)
    dtypes = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, True), "fp16": (torch.float16, True),
              "bf16-params": (torch.bfloat16, False)}
    share = budget / max(1, len(cfg.gemms) * len(cfg.precisions))
    out = []
    for precision in cfg.precisions:
        dtype, cast = dtypes[precision]
        for groups, rows, k, n in cfg.gemms:
            held = torch.float32 if cast else dtype
            x = torch.randn(groups * rows, k, device=device, dtype=held)
            w = torch.randn(*((groups,) if groups > 1 else ()), k, n, device=device, dtype=held)
            offs = torch.arange(1, groups + 1, device=device, dtype=torch.int32) * rows

            def call(x=x, w=w, offs=offs, groups=groups, cast=cast, dtype=dtype):
                a, b = (x.to(dtype), w.to(dtype)) if cast else (x, w)
                return a @ b if groups == 1 else F.grouped_mm(a, b, offs=offs)

            row = {"precision": precision, "groups": groups, "rows": rows, "k": k, "n": n}
            try:
                seconds = _rate(call, device, share)
            except UNRUNNABLE as exc:
                out.append({**row, "error": error_line(exc)})
                continue
            out.append({**row, "seconds": seconds, "tflops": 2.0 * groups * rows * k * n / seconds / 1e12})
    return out


def layer_model(cfg: ModelConfig) -> ModelConfig:
    """The model with every width shrunk to `LAYER_WIDTH` (2 heads): its block runs the same kernels
    (router, every expert's grouped GEMM, attention, norms) with next to no FLOPs."""
    return replace(cfg, d_model=LAYER_WIDTH, n_heads=2, ffn_hidden=LAYER_WIDTH, dense_ffn_hidden=LAYER_WIDTH,
                   vocab_size=LAYER_WIDTH, max_seq_len=max(cfg.max_seq_len, LAYER_TOKENS))


def measure_layer(model: ModelConfig, device: Any, budget: float) -> dict[str, Any]:
    """Seconds of one block's forward and backward on `LAYER_TOKENS` tokens: a MoE block where the
    model has MoE layers, else a dense one; under bf16 autocast on a GPU (as GPU trials run, and
    the grouped GEMMs' fused kernels want), fp32 on a CPU. Recorded with its error where it cannot run."""
    import torch

    from trainables.moe.model import Block

    moe = model.n_moe_layers > 0 and model.n_experts > 1
    low = device.type == "cuda"
    row: dict[str, Any] = {"moe": moe, "tokens": LAYER_TOKENS, "d_model": model.d_model,
                           "precision": "bf16" if low else "fp32"}
    try:
        torch.manual_seed(0)
        block = Block(model, moe).to(device)
        for p in block.parameters():  # expert weights start as uninitialised memory: no NaNs or denormals
            torch.nn.init.normal_(p, std=0.02)
        x = torch.randn(1, LAYER_TOKENS, model.d_model, device=device, requires_grad=True)

        def call() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
                y = block(x)
            y.float().sum().backward()

        row["seconds"] = _rate(call, device, budget)
    except UNRUNNABLE as exc:
        row["error"] = error_line(exc)
    return row


def measure_copy(device: Any, budget: float) -> float:
    """GB/s of a 64 MB (CUDA) or 16 MB (CPU) copy, read and write counted: memory bandwidth."""
    import torch

    x = torch.empty((16 if device.type == "cuda" else 4) << 20, device=device)
    y = torch.empty_like(x)
    seconds = _rate(lambda: y.copy_(x), device, budget)
    return 2 * x.numel() * 4 / seconds / 1e9


def _reps(pilot_s: float, budget: float, device: Any) -> int:
    """Repetitions of one point, decided on rank 0 and broadcast: every rank must run as many."""
    import torch
    import torch.distributed as dist

    n = torch.tensor([min(MAX_REPS, max(MIN_REPS, int(budget / max(pilot_s, 1e-6))))], device=device)
    dist.broadcast(n, 0)
    return int(n.item())


def measure_collectives(cfg: ProbeConfig, device: Any, budget: float) -> list[dict[str, Any]]:
    """Seconds per call of each collective, group size and message size (rank 0's clock)."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    groups = {g: dist.new_group(list(range(g))) for g in cfg.groups}  # every rank creates every group
    points = [(kind, g, size) for g in cfg.groups for kind in COLLECTIVES for size in cfg.sizes
              if kind != "send_recv" or g == 2]
    share = budget / max(1, len(points))
    out = []
    for kind, g, size in points:
        member = rank < g
        elements = max(g, size // 4 // g * g)  # float32, divisible by the group for the all-to-all
        buf = torch.ones(elements, device=device)
        other = torch.empty_like(buf)
        group = groups[g]

        def call() -> None:
            if kind == "all_reduce":
                dist.all_reduce(buf, group=group)
            elif kind == "all_to_all":
                dist.all_to_all_single(other, buf, group=group)
            elif rank == 0:  # ping-pong: there and back
                dist.send(buf, 1, group=group)
                dist.recv(other, 1, group=group)
            elif rank == 1:
                dist.recv(other, 0, group=group)
                dist.send(buf, 0, group=group)

        dist.barrier()
        pilot = 0.0
        if member:
            call()  # warm: connections, buffers
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            pilot = time.perf_counter() - start
        reps = _reps(pilot, share, device)
        dist.barrier()
        start = time.perf_counter()
        if member:
            for _ in range(reps):
                call()
            _sync(device)
        seconds = (time.perf_counter() - start) / reps
        if kind == "send_recv":
            seconds /= 2
        if rank == 0:
            out.append({"kind": kind, "group": g, "bytes": elements * 4, "seconds": seconds, "reps": reps})
    return out


def iter_probe(cfg: ProbeConfig) -> Iterator[Any]:
    """Every rank calls this on an initialised process group; rank 0's result carries the figures
    (the shape of `trainables.moe.train.iter_run`'s last item, which the rank process relays)."""
    import torch.distributed as dist

    from trainables.moe.train import RankResult, resolve_device

    device = resolve_device(cfg.device)
    rank = dist.get_rank()
    start = time.perf_counter()
    figures: dict[str, Any] = {"type": "probe", "device": device.type, "world": dist.get_world_size()}
    if rank == 0:
        figures["gemms"] = measure_gemms(cfg, device, 0.35 * cfg.seconds)
        figures["copy_gb_s"] = measure_copy(device, 0.05 * cfg.seconds)
        if cfg.layer is not None:
            figures["layer"] = measure_layer(cfg.layer, device, 0.05 * cfg.seconds)
        if device.type == "cuda":
            import torch

            figures["device_name"] = torch.cuda.get_device_name(device)
    dist.barrier()
    figures["collectives"] = measure_collectives(cfg, device, 0.55 * cfg.seconds) if dist.get_world_size() > 1 else []
    figures["seconds"] = time.perf_counter() - start
    yield RankResult(rank=rank, losses=[], step_times=[], memory={}, summary=figures if rank == 0 else None)
