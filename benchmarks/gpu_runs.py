"""The device check's runs of the trainable: one command each, in a process of its own, with its
figures beside the memory model's prediction (`benchmarks/gpu_check.py` runs them and writes the
results). World 1 (`small`, `moe64e`), a layout over every GPU of the machine (`world`), and the
expert kernels' efficiency (`kernels`). Imports only torch-free code here: the children import
torch, so a CUDA error poisons only that child."""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from autotune.predict.device_memory import overhead_for  # noqa: E402
from autotune.predict.memory import predict  # noqa: E402
from trainables.moe.config import ParallelDims, RunShape, flops_per_token, preset  # noqa: E402

# What each part runs, by device. CPU shapes keep CI quick; CUDA shapes are chosen to keep the
# card busy for a few seconds per step at most.
RUNS = {
    "cuda": {
        "small": dict(model="small", precision="bf16", micro_batch_size=8, global_batch_size=32, seq_len=1024,
                      warmup_steps=2, steps=5),
        "moe64e": dict(model="moe-64e", precision="bf16", micro_batch_size=2, global_batch_size=8, seq_len=2048,
                       warmup_steps=1, steps=3),
    },
    "cpu": {
        "small": dict(model="tiny", precision="bf16", micro_batch_size=2, global_batch_size=4, seq_len=64,
                      warmup_steps=1, steps=2),
        "moe64e": dict(model="tiny", precision="bf16-params", micro_batch_size=2, global_batch_size=4, seq_len=64,
                       warmup_steps=1, steps=2),
    },
}
# The multi-GPU part: the small run's model over every GPU (a CPU run: 4 ranks of the tiny one).
WORLD_RUNS = {
    "cuda": dict(model="small", precision="bf16", micro_batch_size=4, seq_len=1024, warmup_steps=2, steps=5),
    "cpu": dict(model="tiny", precision="fp32", micro_batch_size=2, seq_len=64, warmup_steps=1, steps=2),
}
CPU_WORLD = 4
MEMORY_FILL = 0.9  # of the card that the moe-64e layers may fill, by the device-level prediction
CPU_MEMORY_BUDGET = 12e6 # bytes: on CPU, the "card" the tiny model's layers are fitted into


def say(text: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------------------------------------
# Children: each part runs in a process of its own (a CUDA error poisons only that process)


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def run_child(cmd: list[str], limit_s: float, label: str, cwd: Path | None = None) -> tuple[int | None, str, float]:
    """Run `cmd`, echoing its output with a prefix; (exit code or None on timeout, tail, seconds)."""
    start = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=60)
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=_child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"  {label}| {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        code = None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(5)
    return code, "\n".join(tail), time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# Parts


def _train_cmd(run: dict[str, Any], device: str, n_layers: int | None, metrics: Path) -> list[str]:
    """The report's launch command: `python -m trainables.moe.train` alone, or under torchrun for
    a layout of several ranks (`run["dims"]`: ep, tp, pp, dp)."""
    dims = run.get("dims") or {}
    world = math.prod(dims.values()) if dims else 1
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m"] \
        if world > 1 else [sys.executable, "-m"]
    cmd = [*head, "trainables.moe.train", "--model", run["model"], "--device", device,
           "--metrics-out", str(metrics), "--timeout-s", "120"]
    for k in ("precision", "micro_batch_size", "global_batch_size", "seq_len", "warmup_steps", "steps"):
        cmd += ["--" + k.replace("_", "-"), str(run[k])]
    for k, v in dims.items():
        cmd += [f"--{k}", str(v)]
    if n_layers is not None:
        cmd += ["--model-config", json.dumps({"n_layers": n_layers})]
    return cmd


# Device profile (autotune/space/profiles/devices.yaml) by a fragment of the card's name.
CARD_PROFILES = (("H200", "H200"), ("H100", "H100-SXM"), ("A100", "A100-80GB"), ("B200", "B200"))


def profile_for_card(name: str | None) -> str | None:
    """The profile whose memory overhead terms describe this card; None: the default CUDA one."""
    return next((profile for fragment, profile in CARD_PROFILES if fragment in (name or "")), None)


def _prediction(run: dict[str, Any], device: str, n_layers: int | None, profile: str | None = None):
    model = preset(run["model"])
    if n_layers is not None:
        from dataclasses import replace

        model = replace(model, n_layers=n_layers)
    shape = RunShape(run["micro_batch_size"], run["global_batch_size"], run["seq_len"], run["precision"])
    dims = ParallelDims(**(run.get("dims") or {}))
    return model, predict(model, dims, shape, device, overhead_for(profile) if device == "cuda" else None)


