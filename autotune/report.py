"""A study's results -> a deployment report: verdict, evidence, plots and the launch command.

`build_report` takes every figure from the trial records and derives the rest in one place;
markdown, HTML and JSON are renderings of that one dict, and all of them format numbers with
the same helpers, so a figure reads the same wherever it appears.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.layout import rule_of
from autotune.report_front import front_blocks, front_data, stopped_blocks, stopped_data
from autotune.results import StudyResult, TrialRecord, launch_command
from autotune.schema import MEMORY_CATEGORIES, Status, pred_name

PREDICTION_TOLERANCE = 0.10  # |predicted - measured| / measured peak
SPREAD_LIMIT = 1.25  # step_time_p90 / median
IMBALANCE_LIMIT = 2.0  # max tokens on one expert / mean
DROPPED_LIMIT = 0.01  # fraction of routed tokens
TOKENS_TOLERANCE = 0.005  # tokens_per_s against global batch x seq_len / step time
TOP_N = 10
MEMORY_BARS = 4  # trials in the memory plot: the best and the next fastest
RANK_ROWS = 16  # per-rank rows shown in text (the JSON has them all)
FAILURE_ROWS = 50
NO_MFU = "not measured: peak FLOP/s of this device unknown"

CATEGORY_NAMES = {"mem_params_bytes": "params", "mem_grads_bytes": "grads", "mem_optimizer_bytes": "optimizer",
                  "mem_activations_bytes": "activations", "mem_other_bytes": "other"}
CATEGORY_COLORS = {"params": "#4c72b0", "grads": "#55a868", "optimizer": "#c44e52", "activations": "#8172b2",
                   "other": "#ccb974"}


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    html: Path
    json: Path
    pareto_png: Path
    memory_png: Path


# ---------------------------------------------------------------------------------------------
# Formatting: the only place numbers become text


def memory_unit(values: Iterable[float | None]) -> dict[str, Any]:
    """One unit for the whole report: MB when every value is under 1 GB (tiny CPU runs), else GB."""
    largest = max((v for v in values if v is not None), default=0)
    if largest < 1e9:
        return {"name": "MB", "bytes": 1e6, "decimals": 2}
    return {"name": "GB", "bytes": 1e9, "decimals": 3}


def fmt_mem(n: float | None, unit: dict[str, Any], with_unit: bool = True) -> str:
    if n is None:
        return "-"
    text = f"{n / unit['bytes']:.{unit['decimals']}f}"
    return f"{text} {unit['name']}" if with_unit else text


def fmt_tokens(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def fmt_pct(x: float | None, decimals: int = 1) -> str:
    return "-" if x is None else f"{x * 100:.{decimals}f}%"


def fmt_dropped(x: float | None) -> str:
    """Dropped tokens are usually 0 or tiny: enough decimals that 0.04% does not read as 0.0%."""
    return fmt_pct(x, 3)


def fmt_num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if math.isfinite(x) else str(x)


def fmt_error(predicted: float | None, measured: float | None) -> str:
    """Prediction error relative to the measurement, signed: + means the model over-predicts."""
    if predicted is None or not measured:
        return "-"
    return f"{(predicted - measured) / measured:+.1%}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt_loss(x: float | None) -> str:
    """Six significant digits: a short run's loss moves in the third decimal."""
    return fmt_num(x, 6)


# ---------------------------------------------------------------------------------------------
# Building the report content


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


def _cap_bytes(result: StudyResult) -> float:
    # The same expression as StudyResult.best(), so "fits" means the same in both places.
    return result.spec.objective.memory_cap * result.spec.cluster.memory_bytes


def _fits(t: TrialRecord, cap: float) -> bool:
    return t.ok and t.held_bytes is not None and t.held_bytes <= cap


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


def _check(cid: str, name: str, passed: bool | None, gates: bool, figure: Any, limit: Any,
           detail: str) -> dict[str, Any]:
    return {"id": cid, "name": name, "passed": passed, "gates": gates, "figure": figure, "limit": limit,
            "detail": detail}


