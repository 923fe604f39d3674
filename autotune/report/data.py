"""A study's results -> the report as JSON-able data: the single source of every rendering.

`build_report` takes every figure from the trial records and derives the rest here (ranking,
memory by category, the best layout's launch command and environment, counts by reason). The
checks and the verdict are autotune/report/checks.py's, the Pareto front and the early-stopped
trials autotune/report/front.py's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from autotune.records.results import StudyResult, launch_command
from autotune.report.checks import _cap_bytes, _checks, _fits, _verdict
from autotune.report.format import memory_unit
from autotune.report.front import front_data, stopped_data
from autotune.schema import MEMORY_CATEGORIES, Status, pred_name
from autotune.search.stats import Interval
from autotune.space.layout import rule_of
from autotune.trial_record import TrialRecord

TOP_N = 10
MEMORY_BARS = 4  # trials in the memory plot: the best and the next fastest
NO_MFU = "not measured: peak FLOP/s of this device unknown"

CATEGORY_NAMES = {"mem_params_bytes": "params", "mem_grads_bytes": "grads", "mem_optimizer_bytes": "optimizer",
                  "mem_activations_bytes": "activations", "mem_other_bytes": "other"}


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _clean(obj: Any) -> Any:
    """JSON-able copy: tuples become lists, NaN and infinities become None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj



def _label(t: TrialRecord) -> str:
    return f"#{t.number} {t.layout.name} mb{t.layout.micro_batch_size} {t.layout.precision} {t.layout.recompute}"


def _ok_status(t: TrialRecord) -> str:
    """How a finished trial that does not fit reads: over the cap, or never measured."""
    if "peak_mem_bytes" not in t.metrics:
        return "ok: peak memory not measured"
    return "ok: measured peak over the memory cap"


def _reason_key(t: TrialRecord) -> str:
    """Why a trial is not usable, with its numbers masked, so that alike failures count together."""
    if t.ok:
        return _ok_status(t)
    text = (t.reason or "no reason recorded").strip().splitlines()[0]
    if t.status == Status.INVALID:
        text = rule_of(text)
    return f"{t.status.value}: " + re.sub(r"\b\d+(?:\.\d+)?\b", "#", text)


def _ranking(result: StudyResult) -> list[TrialRecord]:
    """Fitting layouts by throughput (one row per layout, its runs pooled), then layouts over the
    cap, then the trials that did not finish."""
    cap = _cap_bytes(result)

    def order(t: TrialRecord) -> tuple[int, float, int]:
        group = 0 if _fits(t, cap) else 1 if t.ok else 2
        return group, -t.tokens_per_s if t.ok else 0.0, t.number

    return sorted(result.ok_trials() + [t for t in result.trials if not t.ok], key=order)


def _memory(t: TrialRecord) -> dict[str, Any]:
    """Measured and predicted bytes per category of one trial's worst rank."""
    return {"measured": {CATEGORY_NAMES[c]: t.metrics.get(c) for c in MEMORY_CATEGORIES},
            "predicted": {CATEGORY_NAMES[c]: t.prediction.get(pred_name(c)) for c in MEMORY_CATEGORIES},
            "peak_bytes": t.metrics.get("peak_mem_bytes"),
            "predicted_peak_bytes": t.prediction.get("pred_peak_mem_bytes"),
            # CUDA: the allocator's reservation and the device's used memory (NVML) at the peak
            "reserved_bytes": t.metrics.get("peak_mem_reserved_bytes"),
            "predicted_reserved_bytes": t.prediction.get("pred_peak_mem_reserved_bytes"),
            "device_bytes": t.metrics.get("peak_mem_device_bytes"),
            "predicted_device_bytes": t.prediction.get("pred_peak_mem_device_bytes")}


