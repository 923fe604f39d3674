"""Measuring the machine trials run on: the CPU's matmul rate over a space's own shapes and its
copy bandwidth, the figures of a CPU profile that no data sheet has. The step-time model reads
them as data (a study measures once at its start and keeps them); it never measures itself."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

from autotune.space.devices import DeviceProfile, get
from autotune.space.spec import Spec


def cpu_matmul_shapes(spec: Spec) -> list[tuple[int, int, int]]:
    """The matmuls a step of this space runs, for measuring a CPU's rate: a micro-batch's tokens
    x width x FFN hidden at the smallest and largest micro-batch, and an expert's share of those
    tokens (top_k / n_experts of them) where the model has experts."""
    cfg = spec.model.config()
    sizes = sorted({min(spec.search.micro_batch_size), max(spec.search.micro_batch_size)})
    shapes = []
    for mb in sizes:
        tokens = mb * spec.search.seq_len
        shapes.append((tokens, cfg.d_model, cfg.ffn_hidden))
        if cfg.n_experts:
            shapes.append((max(1, tokens * cfg.top_k // cfg.n_experts), cfg.d_model, cfg.ffn_hidden))
    return shapes


def measure_cpu(base: DeviceProfile | None = None, seconds: float = 0.3,
                shapes: Sequence[tuple[int, int, int]] = ((256, 256, 256),)) -> DeviceProfile:
    """This machine's fp32/bf16 matmul rate and copy bandwidth, one core's worth (a rank gets a
    core or less): the CPU profile's figures no data sheet has. About `seconds` in all.

    `shapes` (m, k, n): the study's own matmuls (e.g. a micro-batch's tokens x width x hidden at
    the smallest and largest micro-batch, and an expert's share of them); each precision's rate
    is their FLOPs over their summed time, as a step runs all of them. A CPU's low-precision rate
    depends on the size more than fp32's: with autocast's casts of both operands (a training step
    pays them on every call), 512x64x128 ran 1.5x faster in bf16 than in fp32 here, 128x64x128
    2.2x slower, so one large shape alone ranked bf16 layouts first where they ran 2.5x slower."""
    import torch

    base = base or get("cpu")
    shapes = [tuple(int(v) for v in s) for s in shapes] or [(256, 256, 256)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peaks = {}
        operands = [(torch.randn(m, k), torch.randn(k, n_)) for m, k, n_ in shapes]
        flops = sum(2 * m * k * n_ for m, k, n_ in shapes)
        share = seconds / 3 / (2 * len(shapes))
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            total = 0.0
            for a, b in operands:
                a.to(dtype) @ b.to(dtype)
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < share:
                    a.to(dtype) @ b.to(dtype)
                    n += 1
                total += (time.perf_counter() - start) / n
            peaks[precision] = flops / total / 1e12
        peaks["fp16"] = peaks["bf16"]
        x = torch.empty(4 << 20)  # 16 MB, beyond the caches
        y = torch.empty_like(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            y.copy_(x)
            n += 1
        hbm = 2 * x.numel() * 4 * n / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(threads)
    return replace(base, peak_tflops=peaks, hbm_gb_s=hbm,
                   sources={**base.sources, "measured": f"measure_cpu at {time.strftime('%Y-%m-%dT%H:%M:%S')}"})