def _checks(result: StudyResult, best: TrialRecord, unit: dict[str, Any]) -> list[dict[str, Any]]:
    """Every validation of the best trial, each with its figure; `gates` marks those READY needs."""
    spec, m = result.spec, best.metrics
    cap, rank_mem = _cap_bytes(result), spec.cluster.memory_bytes
    checks = []

    peak = m.get("peak_mem_bytes")
    # On CUDA what runs out is the device's used memory (context, NCCL, allocator cache included).
    held = best.held_bytes
    what = "device memory at the peak (NVML)" if "peak_mem_device_bytes" in m else "peak memory"
    checks.append(_check(
        "peak_within_cap", f"{what} within cap", None if held is None else held <= cap, True, held, cap,
        f"{fmt_mem(held, unit)} of {fmt_mem(cap, unit)} cap ({spec.objective.memory_cap:.0%} of "
        f"{fmt_mem(rank_mem, unit)})" if held is not None else "peak memory not measured"))

    pred = best.prediction.get("pred_peak_mem_bytes")
    err = (pred - peak) / peak if pred is not None and peak else None
    checks.append(_check(
        "memory_prediction", f"memory prediction within {PREDICTION_TOLERANCE:.0%} of measured peak",
        None if err is None else abs(err) <= PREDICTION_TOLERANCE, False, err, PREDICTION_TOLERANCE,
        f"predicted {fmt_mem(pred, unit)} vs measured {fmt_mem(peak, unit)} ({fmt_error(pred, peak)})"
        if err is not None
        else "no prediction recorded"))

    first, last = m.get("loss_first"), m.get("loss_last")
    losses = list(best.losses) or [v for v in (first, last) if v is not None]
    if first is None or last is None:
        ok_loss, detail = None, "loss not recorded"
    else:
        finite = all(math.isfinite(v) for v in [*losses, first, last])
        ok_loss = finite and last < first
        detail = f"first {fmt_loss(first)} -> last {fmt_loss(last)}" + ("" if finite else " (non-finite values)")
    checks.append(_check("loss_decreasing", "loss finite and decreasing", ok_loss, True,
                         {"first": first, "last": last}, "last < first", detail))

    median, p90 = m.get("step_time_s"), m.get("step_time_p90_s")
    ratio = p90 / median if median and p90 is not None else None
    checks.append(_check(
        "throughput_stable", f"throughput stable (p90/median <= {SPREAD_LIMIT})",
        None if ratio is None else ratio <= SPREAD_LIMIT, True, ratio, SPREAD_LIMIT,
        f"p90 {fmt_ms(p90)} ms / median {fmt_ms(median)} ms = {ratio:.3f}" if ratio is not None
        else "step times not recorded"))

    imb = m.get("expert_load_imbalance")
    checks.append(_check(
        "expert_balance", f"expert load imbalance <= {IMBALANCE_LIMIT}",
        None if imb is None else imb <= IMBALANCE_LIMIT, False, imb, IMBALANCE_LIMIT,
        f"max/mean tokens per expert {fmt_num(imb)}" if imb is not None else "not measured"))

    dropped = m.get("tokens_dropped_frac")
    checks.append(_check(
        "tokens_dropped", f"tokens dropped <= {DROPPED_LIMIT:.0%}",
        None if dropped is None else dropped <= DROPPED_LIMIT, True, dropped, DROPPED_LIMIT,
        f"{fmt_dropped(dropped)} of routed tokens" if dropped is not None else "not measured"))

    tps = m.get("tokens_per_s")
    tokens = spec.search.global_batch_size * spec.search.seq_len
    expected = tokens / median if median else None
    rel = abs(tps - expected) / expected if tps is not None and expected else None
    checks.append(_check(
        "tokens_consistent", f"tokens/s = global batch x seq_len / step time (within {TOKENS_TOLERANCE:.1%})",
        None if rel is None else rel <= TOKENS_TOLERANCE, True, rel, TOKENS_TOLERANCE,
        f"{fmt_tokens(tps)} vs {spec.search.global_batch_size} x {spec.search.seq_len} / {fmt_ms(median)} ms = "
        f"{fmt_tokens(expected)} ({rel:.3%} apart)" if rel is not None else "throughput not recorded"))

    parts = [m.get(c) for c in MEMORY_CATEGORIES]
    total = sum(parts) if None not in parts else None
    checks.append(_check(
        "memory_adds_up", "memory categories sum to peak exactly",
        None if total is None or peak is None else total == peak, True,
        None if total is None or peak is None else total - peak, 0,
        f"sum {int(total)} B vs peak {int(peak)} B" if total is not None and peak is not None
        else "memory categories not recorded"))

    world, ranks = best.layout.world_size, spec.cluster.total_ranks
    searched = spec.search.world_sizes is not None
    if world == ranks:
        detail = f"measured on all {plural(ranks, 'rank')} of the cluster"
    else:
        detail = (f"measured on {world} of the cluster's {ranks} ranks: throughput and memory at "
                  f"{ranks} ranks were not measured")
        detail += (" (search.world_sizes allowed smaller worlds)" if searched
                   else " (a deployment run must use every rank)")
    checks.append(_check("world_size", "world size = cluster ranks", world == ranks, not searched or world == ranks,
                         world, ranks, detail))
    return checks


