"""The report's validations of the best trial and the READY / NOT READY verdict drawn from them.

Each check carries its figure, its limit and whether it gates READY; the verdict adds the
statistical tie (autotune.search.stats, through StudyResult.standing) and, in a Pareto study, the rule
that picked the deployed layout. Kept apart from assembling and rendering the report so that
what "ready" means is read in one place.
"""

from __future__ import annotations

import math
from typing import Any

from autotune.records.results import StudyResult
from autotune.report.format import fmt_dropped, fmt_error, fmt_loss, fmt_mem, fmt_ms, fmt_num, fmt_tokens, plural
from autotune.schema import MEMORY_CATEGORIES
from autotune.search.stats import within_runs_p90
from autotune.trial_record import NORMAL_PRIORITY, TrialRecord

PREDICTION_TOLERANCE = 0.10  # |predicted - measured| / measured peak
SPREAD_LIMIT = 1.25  # step_time_p90 / median
IMBALANCE_LIMIT = 2.0  # max tokens on one expert / mean
DROPPED_LIMIT = 0.01  # fraction of routed tokens
TOKENS_TOLERANCE = 0.005  # tokens_per_s against global batch x seq_len / step time
# What a rank below normal priority means and how to mend it (the report's check, the console's warning).
PRIORITY_ADVICE = ("they yield to everything else on their nodes, so their throughput may not be their layout's; "
                   "start the cluster's nodes with RAY_worker_niceness=0, or let the study set it on connecting "
                   "(a job that sets the variable itself keeps its value)")


def _cap_bytes(result: StudyResult) -> float:
    # The same expression as StudyResult.best(), so "fits" means the same in both places.
    return result.spec.objective.memory_cap * result.spec.cluster.memory_bytes


def _fits(t: TrialRecord, cap: float) -> bool:
    return t.ok and t.held_bytes is not None and t.held_bytes <= cap



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
    detail = (f"p90 {fmt_ms(p90)} ms / median {fmt_ms(median)} ms = {ratio:.3f}" if ratio is not None
              else "step times not recorded")
    runs = result.run_steps(best.layout.key)
    inside = within_runs_p90(runs)
    if inside is not None:
        # Re-measured: each step against its own run's median. Runs differ in level on a shared
        # machine; that spread is the tie rule's to weigh, and pooling it here would make the
        # check fail more often the more evidence the study gathered for its best.
        ratio = inside
        detail = (f"each step over its own run's median: p90 {ratio:.3f} ({plural(sum(map(len, runs)), 'step')} in "
                  f"{len(runs)} runs); the runs pooled: {detail} (their run-to-run spread, which the tie rule "
                  f"weighs)")
    checks.append(_check(
        "throughput_stable", f"throughput stable (p90/median <= {SPREAD_LIMIT})",
        None if ratio is None else ratio <= SPREAD_LIMIT, True, ratio, SPREAD_LIMIT, detail))

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
    checks.append(_priority_check(result))
    return checks


def _priority_check(result: StudyResult) -> dict[str, Any]:
    """Whether the layouts were compared at normal priority: a rank at a lower one waits behind
    everything else on its node (at Ray's default nice 15 a tiny rank beside two busy processes ran
    23-25x slower), so its throughput says more about the node's other work than about its layout."""
    recorded = {t.number: t.nice for t in result.trials if t.ok and t.nice is not None}  # re-measures too
    name = f"ranks at normal priority (nice {NORMAL_PRIORITY})"
    if not recorded:
        return _check("ranks_priority", name, None, False, None, NORMAL_PRIORITY, "priority not recorded")
    low = sorted(n for n, nice in recorded.items() if nice > NORMAL_PRIORITY)
    worst = max(recorded.values())
    if not low:
        detail = f"every rank of the {plural(len(recorded), 'measured trial')} ran at nice {NORMAL_PRIORITY}"
    else:
        numbers = ", ".join(f"#{n}" for n in low[:5]) + (f" and {len(low) - 5} more" if len(low) > 5 else "")
        detail = (f"{plural(len(low), 'trial')} of {len(recorded)} ran ranks at nice up to {worst} ({numbers}): "
                  f"{PRIORITY_ADVICE}")
    return _check("ranks_priority", name, not low, False, worst, NORMAL_PRIORITY, detail)


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