def train_part(name: str, run: dict[str, Any], device: str, out: Path, limit_s: float, probe: dict[str, Any],
               n_layers: int | None = None) -> dict[str, Any]:
    """One world-1 run of the trainable's own command, and its figures beside the predictions."""
    metrics = out / f".{name}.metrics.jsonl"
    metrics.unlink(missing_ok=True)
    model, pred = _prediction(run, device, n_layers, probe.get("profile"))
    row: dict[str, Any] = {"part": name, "model": run["model"], "n_layers": model.n_layers,
                           **{k: run[k] for k in ("precision", "micro_batch_size", "global_batch_size", "seq_len")},
                           "pred_alloc_bytes": pred.total}
    if device == "cuda":
        row.update(pred_reserved_bytes=pred.reserved, pred_device_bytes=pred.device)
    say(f"{name}: {run['model']} x{model.n_layers} layers, {run['precision']}, micro-batch {run['micro_batch_size']}, "
        f"seq {run['seq_len']}; predicted peak {pred.total / 1e9:.2f} GB allocated"
        + (f", {pred.device / 1e9:.2f} GB on the device" if device == "cuda" else "") + f" (limit {limit_s:.0f} s)")
    code, tail, took = run_child(_train_cmd(run, device, n_layers, metrics), limit_s, name)
    row["duration_s"] = round(took, 1)
    summary = None
    if metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        summary = next((r for r in reversed(lines) if r.get("type") == "summary"), None)
    if code is None:
        row.update(status="timeout", reason=f"over its {limit_s:.0f} s limit")
    elif summary is not None and summary.get("status") != "ok":
        row.update(status=summary.get("status", "crashed"), reason=summary.get("reason", ""))
    elif code != 0 or summary is None:
        oom = "out of memory" in tail.lower() or "outofmemoryerror" in tail.lower()
        last = [line for line in tail.splitlines() if line.strip()][-3:]
        row.update(status="oom" if oom else "crashed", reason=f"exit {code}: " + " | ".join(last)[-600:])
    else:
        row["status"] = "ok"
        row.update(tokens_per_s=summary["tokens_per_s"], step_time_s=summary["step_time_s"],
                   mfu=summary.get("mfu"), alloc_bytes=summary.get("peak_mem_bytes"),
                   reserved_bytes=summary.get("peak_mem_reserved_bytes"),
                   device_bytes=summary.get("peak_mem_device_bytes"),
                   loss_first=summary["loss_first"], loss_last=summary["loss_last"],
                   memory_breakdown={k: summary.get(k) for k in ("mem_params_bytes", "mem_grads_bytes",
                                                                 "mem_optimizer_bytes", "mem_activations_bytes",
                                                                 "mem_other_bytes")},
                   predicted_breakdown=pred.as_metrics())
        ranks = summary.get("ranks") or [{}]
        row["device_source"] = "nvml" if device == "cuda" and _nvml_available() else (
            "cudaMemGetInfo" if device == "cuda" else "")
        if probe.get("matmul_flops"):
            row["mfu_vs_matmul"] = row["tokens_per_s"] * flops_per_token(model, run["seq_len"]) / probe["matmul_flops"]
        if row.get("alloc_bytes"):
            row["alloc_over_pred"] = row["alloc_bytes"] / pred.total
        if row.get("device_bytes"):
            row["device_over_pred"] = row["device_bytes"] / pred.device
        row["hosts"] = sorted({r.get("host", "") for r in ranks})
        row["world_size"] = len(ranks)
        # each rank's peak as the allocator and the driver saw it (the device calibration's samples)
        row["rank_memory"] = [{k: r.get(k) for k in ("peak_mem_bytes", "peak_mem_reserved_bytes",
                                                     "peak_mem_device_bytes")} for r in ranks]
    say(f"{name}: {row['status']}" + (f" ({row.get('reason')})" if row.get("reason") else "")
        + (f"; {row['tokens_per_s']:,.0f} tokens/s, MFU {_pct(row.get('mfu'))} of datasheet, "
           f"{_pct(row.get('mfu_vs_matmul'))} of the measured matmul; peak {_gb(row.get('alloc_bytes'))} allocated "
           f"(predicted {_gb(pred.total)}), {_gb(row.get('reserved_bytes'))} reserved, "
           f"{_gb(row.get('device_bytes'))} on the device" if row["status"] == "ok" else ""))
    return row


def _nvml_available() -> bool:
    return importlib.util.find_spec("pynvml") is not None


def fit_layers(run: dict[str, Any], device: str, budget: float, profile: str | None = None) -> int:
    """The most layers of the run's preset whose device-level prediction fits `budget` bytes."""
    best = 1
    for n in range(1, preset(run["model"]).n_layers + 1):
        _, pred = _prediction(run, device, n, profile)
        if pred.device <= budget:
            best = n
        else:
            break
    return best