def _tie_line(standing: dict[str, Any] | None) -> list[str]:
    """What the verdict says about the pick's certainty: a tie, or separated from the rest."""
    if not standing:
        return []
    tied = standing["tied"]
    if not tied:
        return [f"the pick is separated from every other layout measured ({standing['confidence']:.0%} "
                f"intervals on the median step time do not overlap)"]
    names = ", ".join(t["layout"] for t in tied[:5]) + (f" and {len(tied) - 5} more" if len(tied) > 5 else "")
    return [f"the pick is a statistical tie with {plural(len(tied), 'layout')} ({names}): their "
            f"{standing['confidence']:.0%} intervals on the median step time overlap the best's, so any of them "
            f"may be as fast; measure them longer to choose"]


def _verdict(result: StudyResult, best: TrialRecord | None, checks: list[dict[str, Any]],
             by_reason: dict[str, int], standing: dict[str, Any] | None = None) -> dict[str, Any]:
    if result.spec.objective.minimize:  # a Pareto study: the pick is by its rule, not the fastest
        standing = None
    verdict = _verdict_of_checks(result, best, checks, by_reason, standing)
    if result.spec.objective.minimize:  # say which rule chose the layout
        pick = result.deploy_pick()
        verdict["rule"] = pick.rule
        chosen = f"trial #{pick.trial.number} ({pick.trial.layout.key})" if pick.trial else "no layout"
        verdict["reasons"].insert(0, f"deployment pick: {chosen}, by the rule: {pick.rule}")
        if pick.trial is not None and not pick.met:
            verdict["warnings"].insert(0, f"no layout on the Pareto front leaves "
                                          f"{result.spec.objective.deploy_headroom:.0%} of the rank memory free: "
                                          f"picked the one with the most headroom within the cap")
    return verdict


