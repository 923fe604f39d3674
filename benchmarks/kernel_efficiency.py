"""Kernel efficiency: the experts as grouped GEMMs against the former loop over experts, in one run.

Two parts, each timed both ways, interleaved (loop, grouped, loop, grouped, ...), the median of
the repeats kept:

* `layer`: one MoE layer with 64 experts at EP 1, forward and backward (the moe-64e preset's
  widths on a GPU; narrower on CPU, where the loop's cost is what matters, not the width);
* `step`: one whole training step of the built-in trainable at world 1 (the `small` preset on a
  GPU, a 64-expert tiny model on CPU): the optimizer and everything else included.

Printed per part: matrix-multiply kernels dispatched (forward and backward, counted by a
dispatch mode), seconds per call, and the loop / grouped ratio. On a GPU also the MFU of each
(model FLOPs over time, against the card's datasheet peak and against a large bf16 GEMM's rate
measured in the same run: the practical ceiling). The loop is the reference kept in the tests
(`tests/trainables/moe/reference.py`); the product runs only the grouped path.

    python -m benchmarks.kernel_efficiency            # the default device: cuda if present, else cpu
    python -m benchmarks.kernel_efficiency --quick    # fewer repeats, smaller shapes: checks the script

Goal (CPU, every run): the grouped layer issues at most 24 matmul kernels (the loop: 579).
Results: benchmarks/results/kernel_efficiency_<device>.{csv,json} (`_quick` with --quick). It
imports only torch and the trainable, so it runs on a GPU machine without the tuner.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, say, write_csv, write_json  # noqa: E402

KERNEL_GOAL = 24

# name -> (model config changes, tokens per call, repeats) by device
LAYER = {"cuda": (dict(preset="moe-64e"), 8192, 20), "cpu": (dict(preset="tiny", n_experts=64, d_model=128,
                                                                    ffn_hidden=256, n_heads=4), 1024, 7)}
STEP = {"cuda": (dict(preset="small"), dict(micro_batch_size=8, global_batch_size=8, seq_len=2048), 8),
        "cpu": (dict(preset="tiny", n_experts=64), dict(micro_batch_size=8, global_batch_size=8, seq_len=64), 5)}


def _config(spec: dict[str, Any]):
    from trainables.moe.config import preset

    spec = dict(spec)
    return replace(preset(spec.pop("preset")), **spec)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, run in turn `repeats` times after one warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[k].append(_timed(fns[k], device))
    return {k: statistics.median(v) for k, v in times.items()}


def gemm_ceiling(device: str) -> float | None:
    """FLOP/s of one large bf16 matrix product on this device (the practical MFU ceiling)."""
    import torch

    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = _interleaved({"mm": lambda: a @ b}, 10, device)["mm"]
    return 2 * 8192 ** 3 / t


def layer_part(device: str, quick: bool) -> dict[str, Any]:
    import torch

    from tests.trainables.moe.reference import MatmulCount, looped
    from trainables.moe.model import MoE

    spec, tokens, repeats = LAYER[device]
    cfg = _config(spec)
    if quick:
        tokens, repeats = tokens // 4, 3
    torch.manual_seed(0)
    layer = MoE(cfg).to(device)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(tokens, cfg.d_model, device=device, requires_grad=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def run() -> None:
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            y = layer(x)
        y.float().pow(2).mean().backward()

    def loop() -> None:
        with looped():
            run()

    counts = {}
    for name, fn in (("loop", loop), ("grouped", run)):
        with MatmulCount() as mc:
            fn()
        counts[name] = mc.total
    seconds = _interleaved({"loop": loop, "grouped": run}, repeats, device)
    rows = tokens * cfg.top_k
    flops = 3 * (3 * 2 * rows * cfg.d_model * cfg.ffn_hidden) + 3 * 2 * tokens * cfg.d_model * cfg.n_experts
    return {"part": "layer", "model": spec, "tokens": tokens, "experts": cfg.n_experts, "d_model": cfg.d_model,
            "ffn_hidden": cfg.ffn_hidden, "precision": "bf16" if device == "cuda" else "fp32",
            "kernels_loop": counts["loop"], "kernels_grouped": counts["grouped"],
            "seconds_loop": seconds["loop"], "seconds_grouped": seconds["grouped"],
            "ratio": seconds["loop"] / seconds["grouped"], "flops": flops}


def step_part(device: str, quick: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from tests.trainables.moe.reference import looped
    from trainables.moe.config import flops_per_token
    from trainables.moe.run_config import RunConfig
    from trainables.moe.train import Trainer

    spec, shape, repeats = STEP[device]
    spec = dict(spec)
    name = spec.pop("preset")
    if quick:
        repeats = 3
        shape = {**shape, "seq_len": shape["seq_len"] // 2}
    cfg = RunConfig(model=name, model_overrides=spec, precision="bf16" if device == "cuda" else "fp32",
                    device=device, steps=1, warmup_steps=0, memory_probe=False, **shape)
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=0, world_size=1)
    trainer = Trainer(cfg, torch.device(device, 0) if device == "cuda" else torch.device(device))
    step = iter(range(10_000))

    def grouped() -> None:
        trainer.step(next(step))

    def loop() -> None:
        with looped():
            trainer.step(next(step))

    seconds = _interleaved({"loop": loop, "grouped": grouped}, repeats, device)
    model_cfg = cfg.model_config()
    tokens = cfg.global_batch_size * cfg.seq_len
    return {"part": "step", "model": name, "overrides": spec, **shape, "experts": model_cfg.n_experts,
            "precision": cfg.precision, "seconds_loop": seconds["loop"], "seconds_grouped": seconds["grouped"],
            "ratio": seconds["loop"] / seconds["grouped"],
            "flops": flops_per_token(model_cfg, cfg.seq_len) * tokens,
            "tokens_per_s_loop": tokens / seconds["loop"], "tokens_per_s_grouped": tokens / seconds["grouped"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_efficiency", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="smaller shapes, 3 repeats: checks the script works")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and JSON")
    args = p.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        torch.set_num_threads(1)  # one core's worth, as a CPU rank has
    started = time.monotonic()
    ceiling = gemm_ceiling(device)
    peak = None
    if device == "cuda":
        from trainables.moe.measure import device_peak_flops

        peak = device_peak_flops(torch.device("cuda", 0), "bf16")
    rows = []
    for part in (layer_part, step_part):
        row = part(device, args.quick)
        for side in ("loop", "grouped"):
            if peak:
                row[f"mfu_{side}"] = row["flops"] / row[f"seconds_{side}"] / peak
            if ceiling:
                row[f"of_ceiling_{side}"] = row["flops"] / row[f"seconds_{side}"] / ceiling
        rows.append(row)
        kernels = (f", matmul kernels {row['kernels_loop']} -> {row['kernels_grouped']}" if "kernels_loop" in row
                   else "")
        mfu = (f", MFU {row['mfu_loop']:.1%} -> {row['mfu_grouped']:.1%} of the datasheet peak, "
               f"{row['of_ceiling_loop']:.1%} -> {row['of_ceiling_grouped']:.1%} of the measured GEMM ceiling"
               if "mfu_loop" in row and "of_ceiling_loop" in row else "")
        say(f"{row['part']:<5} {device}: loop {row['seconds_loop'] * 1e3:9.2f} ms, grouped "
            f"{row['seconds_grouped'] * 1e3:9.2f} ms: {row['ratio']:.2f}x faster{kernels}{mfu}")
    layer = rows[0]
    met = layer["kernels_grouped"] <= KERNEL_GOAL
    say(f"goal: one 64-expert MoE layer at EP 1 issues at most {KERNEL_GOAL} matmul kernels in forward and "
        f"backward: {layer['kernels_grouped']} ({'met' if met else 'NOT met'}; the loop issued {layer['kernels_loop']})")
    if ceiling:
        say(f"measured bf16 GEMM ceiling: {ceiling / 1e12:.0f} TFLOP/s" + (f" (datasheet {peak / 1e12:.0f})" if peak else ""))
    data = {"benchmark": "kernel_efficiency", "quick": args.quick, "device": device, "machine": machine(),
            "torch": torch.__version__, "gemm_ceiling_flops": ceiling, "datasheet_peak_flops": peak,
            "kernel_goal": KERNEL_GOAL, "kernel_goal_met": met, "parts": rows,
            "runtime_s": round(time.monotonic() - started, 1)}
    suffix = f"_{device}" + ("_quick" if args.quick else "")
    write_csv(args.out / f"kernel_efficiency{suffix}.csv", rows)
    write_json(args.out / f"kernel_efficiency{suffix}.json", data)
    say(f"wrote {args.out / f'kernel_efficiency{suffix}.csv'} and .json ({data['runtime_s']:.0f} s)")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if met else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