def _env(result: StudyResult, command: str) -> list[dict[str, str]]:
    """What the launch command needs in its environment, and nothing it does not."""
    out = []
    if result.spec.cluster.device == "cpu":
        threads = max(1, int(result.spec.cluster.cpus_per_rank))
        out.append({"name": "OMP_NUM_THREADS", "value": str(threads),
                    "why": "intra-op threads per rank = cluster.cpus_per_rank (at least 1), so the ranks "
                           "of a node do not oversubscribe its cores"})
    needed = dict.fromkeys(re.findall(r"\$([A-Z_][A-Z0-9_]*)", command))
    for name in needed:
        if name == "MASTER_ADDR":
            out.append({"name": name, "value": "<host name or IP of the first node>",
                        "why": "rendezvous endpoint that every node's torchrun connects to"})
        elif name == "MASTER_PORT":
            out.append({"name": name, "value": "<a free TCP port on that host>",
                        "why": "rendezvous port on the first node"})
        else:
            out.append({"name": name, "value": "<set it>", "why": "referenced by the launch command"})
    return out



def _best_section(result: StudyResult, best: TrialRecord) -> dict[str, Any]:
    spec, m = result.spec, best.metrics
    model = spec.model.config()
    cap, rank_mem = _cap_bytes(result), spec.cluster.memory_bytes
    peak = m.get("peak_mem_bytes")
    command = launch_command(spec, best.layout)
    nodes = re.search(r"--nnodes=(\d+)", command)
    times = [float(x) for x in best.step_times]
    mfu = _finite(m.get("mfu"))
    return {
        "number": best.number, "name": best.layout.name, "key": best.layout.key, "layout": best.layout.params(),
        "memory": {**_memory(best), "rank_memory_bytes": rank_mem, "cap_bytes": cap,
                   "headroom_to_cap_bytes": None if peak is None else cap - peak,
                   "headroom_to_rank_bytes": None if peak is None else rank_mem - peak,
                   "peak_fraction_of_rank": None if peak is None else peak / rank_mem},
        "performance": {"tokens_per_s": m.get("tokens_per_s"), "samples_per_s": m.get("samples_per_s"),
                        "step_time_s": m.get("step_time_s"), "step_time_p90_s": m.get("step_time_p90_s"),
                        "step_time_min_s": min(times) if times else None,
                        "step_time_max_s": max(times) if times else None, "measured_steps": len(times),
                        "mfu": mfu, "mfu_note": "" if mfu is not None else NO_MFU,
                        # figures autotune computed from the program's printed ones (trainables.command_metrics)
                        "derived": best.reason if best.reason.startswith("derived") else ""},
        "moe": {"n_experts": model.n_experts, "top_k": model.top_k, "ep": best.layout.ep,
                "experts_per_rank": model.n_experts // best.layout.ep,
                "expert_load_imbalance": m.get("expert_load_imbalance"),
                "tokens_dropped_frac": m.get("tokens_dropped_frac")},
        "loss": {"first": m.get("loss_first"), "last": m.get("loss_last"), "steps": len(best.losses)},
        "ranks": [dict(r) for r in best.ranks],
        "launch": {"command": command, "nodes": int(nodes.group(1)) if nodes else 1,
                   "env": _env(result, command)},
    }


def _trial_row(rank: int, t: TrialRecord, cap: float, best: TrialRecord | None,
               tied: frozenset[str] = frozenset(), shown: Interval | None = None) -> dict[str, Any]:
    """One row of the ranking; `shown` is the layout's interval as the whole report shows it
    (`StudyResult.shown_intervals`), so that one layout has one interval on the page."""
    status = _ok_status(t) if t.ok and not _fits(t, cap) else t.status.value
    lo, hi = (shown.lo, shown.hi) if shown is not None and shown.known else (None, None)
    return {"rank": rank, "number": t.number, "layout": t.layout.name, "key": t.layout.key,
            "mb": t.layout.micro_batch_size, "precision": t.layout.precision, "recompute": t.layout.recompute,
            "schedule": t.layout.schedule, "world": t.layout.world_size,
            "tokens_per_s": t.metrics.get("tokens_per_s") if t.ok else None,
            "pred_tokens_per_s": t.prediction.get("pred_tokens_per_s"),  # the step-time model's, at launch
            "step_time_s": t.metrics.get("step_time_s") if t.ok else None,
            "step_time_lo_s": lo if t.ok else None, "step_time_hi_s": hi if t.ok else None,
            "peak_mem_bytes": t.metrics.get("peak_mem_bytes"), "status": status,
            "best": best is not None and t.number == best.number, "tied": t.ok and t.layout.key in tied}


