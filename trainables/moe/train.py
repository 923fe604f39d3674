"""One short MoE training run under a parallel layout: build, warm up, measure, report.

Two callers, one program:

* a shell: ``torchrun --nproc-per-node 4 -m trainables.moe.train --model tiny --ep 2 --tp 2 ...``
  (this is the launch command a deployment report prints);
* a tuning trial, on ranks it already started: ``run_rank(config, rank, world, addr, port)``.

Rank 0 writes one JSON line per step and a summary as the last line (`--metrics-out`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import socket
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from autotune.schema import DEVICE_MEMORY_METRICS, Status
from trainables.moe.config import PRESETS, flops_per_token, math_precision
from trainables.moe.run_config import LayoutError, RunConfig
from trainables.moe.data import synthetic_batch
from trainables.moe.measure import (LiveMemory, device_peak_flops, measure_peak, resident_bytes, state_bytes,
                                    timed_alone)
from trainables.moe.grad_sync import build_grad_sync, grad_of
from trainables.moe.model import build_model, reset_moe_stats, set_aux_loss_scale, set_recompute
from trainables.moe.parallel import backend_for, build_context, parallelize

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RankResult:
    """What one rank knows after the run; `summary` is filled on rank 0 only."""

    rank: int
    losses: list[float]
    step_times: list[float]
    memory: dict[str, int]
    summary: dict[str, Any] | None = None
    params: dict[str, tuple[torch.Tensor, Any]] | None = None
    grads: list[dict[str, torch.Tensor]] | None = None  # with params: the averaged gradients of steps 1 and 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    return torch.device(name)


class Trainer:
    """Holds one rank's model shard, optimizer and (for pp > 1) pipeline schedule."""

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.model_cfg = cfg.model_config()
        self.dims = cfg.dims
        self.accum = cfg.shape.accum_steps(self.dims)
        ctx = build_context(self.dims, device)
        torch.manual_seed(cfg.seed)
        self.pm = parallelize(build_model(self.model_cfg), ctx, cfg.seed, cfg.stage_layers)
        set_recompute(self.pm.module, cfg.recompute)
        named = list(self.pm.module.named_parameters())
        self.params = [p for _, p in named]
        # bf16-params: the parameters are held and run in bf16; the optimizer steps an fp32 master
        # copy (the initial fp32 values) on fp32 main gradients and writes the result back.
        self.masters: list[torch.Tensor] | None = None
        if cfg.precision == "bf16-params":
            self.masters = [p.detach().clone() for p in self.params]
            for p in self.params:
                p.data = p.data.to(torch.bfloat16)
        self.grad_sync = build_grad_sync(cfg.grad_sync, self.params, [self.pm.specs[n].is_expert for n, _ in named],
                                         self.dims, ctx.dense_dp_group, ctx.dp_group, cfg.bucket_mb,
                                         main_grads=self.masters is not None)
        stepped = self.params
        if self.masters is not None:
            for m, p in zip(self.masters, self.params):
                m.grad = p.main_grad
            stepped = self.masters
        # Fused AdamW (one kernel over every parameter, as production trainers run it): no
        # temporaries, no per-tensor launches; its step counters live on the parameters' device.
        self.optimizer = (torch.optim.SGD(stepped, lr=cfg.lr) if cfg.optimizer == "sgd"
                          else torch.optim.AdamW(stepped, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True))
        self.captured_grads: list[dict[str, torch.Tensor]] | None = None  # set to [] to keep them
        self.amp_dtype = AUTOCAST_DTYPES.get(cfg.precision)
        self.scaler = None
        if cfg.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            # Inf/NaN found on any rank must skip the step on every rank.
            self.scaler = ShardedGradScaler(device=device.type, process_group=dist.group.WORLD)
            # Stages that never see the loss must still hold the scale before they unscale.
            self.scaler.scale(torch.ones((), device=device))
        p, d, e, t = ctx.coords
        self.replica = d * self.dims.ep + e
        self.reports_loss = self.pm.is_last_stage and t == 0
        self.schedule = self._build_schedule() if self.dims.pp > 1 else None
        self._ce: list[torch.Tensor] = []

    # -- pipeline -------------------------------------------------------------------------------
    def _build_schedule(self):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        cfg, mb, s, d = self.cfg, self.cfg.micro_batch_size, self.cfg.seq_len, self.model_cfg.d_model
        act_dtype = torch.bfloat16 if self.masters is not None else torch.float32
        if self.pm.is_first_stage:
            example_in = torch.zeros(mb, s, dtype=torch.long, device=self.device)
        else:
            example_in = torch.zeros(mb, s, d, dtype=act_dtype, device=self.device, requires_grad=True)
        if self.pm.is_last_stage:
            vocab_local = self.model_cfg.vocab_size // self.dims.tp
            example_out = torch.zeros(mb, s, vocab_local, dtype=self.amp_dtype or act_dtype, device=self.device)
        else:
            example_out = torch.zeros(mb, s, d, dtype=act_dtype, device=self.device, requires_grad=True)
        stage = PipelineStage(self.pm.module, self.pm.ctx.pp_rank, self.dims.pp, self.device,
                              input_args=example_in, output_args=example_out, group=self.pm.ctx.pp_group)
        kind = Schedule1F1B if cfg.schedule == "1f1b" else ScheduleGPipe
        return kind(stage, n_microbatches=self.accum, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = self.pm.loss_fn(logits, target)
        self._ce.append(ce.detach())
        loss = ce / self.accum
        return self.scaler.scale(loss) if self.scaler is not None else loss

    # -- one optimizer step ---------------------------------------------------------------------
    def step(self, step: int) -> float:
        cfg = self.cfg
        tokens = synthetic_batch(self.model_cfg.vocab_size, cfg.global_batch_size, cfg.seq_len, cfg.seed, step)
        rows = cfg.micro_batch_size * self.accum
        mine = tokens[self.replica * rows:(self.replica + 1) * rows].to(self.device)
        x, y = mine[:, :-1].contiguous(), mine[:, 1:].contiguous()
        loss_scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        set_aux_loss_scale(self.pm.module, self.model_cfg.aux_loss_coef * loss_scale / self.accum)
        self._ce = []
        self.grad_sync.begin(self.accum)
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else nullcontext())
        with amp:
            if self.schedule is None:
                for xm, ym in zip(x.split(cfg.micro_batch_size), y.split(cfg.micro_batch_size)):
                    self._loss(self.pm.module(xm), ym).backward()
            else:
                args = (x,) if self.pm.is_first_stage else ()
                target = y if self.pm.is_last_stage else None
                self.schedule.step(*args, target=target, losses=[] if target is not None else None)
        self.grad_sync.finish()
        if self.captured_grads is not None and step < 2:
            self.captured_grads.append({n: grad_of(p).detach().clone() for n, p in self.pm.module.named_parameters()})
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.masters is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
        self.optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in Megatron's buffers
        # Mean loss of the whole global batch, known on every rank (also the step's sync point).
        mean = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.reports_loss:
            mean += torch.stack(self._ce).double().mean() / self.dims.data_replicas
        dist.all_reduce(mean)
        return float(mean.item())

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- MoE routing statistics -----------------------------------------------------------------
    def routing_stats(self) -> tuple[float, float]:
        """(worst layer's max/mean expert load, dropped fraction) over all data since the reset."""
        n_moe = self.model_cfg.n_moe_layers
        counts = torch.zeros(max(n_moe, 1), self.model_cfg.n_experts, dtype=torch.float64, device=self.device)
        dropped = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.pm.ctx.tp_rank == 0:  # TP ranks route the same tokens: count them once
            moe_index = [i for i in range(self.model_cfg.n_layers) if self.model_cfg.is_moe_layer(i)]
            for name, block in self.pm.module.layers.items():
                if hasattr(block.ffn, "tokens_per_expert"):
                    counts[moe_index.index(int(name))] += block.ffn.tokens_per_expert.double()
                    dropped += block.ffn.dropped.double()
        dist.all_reduce(counts)
        dist.all_reduce(dropped)
        if n_moe == 0 or counts.sum() == 0:
            return 1.0, 0.0
        imbalance = (counts.max(1).values / counts.mean(1).clamp_min(1e-12)).max()
        return float(imbalance), float(dropped.item() / counts.sum().item())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def iter_run(cfg: RunConfig, keep_params: bool = False) -> Iterator[dict[str, Any] | RankResult]:
    """Run on an initialised default process group, yielding each step's record as it ends.

    Every rank calls this; the last item is the rank's RankResult (with the summary on rank 0).
    Records carry the step's global loss and wall time, so a caller can stream progress.
    """
    cfg.check(dist.get_world_size())
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = dist.get_rank()
    trainer = Trainer(cfg, device)
    if keep_params:
        trainer.captured_grads = []
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    losses, times = [], []
    total = cfg.warmup_steps + cfg.steps
    # The memory tracker watches the first step (where gradients, optimizer states and pipeline
    # buffers come to life) and the probe step after the measured ones; timed steps run bare.
    resident = resident_bytes(trainer.pm.module, trainer.optimizer, device)
    limit = cfg.memory_limit_bytes
    if limit is not None and device.type == "cuda":  # the caching allocator enforces it for real
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / torch.cuda.get_device_properties(device).total_memory),
                                                   device)
        limit = None
    live = LiveMemory(resident, limit) if (cfg.memory_probe or limit is not None) else None
    hosts = None
    if cfg.measure_alone:  # every machine of the trial is locked while it times (measure.timed_alone)
        hosts = [""] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
    with timed_alone(cfg.measure_alone, rank, dist.barrier, hosts):
        for i in range(total):
            if i == cfg.warmup_steps:
                reset_moe_stats(trainer.pm.module)
            trainer.sync()
            t0 = time.perf_counter()
            with live if (live is not None and i == 0) else nullcontext():
                loss = trainer.step(i)
            trainer.sync()
            dt = time.perf_counter() - t0
            losses.append(loss)
            times.append(dt)
            yield {"type": "step", "step": i, "phase": "warmup" if i < cfg.warmup_steps else "measure",
                   "loss": loss, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt}
    imbalance, dropped = trainer.routing_stats()

    st = state_bytes(trainer.pm.module, trainer.optimizer, device)
    memory = {"mem_params_bytes": st.params, "mem_grads_bytes": st.grads, "mem_optimizer_bytes": st.optimizer}
    if live is not None:
        peak = measure_peak(live, resident, st, device, functools.partial(trainer.step, total))
        memory.update(peak_mem_bytes=peak.peak, mem_activations_bytes=peak.activations,
                      mem_other_bytes=peak.other)
        if peak.reserved is not None:
            memory.update(peak_mem_reserved_bytes=peak.reserved, peak_mem_device_bytes=peak.device)
    result = RankResult(rank=rank, losses=losses, step_times=times, memory=memory)
    if keep_params:
        result.params = {n: (p.detach().cpu().clone(), trainer.pm.specs[n])
                         for n, p in trainer.pm.module.named_parameters()}
        result.grads = trainer.captured_grads

    # Slowest rank per step (the step ends with a world all-reduce, so they are close anyway).
    t = torch.tensor(times, dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    times = t.tolist()
    gathered: list[dict[str, Any]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, {"rank": rank, "coords": list(cfg.dims.coords(rank)),
                                      "host": socket.gethostname(), **memory})
    if rank == 0:
        result.summary = summarize(cfg, device, losses, times, gathered, imbalance, dropped)
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    yield result


def run(cfg: RunConfig, on_step: Callable[[dict[str, Any]], None] | None = None,
        keep_params: bool = False) -> RankResult:
    """`iter_run` to the end; rank 0 hands each step record to `on_step`."""
    for item in iter_run(cfg, keep_params):
        if isinstance(item, RankResult):
            return item
        if on_step is not None and dist.get_rank() == 0:
            on_step(item)
    raise AssertionError("iter_run ended without a result")


def summarize(cfg: RunConfig, device: torch.device, losses: list[float], times: list[float],
              ranks: list[dict[str, Any]], imbalance: float, dropped: float) -> dict[str, Any]:
    measured = times[cfg.warmup_steps:]
    step_time = statistics.median(measured)
    model_cfg = cfg.model_config()
    tokens = cfg.global_batch_size * cfg.seq_len
    summary: dict[str, Any] = {
        "type": "summary", "status": Status.OK.value, "reason": "",
        "layout": cfg.dims.name(), "world_size": cfg.dims.world_size, "device": device.type,
        **{k: getattr(cfg, k) for k in ("model", "ep", "tp", "pp", "dp", "micro_batch_size",
                                        "global_batch_size", "seq_len", "precision", "recompute",
                                        "schedule", "steps", "warmup_steps", "seed")},
        "accum_steps": cfg.shape.accum_steps(cfg.dims),
        "tokens_per_s": tokens / step_time, "samples_per_s": cfg.global_batch_size / step_time,
        "step_time_s": step_time, "step_time_p90_s": _percentile(measured, 0.9),
        "step_times_s": measured, "losses": losses,
        "loss_first": losses[0], "loss_last": losses[-1],
        "expert_load_imbalance": imbalance, "tokens_dropped_frac": dropped,
        "flops_per_token": flops_per_token(model_cfg, cfg.seq_len),
        "ranks": ranks,
    }
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else device_peak_flops(device, math_precision(cfg.precision))
    if peak:
        summary["mfu"] = summary["tokens_per_s"] * summary["flops_per_token"] / (peak * cfg.dims.world_size)
    if "peak_mem_bytes" in ranks[0]:
        worst = max(ranks, key=lambda r: r["peak_mem_bytes"])
        summary["worst_rank"] = worst["rank"]
        for k in ("peak_mem_bytes", "mem_params_bytes", "mem_grads_bytes", "mem_optimizer_bytes",
                  "mem_activations_bytes", "mem_other_bytes"):
            summary[k] = worst[k]
        for k in DEVICE_MEMORY_METRICS:  # CUDA only: the allocator's and the device's view, max over ranks
            if k in ranks[0]:
                summary[k] = max(r[k] for r in ranks)
    return summary


def run_rank(cfg: RunConfig, rank: int, world_size: int, master_addr: str, master_port: int,
             on_step: Callable[[dict[str, Any]], None] | None = None, keep_params: bool = False) -> RankResult:
    """Entry for ranks started by someone else (a tuning trial): join, run, leave."""
    cfg.check(world_size)
    device = resolve_device(cfg.device)
    timeout = timedelta(seconds=cfg.timeout_s) if cfg.timeout_s else timedelta(minutes=30)
    dist.init_process_group(backend_for(device), init_method=f"tcp://{master_addr}:{master_port}",
                            rank=rank, world_size=world_size, timeout=timeout)
    try:
        result = run(cfg, on_step=on_step, keep_params=keep_params)
        dist.barrier()  # nobody tears the group down while a peer still talks to it
        return result
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(prog="python -m trainables.moe.train",
                                description="One short MoE training run under an EP/TP/PP/DP layout.")
    p.add_argument("--model", default=d.model, help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--model-config", default="{}", help="JSON object of model fields overriding the preset")
    for name in ("ep", "tp", "pp", "dp", "micro_batch_size", "global_batch_size", "seq_len", "steps",
                 "warmup_steps", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--precision", default=d.precision,
                   help="fp32 | bf16 | fp16 (autocast over fp32 parameters) | bf16-params (bf16 parameters, "
                        "fp32 main gradients and master weights)")
    p.add_argument("--recompute", default=d.recompute, help="none | selective | full")
    p.add_argument("--schedule", default=d.schedule, help="pipeline schedule: 1f1b | gpipe")
    p.add_argument("--stage-layers", default=None, help="explicit pipeline split, e.g. 3,1")
    p.add_argument("--grad-sync", default=d.grad_sync,
                   help="bucketed: gradients averaged in buckets during backward | flat: one copy after it")
    p.add_argument("--bucket-mb", type=float, default=d.bucket_mb, help="bucket size in MiB (bucketed grad sync)")
    p.add_argument("--optimizer", default=d.optimizer, help="adamw | sgd")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device, for MFU")
    p.add_argument("--no-memory-probe", action="store_true", help="skip the tracked memory step")
    p.add_argument("--timeout-s", type=float, default=None, help="process-group timeout in seconds")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="per-rank memory limit: exceeding it is an out-of-memory error (CPU and CUDA)")
    p.add_argument("--metrics-out", default=None, help="JSON-lines file written by rank 0")
    return p


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    try:
        overrides = json.loads(ns.model_config)
    except json.JSONDecodeError as exc:
        raise LayoutError(f"--model-config is not valid JSON ({exc.msg}): pass an object like '{{\"n_layers\": 8}}'")
    if not isinstance(overrides, dict):
        raise LayoutError("--model-config must be a JSON object like '{\"n_layers\": 8}'")
    stage_layers = None
    if ns.stage_layers:
        try:
            stage_layers = tuple(int(v) for v in ns.stage_layers.split(","))
        except ValueError:
            raise LayoutError(f"--stage-layers {ns.stage_layers!r} must be comma-separated integers like 3,1")
    return RunConfig(
        model=ns.model, model_overrides=overrides, ep=ns.ep, tp=ns.tp, pp=ns.pp, dp=ns.dp,
        micro_batch_size=ns.micro_batch_size, global_batch_size=ns.global_batch_size, seq_len=ns.seq_len,
        precision=ns.precision, recompute=ns.recompute, schedule=ns.schedule, stage_layers=stage_layers,
        grad_sync=ns.grad_sync, bucket_mb=ns.bucket_mb, optimizer=ns.optimizer,
        steps=ns.steps, warmup_steps=ns.warmup_steps, seed=ns.seed, lr=ns.lr, weight_decay=ns.weight_decay,
        device=ns.device, memory_probe=not ns.no_memory_probe, peak_tflops=ns.peak_tflops,
        timeout_s=ns.timeout_s,
        memory_limit_bytes=round(ns.memory_limit_gb * 1e9) if ns.memory_limit_gb is not None else None,
    )


class _JsonLines:
    def __init__(self, path: str | None) -> None:
        self.file = open(path, "w") if path else None

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        print(line if record.get("type") != "step" else _step_text(record), flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def _step_text(r: dict[str, Any]) -> str:
    return (f"step {r['step']:>3} {r['phase']:<7} loss {r['loss']:.6f}  "
            f"{r['step_time_s'] * 1e3:8.1f} ms  {r['tokens_per_s']:10.0f} tok/s")


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = config_from_args(ns)
        cfg.check(world)  # before any process group exists
    except LayoutError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "MASTER_ADDR" not in os.environ:  # plain `python -m`, one rank
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    timeout = timedelta(seconds=cfg.timeout_s) if cfg.timeout_s else None
    dist.init_process_group(backend_for(device), **({"timeout": timeout} if timeout else {}))
    out = _JsonLines(ns.metrics_out if rank == 0 else None)
    code = 0
    try:
        result = run(cfg, on_step=out)
        if rank == 0:
            out(result.summary)
        dist.barrier()  # nobody tears the group down while a peer still talks to it
    except torch.OutOfMemoryError as exc:
        code = 1
        out({"type": "summary", "status": Status.OOM.value, "reason": f"rank {rank}: {str(exc).splitlines()[0]}"})
    finally:
        dist.destroy_process_group()
    return code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and the process group is gone: leave without running C++ static
    # destructors, where a c10d helper thread still joinable at exit made a finished run abort
    # now and then ("terminate called without an active exception", exit -6, seen under load).
    os._exit(status)