def _verdict_of_checks(result: StudyResult, best: TrialRecord | None, checks: list[dict[str, Any]],
                       by_reason: dict[str, int], standing: dict[str, Any] | None) -> dict[str, Any]:
    if best is None:
        n, ran = len(result.trials), len(result.ok_trials())
        head = (f"no feasible layout: none of the {n} trials ran successfully" if ran == 0 else
                f"no feasible layout: {ran} of {n} trials ran but every one peaked above the memory cap")
        return {"status": "NOT READY", "ready": False,
                "reasons": [head] + [f"{k} ({plural(v, 'trial')})" for k, v in by_reason.items()],
                "warnings": []}
    failed = [c for c in checks if c["gates"] and c["passed"] is not True]
    warnings = [f"{c['name']}: {c['detail']}" for c in checks if not c["gates"] and c["passed"] is False]
    if failed:
        reasons = [f"{c['name']}: " + ("not measured" if c["passed"] is None else "failed") + f" ({c['detail']})"
                   for c in failed]
        return {"status": "NOT READY", "ready": False, "reasons": reasons + _tie_line(standing),
                "warnings": warnings, "tie": bool(standing and standing["tied"])}
    gating = [c["name"] for c in checks if c["gates"]]
    return {"status": "READY", "ready": True,
            "reasons": [f"all {len(gating)} gating checks passed: " + "; ".join(gating)] + _tie_line(standing),
            "warnings": warnings, "tie": bool(standing and standing["tied"])}


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
               tied: frozenset[str] = frozenset()) -> dict[str, Any]:
    status = _ok_status(t) if t.ok and not _fits(t, cap) else t.status.value
    return {"rank": rank, "number": t.number, "layout": t.layout.name, "key": t.layout.key,
            "mb": t.layout.micro_batch_size, "precision": t.layout.precision, "recompute": t.layout.recompute,
            "schedule": t.layout.schedule, "world": t.layout.world_size,
            "tokens_per_s": t.metrics.get("tokens_per_s") if t.ok else None,
            "pred_tokens_per_s": t.prediction.get("pred_tokens_per_s"),  # the step-time model's, at launch
            "step_time_s": t.metrics.get("step_time_s") if t.ok else None,
            "step_time_lo_s": t.metrics.get("step_time_lo_s") if t.ok else None,
            "step_time_hi_s": t.metrics.get("step_time_hi_s") if t.ok else None,
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
    standing = result.standing()
    tied = frozenset(t["layout"] for t in standing["tied"]) if standing else frozenset()
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
        "verdict": _verdict(result, best, checks, by_reason, standing),
        "best": _best_section(result, best) if best is not None else None,
        "standing": standing,
        "checks": checks,
        "trials": {
            "total": len(result.trials),
            "counts_by_status": result.counts_by_status(),
            "counts_by_reason": by_reason,
            "top": [_trial_row(i, t, cap, best, tied) for i, t in enumerate(ranked[:TOP_N], start=1)],
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


# ---------------------------------------------------------------------------------------------
# Plots (Agg, no display): drawn from the report dict, like the text


def _figure(width: float = 7.5, height: float = 4.5):
    """A figure on its own Agg canvas: no pyplot state, no display, safe in workers and threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_pareto(report: dict[str, Any]) -> bytes:
    """Tokens/s against peak memory for every finished trial; the front and the cap stand out."""
    unit, study = report["unit"], report["study"]
    points = report["trials"]["points"]
    fig = _figure()
    ax = fig.add_subplot()
    scale = unit["bytes"]
    others = [p for p in points if not p["pareto"]]
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["peak_mem_bytes"])
    ax.scatter([p["peak_mem_bytes"] / scale for p in others], [p["tokens_per_s"] for p in others],
               color="#999999", label="trial", zorder=2)
    if front:
        ax.plot([p["peak_mem_bytes"] / scale for p in front], [p["tokens_per_s"] for p in front], "o-",
                color="#c44e52", label="Pareto front", zorder=3)
        for p in front:
            ax.annotate(f"#{p['number']}", (p["peak_mem_bytes"] / scale, p["tokens_per_s"]), fontsize=7,
                        color="#c44e52", xytext=(-4, -11), textcoords="offset points")
    for p in points:
        if p["best"]:
            ax.scatter([p["peak_mem_bytes"] / scale], [p["tokens_per_s"]], s=160, facecolors="none",
                       edgecolors="black", linewidths=1.5, zorder=4,
                       label="deployment pick" if report["front"]["pareto_study"] else "best")
            ax.annotate(p["label"], (p["peak_mem_bytes"] / scale, p["tokens_per_s"]), fontsize=7,
                        xytext=(6, 6), textcoords="offset points")
    ax.axvline(study["cap_bytes"] / scale, color="black", linestyle="--",
               label=f"memory cap {fmt_mem(study['cap_bytes'], unit)}")
    if not points:
        ax.text(0.5, 0.5, "no successful trial", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel(f"peak memory per rank ({unit['name']})")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{study['name']}: {len(points)} of {study['trials']} trials finished")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def plot_memory(report: dict[str, Any]) -> bytes:
    """Stacked bars per category, measured beside predicted, for the best and the next trials."""
    unit, study = report["unit"], report["study"]
    bars = report["memory_bars"]
    fig = _figure(max(6.0, 1.6 * len(bars) + 3), 4.8)
    ax = fig.add_subplot()
    scale = unit["bytes"]
    xs, labels = [], []
    for i, bar in enumerate(bars):
        for j, kind in enumerate(("measured", "predicted")):
            x = 3 * i + j
            bottom = 0.0
            for cat, value in bar[kind].items():
                height = (value or 0) / scale
                ax.bar(x, height, bottom=bottom, color=CATEGORY_COLORS[cat], width=0.9,
                       hatch="//" if kind == "predicted" else None, edgecolor="white",
                       label=cat if i == 0 and j == 0 else None)
                bottom += height
            xs.append(x)
            labels.append(f"#{bar['number']}\n{kind}")
    ax.axhline(study["cap_bytes"] / scale, color="black", linestyle="--",
               label=f"memory cap {fmt_mem(study['cap_bytes'], unit)}")
    if not bars:
        ax.text(0.5, 0.5, "no trial within the memory cap", transform=ax.transAxes, ha="center", va="center")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel(f"bytes on the worst rank ({unit['name']})")
    ax.set_title("memory by category: measured vs predicted (hatched)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Text: one list of sections, rendered as markdown or HTML

Block = tuple  # ("p", text) | ("verdict", status) | ("list", items) | ("table", headers, rows) | ("code", text)
#                | ("image", key, alt)


def _short(text: str, n: int = 160) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= n else line[:n - 1] + "…"


def _interval_ms(lo: float | None, hi: float | None) -> str:
    return "-" if lo is None or hi is None else f"{fmt_ms(lo)}-{fmt_ms(hi)}"


def _standing_blocks(standing: dict[str, Any] | None) -> list[Block]:
    """The best's interval, the layouts tied with it, and the rule that says so."""
    if not standing:
        return []
    b = standing["best"]
    conf = f"{standing['confidence']:.0%}"
    head = (f"Median step time {fmt_ms(b['step_time_s'])} ms, {conf} interval {_interval_ms(b['step_time_lo_s'], b['step_time_hi_s'])}"
            f" ms over {plural(b['steps'], 'measured step')} in {plural(b['runs'], 'run')}. ")
    if standing["tied"]:
        head += f"Statistically tied with it: {plural(len(standing['tied']), 'layout')}."
    else:
        head += "No other layout is tied with it."
    blocks: list[Block] = [("p", head)]
    rows = [[f"{r['layout']}" + (" (best)" if i == 0 else ""), f"#{r['trial']}", fmt_tokens(r["tokens_per_s"]),
             fmt_ms(r["step_time_s"]), _interval_ms(r["step_time_lo_s"], r["step_time_hi_s"]), r["runs"], r["steps"]]
            for i, r in enumerate([b, *standing["tied"]])]
    if standing["tied"]:
        blocks.append(("table", ["layout", "trial", "tokens/s", "step ms (median)", f"{conf} interval ms", "runs",
                                 "steps"], rows))
    again = standing.get("remeasures") or 0
    blocks.append(("p", f"Rule: {standing['rule']}." + (f" This study measured leaders again {plural(again, 'time')}."
                                                       if again else "")))
    return blocks


def _sections(report: dict[str, Any]) -> list[tuple[str, list[Block]]]:
    unit, study, verdict, best = report["unit"], report["study"], report["verdict"], report["best"]

    def mem(n: float | None) -> str:
        return fmt_mem(n, unit)

    def num(n: float | None) -> str:
        return fmt_mem(n, unit, with_unit=False)

    out: list[tuple[str, list[Block]]] = []

    out.append(("Study", [("p", (
        f"Study {study['name']}: {plural(study['trials'], 'trial')} of model {study['model']} "
        f"({study['n_experts']} experts, top-{study['top_k']}) on a cluster of "
        f"{plural(study['cluster_ranks'], study['device'] + ' rank')} ({plural(study['nodes'], 'node')}) with "
        f"{mem(study['rank_memory_bytes'])} each; "
        f"memory cap {study['memory_cap']:.0%} = {mem(study['cap_bytes'])}; global batch "
        f"{study['global_batch_size']} x seq_len {study['seq_len']}; allowed world sizes "
        f"{study['world_sizes']}." + (f" Wall time {study['wall_s']:.1f} s." if study["wall_s"] is not None else "")
    ))] + ([("list", [f"{k}: {v}" for k, v in study["machine"].items()])] if study["machine"] else [])))

    blocks: list[Block] = [("verdict", verdict["status"]), ("list", verdict["reasons"])]
    if verdict["warnings"]:
        blocks += [("p", "Warnings (do not gate READY):"), ("list", verdict["warnings"])]
    out.append(("Verdict", blocks))

    if best is None:
        out.append(("Best layout", [("p", "No feasible layout: no trial ran successfully within the memory cap.")]))
    else:
        lay = best["layout"]
        out.append(("Best layout", [
            ("p", f"Trial #{best['number']}: {best['key']}"),
            ("table", ["EP", "TP", "PP", "DP", "world", "micro-batch", "precision", "recompute", "schedule"],
             [[lay["ep"], lay["tp"], lay["pp"], lay["dp"], lay["world_size"], lay["micro_batch_size"],
               lay["precision"], lay["recompute"], lay["schedule"]]]),
        ] + _standing_blocks(report.get("standing"))))

        m = best["memory"]
        rows = []
        for cat, measured in m["measured"].items():
            predicted = m["predicted"][cat]
            rows.append([cat, num(measured), num(predicted), fmt_error(predicted, measured),
                         fmt_pct(measured / m["peak_bytes"]) if measured is not None and m["peak_bytes"] else "-"])
        peak, pred = m["peak_bytes"], m["predicted_peak_bytes"]
        rows.append(["peak (sum)", num(peak), num(pred), fmt_error(pred, peak), fmt_pct(1.0) if peak else "-"])
        for label, key in (("reserved by the allocator", "reserved"), ("used on the device (NVML)", "device")):
            got, want = m.get(f"{key}_bytes"), m.get(f"predicted_{key}_bytes")
            if got is not None or want is not None:
                rows.append([label, num(got), num(want), fmt_error(want, got),
                             fmt_pct(got / peak) if got is not None and peak else "-"])
        blocks = [
            ("p", "Worst rank, measured during a tracked training step; predictions from the analytic memory model."),
            ("table", ["category", f"measured {unit['name']}", f"predicted {unit['name']}",
                       "prediction error", "share of peak"], rows),
            ("list", [(f"rank memory: {mem(m['rank_memory_bytes'])}; "
                       f"peak is {fmt_pct(m['peak_fraction_of_rank'])} of it"),
                      (f"headroom to the cap ({study['memory_cap']:.0%}, {mem(m['cap_bytes'])}): "
                       f"{mem(m['headroom_to_cap_bytes'])}"),
                      f"headroom to rank memory: {mem(m['headroom_to_rank_bytes'])}"]),
        ]
        if best["ranks"]:
            shown = best["ranks"][:RANK_ROWS]
            blocks.append(("table", ["rank", "coords (pp, dp, ep, tp)", "node", f"peak {unit['name']}"],
                           [[r.get("rank", "-"), tuple(r.get("coords", ())) or "-",
                             r.get("node") or r.get("host") or "-", num(r.get("peak_mem_bytes"))] for r in shown]))
            if len(best["ranks"]) > len(shown):
                blocks.append(("p", f"({len(best['ranks']) - len(shown)} more ranks in report.json)"))
        out.append(("Memory", blocks))

        p = best["performance"]
        spread = (f"min {fmt_ms(p['step_time_min_s'])} ms, max {fmt_ms(p['step_time_max_s'])} ms over "
                  f"{p['measured_steps']} measured steps" if p["measured_steps"] else "per-step times not recorded")
        out.append(("Throughput and latency", [("list", [
            f"Throughput: {fmt_tokens(p['tokens_per_s'])} tokens/s ({fmt_num(p['samples_per_s'])} samples/s)",
            f"Step time (median): {fmt_ms(p['step_time_s'])} ms",
            f"Step time (p90): {fmt_ms(p['step_time_p90_s'])} ms",
            f"Step time spread: {spread}",
            f"MFU: {fmt_pct(p['mfu'])}" if p["mfu"] is not None else f"MFU: {p['mfu_note']}",
        ] + ([f"Not printed by the program, computed by autotune: {p['derived']}"] if p.get("derived") else []))]))

        e, loss = best["moe"], best["loss"]
        out.append(("Experts and loss", [("list", [
            f"Experts per rank: {e['n_experts']} experts / EP {e['ep']} = {e['experts_per_rank']}",
            f"Expert load imbalance (max/mean, worst MoE layer): {fmt_num(e['expert_load_imbalance'])}",
            f"Tokens dropped: {fmt_dropped(e['tokens_dropped_frac'])}",
            f"Loss: first {fmt_loss(loss['first'])}, last {fmt_loss(loss['last'])} ({loss['steps']} steps)",
        ])]))

        out.append(("Validation checks", [("table", ["check", "figure", "result", "gates READY"], [
            [c["name"], c["detail"], {True: "pass", False: "FAIL", None: "not measured"}[c["passed"]],
             "yes" if c["gates"] else "no (warning)"] for c in report["checks"]])]))

    if report["front"]["pareto_study"]:
        out.append(("Pareto front", front_blocks(report["front"], mem, fmt_tokens, fmt_pct)))
    if report["stopped"]:
        out.append(("Stopped early", stopped_blocks(report["stopped"], fmt_ms, fmt_tokens, _short)))

    trials = report["trials"]
    out.append((f"Top {len(trials['top'])} of {trials['total']} trials", [("table", [
        "rank", "trial", "layout", "mb", "precision", "recompute", "schedule", "world", "tokens/s", "step ms",
        "interval ms", f"peak {unit['name']}", "status"], [
        [r["rank"], f"#{r['number']}" + (" (best)" if r["best"] else " (tied)" if r.get("tied") else ""),
         r["layout"], r["mb"], r["precision"], r["recompute"], r["schedule"], r["world"],
         fmt_tokens(r["tokens_per_s"]), fmt_ms(r["step_time_s"]),
         _interval_ms(r.get("step_time_lo_s"), r.get("step_time_hi_s")),
         num(r["peak_mem_bytes"]), r["status"]] for r in trials["top"]])]))

    blocks = [("table", ["status", "trials"], [[k, v] for k, v in sorted(trials["counts_by_status"].items())])]
    if trials["counts_by_reason"]:
        blocks += [("p", "Trials not usable, by reason:"),
                   ("table", ["reason", "trials"], [[k, v] for k, v in trials["counts_by_reason"].items()])]
    if trials["not_ok"]:
        shown = trials["not_ok"][:FAILURE_ROWS]
        blocks += [("p", "Trials that were pruned or did not finish:"),
                   ("table", ["trial", "layout", "status", "reason"],
                    [[f"#{r['number']}", r["layout"], r["status"], _short(r["reason"]) or "-"] for r in shown])]
        if len(trials["not_ok"]) > len(shown):
            blocks.append(("p", f"({len(trials['not_ok']) - len(shown)} more in report.json)"))
    out.append(("Trials by status", blocks))

    changes = report.get("changes")
    if changes:
        prev, now = changes["previous_best"], changes["best"]
        lines = [f"This run of the study (its run #{changes['session'] + 1}) decided "
                 f"{plural(changes['new_trials'], 'trial')}.",
                 "Best before this run: " + (f"{prev['layout']} (trial #{prev['trial']}), "
                                             f"{fmt_tokens(prev['tokens_per_s'])} tokens/s" if prev else "none") + ".",
                 "Best now: " + (f"{now['layout']} (trial #{now['trial']}), {fmt_tokens(now['tokens_per_s'])} tokens/s"
                                 if now else "none") + (" (changed)" if changes["best_changed"] else " (unchanged)") + "."]
        blocks = [("list", lines)]
        if changes["remeasured"]:
            blocks += [("p", "Layouts measured again in this run (drift):"),
                       ("table", ["layout", "before", "now", "change"],
                        [[r["layout"], f"{fmt_tokens(r['previous_tokens_per_s'])} (#{r['previous_trial']})",
                          (f"{fmt_tokens(r['tokens_per_s'])} (#{r['trial']})" if r["tokens_per_s"] is not None
                           else r["status"]),
                          fmt_pct(r["change"]) if r["change"] is not None else "-"] for r in changes["remeasured"]])]
        out.append(("Since the last run", blocks))
    if report.get("tracking_error"):
        out.append(("Tracking", [("p", f"Warning: {report['tracking_error']}")]))

    out.append(("Plots", [("image", "pareto", "Pareto front: tokens/s vs peak memory"),
                          ("image", "memory", "Memory by category, measured vs predicted")]))

    if best is not None:
        launch = best["launch"]
        env = launch["env"]
        where = (f"Run on each of the {launch['nodes']} nodes:" if launch["nodes"] > 1 else "Run on one node:")
        exports = [f"export {v['name']}={v['value']}" for v in env if not v["value"].startswith("<")]
        blocks = [("p", where), ("code", "\n".join(exports + [launch["command"]]))]
        if env:
            blocks.insert(0, ("table", ["variable", "value", "why"], [[v["name"], v["value"], v["why"]] for v in env]))
        else:
            blocks.insert(0, ("p", "No environment variables are needed beyond what torchrun sets."))
        out.append(("Launch", blocks))
    return out


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    """GitHub-flavoured markdown; plots are linked as the PNG files written beside it."""
    lines = [f"# {report['title']}", ""]
    files = {"pareto": "pareto.png", "memory": "memory.png"}
    for title, blocks in _sections(report):
        lines += [f"## {title}", ""]
        for block in blocks:
            kind = block[0]
            if kind == "p":
                lines += [block[1], ""]
            elif kind == "verdict":
                lines += [f"**{block[1]}**", ""]
            elif kind == "list":
                lines += [f"- {item}" for item in block[1]] + [""]
            elif kind == "table":
                headers, rows = block[1], block[2]
                lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                lines.append("|" + "|".join("---" for _ in headers) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                lines.append("")
            elif kind == "code":
                lines += ["```bash", block[1], "```", ""]
            elif kind == "image":
                lines += [f"![{block[2]}]({files[block[1]]})", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;"
        "text-align:left}th{background:#f3f3f3}pre{background:#f6f6f6;padding:.7rem;overflow-x:auto}"
        "img{max-width:100%}.ready{color:#1a7f37;font-size:1.4rem}.not-ready{color:#cf222e;font-size:1.4rem}")


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """One self-contained page: `images` ('pareto', 'memory') are embedded as base64 PNGs."""
    e = html.escape
    body = [f"<h1>{e(report['title'])}</h1>"]
    for title, blocks in _sections(report):
        body.append(f"<h2>{e(title)}</h2>")
        for block in blocks:
            kind = block[0]
            if kind == "p":
                body.append(f"<p>{e(block[1])}</p>")
            elif kind == "verdict":
                css = "ready" if block[1] == "READY" else "not-ready"
                body.append(f'<p class="{css}"><strong>{e(block[1])}</strong></p>')
            elif kind == "list":
                body.append("<ul>" + "".join(f"<li>{e(str(i))}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{e(str(h))}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "code":
                body.append(f"<pre><code>{e(block[1])}</code></pre>")
            elif kind == "image":
                data = images.get(block[1])
                if data:
                    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
                    body.append(f'<p><img alt="{e(block[2])}" src="{src}"></p>')
                else:
                    body.append(f"<p>({e(block[2])}: plot not available)</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(report['title'])}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(result: StudyResult, out_dir: Path) -> ReportFiles:
    """Write report.md, report.html, report.json, pareto.png and memory.png into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(result)
    images = {"pareto": plot_pareto(report), "memory": plot_memory(report)}
    files = ReportFiles(markdown=out_dir / "report.md", html=out_dir / "report.html", json=out_dir / "report.json",
                        pareto_png=out_dir / "pareto.png", memory_png=out_dir / "memory.png")
    files.pareto_png.write_bytes(images["pareto"])
    files.memory_png.write_bytes(images["memory"])
    files.markdown.write_text(render_markdown(report), encoding="utf-8")
    files.html.write_text(render_html(report, images), encoding="utf-8")
    files.json.write_text(json.dumps(report, indent=1, allow_nan=False, default=str) + "\n", encoding="utf-8")
    return files