def moe_part(device: str, out: Path, limit_s: float, probe: dict[str, Any], layers: int | None) -> dict[str, Any]:
    run = RUNS[device]["moe64e"]
    budget = MEMORY_FILL * probe["total_memory"] if device == "cuda" else CPU_MEMORY_BUDGET
    n = layers or fit_layers(run, device, budget, probe.get("profile"))
    deadline = time.monotonic() + limit_s
    row = train_part("moe64e", run, device, out, limit_s, probe, n)
    row["fit_budget_bytes"] = int(budget)
    if row["status"] == "oom" and n > 1 and deadline - time.monotonic() > 30:
        fewer = max(1, (n * 3) // 4)
        say(f"moe64e: {n} layers ran out of memory; once more with {fewer}")
        retry = train_part("moe64e", run, device, out, deadline - time.monotonic(), probe, fewer)
        retry.update(fit_budget_bytes=int(budget), first_attempt={"n_layers": n, "reason": row.get("reason")})
        return retry
    return row

def _gb(v: Any) -> str:
    return f"{v / 1e9:.2f} GB" if isinstance(v, (int, float)) else "-"


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) else "-"


# ---------------------------------------------------------------------------------------------
# Every GPU of the machine at once


def world_layouts(n: int, model: str) -> list[dict[str, int]]:
    """Layouts over `n` ranks for the multi-GPU part: one with as many of EP, TP, PP and DP above 1
    as `n`'s factors of 2 allow (EP first: the all-to-all is what a single GPU never shows), and
    plain DP over all of them beside it."""
    cfg = preset(model)
    dims = {"ep": 1, "tp": 1, "pp": 1, "dp": 1}
    left = n
    while left % 2 == 0 and left > 1:
        for name, ok in (("ep", lambda d: cfg.n_experts % (2 * d) == 0),
                         ("tp", lambda d: cfg.n_heads % (2 * d) == 0 and (cfg.ffn_hidden // (2 * d)) % 8 == 0),
                         ("pp", lambda d: cfg.n_layers % (2 * d) == 0), ("dp", lambda d: True)):
            if left % 2 == 0 and left > 1 and ok(dims[name]) and dims[name] == min(dims.values()):
                dims[name] *= 2
                left //= 2
    dims["dp"] *= left  # odd factors: data parallel
    out = [dims]
    if dims != {"ep": 1, "tp": 1, "pp": 1, "dp": n}:
        out.append({"ep": 1, "tp": 1, "pp": 1, "dp": n})
    return out


def world_part(device: str, out: Path, limit_s: float, probe: dict[str, Any], ranks: int) -> dict[str, Any]:
    """The `small` run's model over every GPU of the machine (NCCL between them), in the layouts of
    `world_layouts`: tokens/s, MFU, each rank's memory beside the prediction, and the device memory
    a rank with peers holds beyond the reservation (NCCL's communicators, measured: the
    `mem_nccl_bytes` of the card's profile)."""
    base = dict(WORLD_RUNS[device])
    deadline = time.monotonic() + limit_s
    runs = []
    layouts = world_layouts(ranks, base["model"])
    for dims in layouts if device == "cuda" else layouts[:1]:  # CPU: the path, in one run
        gbs = base["micro_batch_size"] * dims["dp"] * dims["ep"] * max(dims["pp"], 1) * 2
        run = {**base, "dims": dims, "global_batch_size": gbs}
        name = "world EP{ep}_TP{tp}_PP{pp}_DP{dp}".format(**dims)
        row = train_part(name, run, device, out, max(1.0, deadline - time.monotonic()), probe)
        row["dims"] = dims
        runs.append(row)
        if deadline - time.monotonic() < 30:
            break
    ok = [r for r in runs if r["status"] == "ok"]
    return {"part": "world", "status": "ok" if len(ok) == len(runs) else (runs[-1]["status"] if runs else "skipped"),
            "ranks": ranks, "runs": runs, "reason": "; ".join(r.get("reason", "") for r in runs if r.get("reason"))}


# ---------------------------------------------------------------------------------------------
# The expert kernels


def kernels_part(device: str, out: Path, limit_s: float) -> dict[str, Any]:
    """`benchmarks/kernel_efficiency.py` on this device: one 64-expert MoE layer and one step, the
    grouped GEMMs against the former loop over experts, with MFU on a GPU."""
    say(f"kernels: grouped expert GEMMs against the loop over experts (limit {limit_s:.0f} s)")
    code, tail, took = run_child([sys.executable, "-m", "benchmarks.kernel_efficiency", "--device", device,
                                  "--out", str(out)] + (["--quick"] if device == "cpu" else []), limit_s, "kernels")
    path = out / (f"kernel_efficiency_{device}" + ("_quick" if device == "cpu" else "") + ".json")
    row: dict[str, Any] = {"part": "kernels", "duration_s": round(took, 1)}
    if code is None:
        return {**row, "status": "timeout", "reason": f"over its {limit_s:.0f} s limit"}
    if not path.exists():
        return {**row, "status": "crashed", "reason": f"exit {code}: " + " | ".join(tail.splitlines()[-3:])[-600:]}
    data = json.loads(path.read_text())
    row.update(status="ok" if code == 0 else "goal missed", parts=data["parts"],
               gemm_ceiling_flops=data.get("gemm_ceiling_flops"), kernel_goal_met=data.get("kernel_goal_met"))
    return row