def build_report(result: StudyResult) -> dict[str, Any]:
    """Everything the report says, as JSON-able data: the single source of every rendering."""
    spec = result.spec
    model = spec.model.config()
    cap, rank_mem = _cap_bytes(result), spec.cluster.memory_bytes
    best = result.best()
    ranked = _ranking(result)
    bar_trials = [t for t in ranked if _fits(t, cap)][:MEMORY_BARS]
    shown_memory = [rank_mem, cap] + [v for t in result.trials for v in
                                      (t.metrics.get("peak_mem_bytes"), t.prediction.get("pred_peak_mem_bytes"))]
    unit = memory_unit(shown_memory)
    front = {t.number for t in result.pareto()}
    by_reason = dict(Counter(_reason_key(t) for t in ranked if not _fits(t, cap)).most_common())
    checks = _checks(result, best, unit) if best is not None else []
    evidence = result.evidence()  # one bootstrap of every leader for the standing and the ranking
    standing = result.standing(evidence)
    tied = frozenset(t["layout"] for t in standing["tied"]) if standing else frozenset()
    shown = result.shown_intervals(evidence)
    report = {
        "title": f"Deployment report: {result.name}",
        "study": {"name": result.name, "model": spec.model.preset, "n_experts": model.n_experts,
                  "top_k": model.top_k, "device": spec.cluster.device, "cluster_ranks": spec.cluster.total_ranks,
                  "nodes": spec.cluster.nodes, "rank_memory_bytes": rank_mem,
                  "memory_cap": spec.objective.memory_cap, "cap_bytes": cap,
                  "global_batch_size": spec.search.global_batch_size, "seq_len": spec.search.seq_len,
                  "world_sizes": spec.world_sizes, "trials": len(result.trials), "wall_s": result.wall_s,
                  "machine": dict(result.machine), "mlflow_parent_run_id": result.mlflow_parent_run_id},
        "unit": unit,
        "cluster_probe": _probe_section(result),
        "verdict": _verdict(result, best, checks, by_reason, standing),
        "best": _best_section(result, best) if best is not None else None,
        "standing": standing,
        "checks": checks,
        "trials": {
            "total": len(result.trials),
            "counts_by_status": result.counts_by_status(),
            "counts_by_reason": by_reason,
            "top": [_trial_row(i, t, cap, best, tied, shown.get(t.layout.key))
                    for i, t in enumerate(ranked[:TOP_N], start=1)],
            "not_ok": [{"number": t.number, "layout": t.layout.key, "status": t.status.value, "reason": t.reason}
                       for t in result.trials if not t.ok],
            "points": [{"number": t.number, "label": _label(t), "tokens_per_s": t.tokens_per_s,
                        "peak_mem_bytes": t.metrics["peak_mem_bytes"], "pareto": t.number in front,
                        "best": best is not None and t.number == best.number}
                       for t in result.ok_trials() if "peak_mem_bytes" in t.metrics],
        },
        "memory_bars": [{"number": t.number, "label": _label(t), **_memory(t)} for t in bar_trials],
        "front": front_data(result),
        "stopped": stopped_data(result),
        "changes": result.changes(),
        "tracking_error": result.tracking_error,
    }
    return _clean(report)


def _probe_section(result: StudyResult) -> dict[str, Any] | None:
    """What the cluster profile measured, with its cost against the trials' (plain numbers)."""
    probe = result.cluster_probe
    if not probe:
        return None
    trials_s = sum(t.duration_s or 0.0 for t in result.trials)
    out = {k: probe.get(k) for k in ("measured_at", "world", "device", "device_name", "measure_s", "wall_s",
                                      "reused", "error")}
    out["trials_s"] = trials_s
    rates: dict[str, dict[str, float]] = {}
    out["gemm_errors"] = [f"{g['precision']} {g['groups']}x{g['rows']}x{g['k']}x{g['n']}: {g['error']}"
                          for g in probe.get("gemms", []) if "error" in g]
    for g in (g for g in probe.get("gemms", []) if "tflops" in g):
        kind = "grouped" if g["groups"] > 1 else "dense"
        mine = rates.setdefault(g["precision"], {})
        mine[kind] = max(mine.get(kind, 0.0), g["tflops"])
    out["gemm_tflops"] = rates
    out["copy_gb_s"] = probe.get("copy_gb_s")
    out["layer"] = probe.get("layer")
    out["fits"] = probe.get("fits", [])
    return out

