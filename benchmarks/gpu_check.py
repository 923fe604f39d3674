"""One prepared device check: the trainable on every GPU of a machine and a small study, in at
most 8 minutes.

    python benchmarks/gpu_check.py --out DIR                 # one H100/H200 (the default device: cuda)
    python benchmarks/gpu_check.py --device cpu --out DIR    # the tiny preset on CPU (what CI runs)
    python benchmarks/gpu_check.py --parts small,moe64e --out DIR

Parts, each in a process of its own with its own time limit, each written to DIR as it ends
(`gpu_check.json`, one row per run in `gpu_check.csv`; `gpu_check_cpu.*` with `--device cpu`), so
a crash or an out-of-memory in one part keeps the others:

* `device` (always first): the card(s), its memory, the CUDA context's own bytes, and a bf16
  8192^3 matrix product's rate: the baseline the trainable's MFU is set against, beside the
  datasheet's peak;
* `small`: the trainable's `small` preset, bf16, world 1 (`python -m trainables.moe.train`, the
  report's launch command): tokens/s, MFU, and memory predicted vs allocated vs reserved vs the
  device's used memory (NVML);
* `moe64e`: the `moe-64e` preset with as many layers as the memory model says fit the card
  (fewer once if that still runs out of memory), the same figures;
* `kernels`: `benchmarks/kernel_efficiency.py`, one 64-expert MoE layer and one step, the
  grouped expert GEMMs against the former loop over experts, with MFU against the datasheet and
  against the measured GEMM ceiling;
* `world` (machines with several GPUs; 4 CPU ranks with `--device cpu`): the `small` preset's
  model over every GPU under torchrun (NCCL), in a layout with as many of EP, TP, PP and DP above
  1 as the count allows and in plain DP, each rank's memory beside the prediction; the device
  memory a rank with peers holds beyond a lone one is NCCL's, and `calibrated` measures
  `mem_nccl_bytes` from it instead of keeping the profile's estimate;
* `study`: a 6-trial `autotune run` of `benchmarks/spaces/gpu_check.yaml` over micro-batch,
  precision and recompute, with its report copied to DIR, and the cluster profile the study
  measured on the card before its first trial (GEMM rates per precision, copy bandwidth) kept
  in the JSON as `cluster_probe`. It needs ray, optuna, mlflow and pydantic; where they are
  missing it is skipped, and the JSON says so.

The probe records the torch build (version, git hash, CUDA, NCCL, cuDNN). The parts but the study
import only torch, numpy-free standard library, the trainable and
`autotune/predict/memory.py` (with pyyaml for the device profiles), so they run where no tuner is
installed. Predictions on CUDA use the memory overhead terms of the card's device profile
(`autotune/space/profiles/devices.yaml`); `calibrated` in the JSON is those terms fitted from the
measured runs, ready to be written into the profile.

With `--device cpu` every part runs the tiny preset on CPU (smaller shapes, a few MB of memory
budget for the layer count), so that the whole path, NVML and CUDA aside, is exercised by
`tests/benchmarks/test_benchmarks_quick.py`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from autotune.predict.device_memory import Sample, calibrate, overhead_for  # noqa: E402
from benchmarks.gpu_runs import (CPU_WORLD, RUNS, _gb, kernels_part, moe_part, profile_for_card,  # noqa: E402
                                 run_child, say, train_part, world_part)

PARTS = ("small", "moe64e", "kernels", "world", "study")
# Seconds: all parts together, and each part's own limit. On a card the whole check fits 8
# minutes (it took 2 on an H200 without the study); a shared 2-core CI machine may be far slower.
BUDGET_S = {"cuda": 480.0, "cpu": 1200.0}
LIMITS_S = {"cuda": {"device": 60.0, "small": 100.0, "moe64e": 150.0, "kernels": 120.0, "world": 240.0,
                     "study": 200.0},
            "cpu": {"device": 120.0, "small": 300.0, "moe64e": 300.0, "kernels": 240.0, "world": 300.0,
                    "study": 480.0}}
TUNER_MODULES = ("ray", "optuna", "mlflow", "pydantic")
CSV_FIELDS = ("part", "status", "model", "world_size", "n_layers", "precision", "micro_batch_size", "global_batch_size",
              "seq_len", "tokens_per_s", "step_time_s", "mfu", "mfu_vs_matmul", "pred_alloc_bytes",
              "alloc_bytes", "pred_reserved_bytes", "reserved_bytes", "pred_device_bytes", "device_bytes",
              "device_source", "alloc_over_pred", "device_over_pred", "duration_s", "reason")

def device_probe(device: str) -> dict[str, Any]:
    """Runs in a child: what the card is, what a bare CUDA context costs, a matmul's rate."""
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0], "device": device,
                           "torch_build": {"git": torch.version.git_version, "cuda": torch.version.cuda,
                                           "debug": torch.version.debug}}
    if device == "cpu":
        a = torch.randn(1024, 1024)
        a @ a
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        dt = (time.perf_counter() - t0) / 5
        out.update(name="cpu", matmul_flops=2 * 1024**3 / dt, matmul="fp32 1024^3", total_memory=None)
        return out
    before = _nvml_used_before_context()
    dev = torch.device("cuda", 0)
    out["gpus"] = torch.cuda.device_count()
    try:
        out["torch_build"]["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        out["torch_build"]["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # a build without NCCL or cuDNN
        pass
    torch.cuda.init()
    props = torch.cuda.get_device_properties(dev)
    out.update(name=torch.cuda.get_device_name(dev), total_memory=int(props.total_memory),
               capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
               cuda=torch.version.cuda, used_before_context=before)
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize(dev)
    out.update(matmul_flops=2 * n**3 * 10 / (start.elapsed_time(end) / 1e3), matmul="bf16 8192^3, mean of 10")
    from trainables.moe.measure import device_peak_flops, device_used_bytes

    out["datasheet_bf16_flops"] = device_peak_flops(dev, "bf16")
    del a, b
    used, source = device_used_bytes(dev)
    out.update(used_with_context=used, used_source=source, reserved=int(torch.cuda.memory_reserved(dev)))
    if before is not None:
        out["context_bytes"] = used - before - out["reserved"]
    return out


def _nvml_used_before_context() -> int | None:
    """The device's used memory before this process creates a CUDA context (NVML needs none)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(visible)) if visible.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(visible))
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Parts


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """Those of `names` that do not import here (absent, or installed but broken)."""
    out = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            out.append(name)
    return out


def study_part(device: str, out: Path, limit_s: float, probe: dict[str, Any]) -> dict[str, Any]:
    """A 6-trial `autotune run` on this one device, its report copied next to the JSON."""
    missing = missing_modules(TUNER_MODULES)
    if missing:
        reason = (f"skipped: {', '.join(missing)} not installed here (the tuner's dependencies); "
                  f"install the project (pip install .) or carry their wheels to run the study part")
        say(f"study: {reason}")
        return {"part": "study", "status": "skipped", "reason": reason}
    import yaml

    space = yaml.safe_load((ROOT / "benchmarks" / "spaces" / "gpu_check.yaml").read_text())
    if device == "cpu":
        space["model"] = {"preset": "tiny"}
        space["cluster"].update(device="cpu", memory_gb=0.05, cpus_per_rank=1)
        space["search"].update(micro_batch_size=[2, 4], global_batch_size=8, seq_len=64)
        space["budget"].update(trials=2, warmup_steps=1, measure_steps=2, trial_timeout_s=120,
                               remeasure_share=0)  # CI: the path, not the figures
    else:
        space["cluster"]["memory_gb"] = round(probe["total_memory"] / 1e9, 1)
    work = out / "study"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    say(f"study: {space['budget']['trials']} trials of {space['model']['preset']} on one {device} rank "
        f"(limit {limit_s:.0f} s)")
    cmd = [sys.executable, "-m", "autotune.cli", "run", "space.yaml", "--plain"]
    code, tail, took = run_child(cmd, limit_s, "study", cwd=work)
    row: dict[str, Any] = {"part": "study", "model": space["model"]["preset"]}
    row["duration_s"] = round(took, 1)
    report = work / "autotune-runs" / space["study"]["name"] / "report"
    for suffix in ("md", "json"):
        if (report / f"report.{suffix}").exists():
            shutil.copy(report / f"report.{suffix}", out / f"{stem_of(device)}_study_report.{suffix}")
    data = json.loads((report / "report.json").read_text()) if (report / "report.json").exists() else None
    if code is None:
        row.update(status="timeout", reason=f"over its {limit_s:.0f} s limit")
    elif code not in (0, 1) or data is None:
        row.update(status="crashed", reason=f"exit {code}: " + " | ".join(tail.splitlines()[-3:])[-600:])
    else:
        row["status"] = "ok" if code == 0 else "no feasible layout"
        row.update(_study_figures(data))
    probe_row = row.get("cluster_probe")
    if probe_row:
        rates = ", ".join(f"{p} {r.get('dense', 0):,.2f}" for p, r in (probe_row.get("gemm_tflops") or {}).items())
        say("study: cluster profile " + (f"failed: {probe_row['error']}" if probe_row.get("error") else
                                          f"{'reused' if probe_row.get('reused') else 'measured'} in "
                                          f"{probe_row.get('wall_s') or 0:.1f} s; dense GEMM TFLOP/s {rates}"))
    say(f"study: {row['status']}" + (f" ({row.get('reason')})" if row.get("reason") else "")
        + (f"; best {row.get('best_layout')} at {row.get('tokens_per_s') or 0:,.0f} tokens/s" if code == 0 else ""))
    return row


def _study_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The best layout, its figures and how the trials ended, from the study's own report."""
    best = report.get("best") or {}
    perf, mem = best.get("performance") or {}, best.get("memory") or {}
    trials = report.get("trials") or {}
    return {"best_layout": best.get("key"), "tokens_per_s": perf.get("tokens_per_s"),
            "step_time_s": perf.get("step_time_s"), "mfu": perf.get("mfu"),
            "alloc_bytes": mem.get("peak_bytes"), "pred_alloc_bytes": mem.get("predicted_peak_bytes"),
            "reserved_bytes": mem.get("reserved_bytes"), "pred_reserved_bytes": mem.get("predicted_reserved_bytes"),
            "device_bytes": mem.get("device_bytes"), "pred_device_bytes": mem.get("predicted_device_bytes"),
            "verdict": (report.get("verdict") or {}).get("status"), "trials": trials.get("total"),
            "trial_counts": trials.get("counts_by_status"), "cluster_probe": _probe_figures(report)}


PROBE_FIELDS = ("device", "device_name", "world", "measured_at", "measure_s", "wall_s", "reused", "error",
                "gemm_tflops", "gemm_errors", "copy_gb_s", "layer", "fits")


def _probe_figures(report: dict[str, Any]) -> dict[str, Any] | None:
    """The cluster profile the study measured on this card before its first trial (GEMM rates per
    precision, copy bandwidth, a layer's fixed cost, collectives' fits): kept with the card's figures, so that a GPU
    run of this script records what the step-time model started from."""
    probe = report.get("cluster_probe")
    return {k: probe.get(k) for k in PROBE_FIELDS} if isinstance(probe, dict) else None


# ---------------------------------------------------------------------------------------------
# Results


def stem_of(device: str) -> str:
    """Result file names: a CPU run never overwrites a card's figures in the same folder."""
    return "gpu_check" if device == "cuda" else "gpu_check_cpu"


def write(out: Path, result: dict[str, Any]) -> None:
    """Both files, rewritten after every part: whatever finished is on disk."""
    rows = []
    for r in result["parts"].values():
        if isinstance(r, dict) and "status" in r:
            rows.extend(r["runs"] if r.get("part") == "world" and r.get("runs") else [r])
    samples = [Sample(int(r["alloc_bytes"]), int(r["reserved_bytes"]), int(r["device_bytes"]))
               for r in rows if r.get("status") == "ok" and r.get("world_size", 1) == 1 and r.get("device_bytes")
               and r.get("reserved_bytes") and r.get("alloc_bytes")]
    # ranks with peers: NCCL's communicators are what they hold beyond a lone rank
    samples += [Sample(int(m["peak_mem_bytes"]), int(m["peak_mem_reserved_bytes"]), int(m["peak_mem_device_bytes"]),
                       world_size=r["world_size"])
                for r in rows if r.get("status") == "ok" and r.get("world_size", 1) > 1
                for m in r.get("rank_memory", []) if all(m.get(k) for k in m)]
    if samples:
        profile = result["probe"].get("profile")
        result["calibrated"] = {
            "profile": profile or "(default CUDA profile)",
            **calibrate(samples, nccl_default=overhead_for(profile).nccl_bytes).as_profile_fields(),
            "source": (f"benchmarks/gpu_check.py on {result['probe'].get('name')}, torch {result['probe'].get('torch')}, "
                       f"{time.strftime('%Y-%m-%d')}: {sum(s.world_size == 1 for s in samples)} world-1 run(s)"
                       + (f", {sum(s.world_size > 1 for s in samples)} rank(s) with peers (mem_nccl_bytes measured)"
                          if any(s.world_size > 1 for s in samples) else
                          "; mem_nccl_bytes kept from the profile (no rank had peers)"))}
    out.mkdir(parents=True, exist_ok=True)
    stem = stem_of(result["device"])
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    with (out / f"{stem}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One prepared device check (see the module docstring).")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder for gpu_check.json/.csv (gpu_check_cpu.* on CPU) and the study's report")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"all parts together (default {BUDGET_S['cuda']:.0f} on cuda, {BUDGET_S['cpu']:.0f} on cpu)")
    p.add_argument("--moe-layers", type=int, default=None, help="moe-64e layers (default: as many as fit)")
    p.add_argument("--child-probe", type=Path, default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child_probe is not None:
        ns.child_probe.write_text(json.dumps(device_probe(ns.device)))
        return 0
    parts = [x.strip() for x in ns.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        print(f"error: --parts {ns.parts!r}: unknown part(s) {', '.join(unknown) or '(none given)'}; "
              f"choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    start = time.monotonic()
    out: Path = ns.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"device": ns.device, "parts_asked": parts, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                              "probe": {}, "parts": {}}

    budget_s = ns.budget_s if ns.budget_s is not None else BUDGET_S[ns.device]

    def left(part: str) -> float:
        return max(1.0, min(LIMITS_S[ns.device][part], budget_s - (time.monotonic() - start)))

    say(f"device probe on {ns.device}")
    probe_file = out / ".probe.json"
    probe_file.unlink(missing_ok=True)
    code, tail, _ = run_child([sys.executable, str(Path(__file__).resolve()), "--device", ns.device,
                               "--child-probe", str(probe_file)], left("device"), "device")
    if code != 0 or not probe_file.exists():
        result["probe"] = {"status": "failed", "reason": f"exit {code}: " + " | ".join(tail.splitlines()[-3:])}
        write(out, result)
        say(f"device probe failed: {result['probe']['reason']}")
        return 1
    result["probe"] = probe = json.loads(probe_file.read_text())
    if ns.device == "cuda":
        probe["profile"] = profile_for_card(probe.get("name"))  # its memory overhead terms
    say(f"device: {probe.get('name')}, {_gb(probe.get('total_memory'))}, torch {probe['torch']}; matmul "
        f"{probe['matmul_flops'] / 1e12:.1f} TFLOP/s ({probe['matmul']})"
        + (f", context {_gb(probe.get('context_bytes'))}" if probe.get("context_bytes") is not None else ""))
    write(out, result)
    for part in parts:
        budget = left(part)
        try:
            if part == "small":
                row = train_part("small", RUNS[ns.device]["small"], ns.device, out, budget, probe)
            elif part == "moe64e":
                row = moe_part(ns.device, out, budget, probe, ns.moe_layers)
            elif part == "kernels":
                row = kernels_part(ns.device, out, budget)
            elif part == "world":
                ranks = probe.get("gpus", 1) if ns.device == "cuda" else CPU_WORLD
                row = (world_part(ns.device, out, budget, probe, ranks) if ranks > 1 else
                       {"part": "world", "status": "skipped", "reason": "one GPU: no layout over several ranks"})
            else:
                row = study_part(ns.device, out, budget, probe)
        except Exception as exc:  # one part's failure is recorded, the others still run
            row = {"part": part, "status": "crashed", "reason": f"{type(exc).__name__}: {exc}"[:600]}
            say(f"{part}: crashed in the check itself: {row['reason']}")
        result["parts"][part] = row
        write(out, result)
    result["duration_s"] = round(time.monotonic() - start, 1)
    write(out, result)
    for f in out.glob(".*.metrics.jsonl"):
        f.unlink()
    probe_file.unlink(missing_ok=True)
    say(f"done in {result['duration_s']:.0f} s: " + ", ".join(f"{k} {v['status']}" for k, v in result["parts"].items())
        + f"; {out / (stem_of(ns.device) + '.json')}")
    if "calibrated" in result:
        say(f"calibrated CUDA overhead: {json.dumps(result['calibrated'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
