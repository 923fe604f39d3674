"""The report's Pareto front (with the deployment pick and its rule) and its early-stopped trials.

Plain data for report.json first, then the blocks text.py renders as markdown or HTML;
kept apart from the rest of the report so that each module stays one size of thing to read.
"""

from __future__ import annotations

from typing import Any, Callable

from autotune.records.results import StudyResult
from autotune.schema import Status
from autotune.search.stats import step_time_interval


def front_data(result: StudyResult) -> dict[str, Any]:
    """Every non-dominated layout (tokens/s up, peak memory down) with its headroom; in a Pareto
    study also the deployment pick and the rule that chose it."""
    rank = result.spec.cluster.memory_bytes
    cap = result.spec.objective.memory_cap * rank
    pareto = bool(result.spec.objective.minimize)
    pick = result.deploy_pick() if pareto else None
    chosen = pick.trial.number if pick is not None and pick.trial is not None else None
    rows = []
    for t in result.pareto():
        peak, held = t.metrics["peak_mem_bytes"], t.held_bytes or 0  # held: on CUDA the device's used memory
        rows.append({"number": t.number, "key": t.layout.key, "layout": t.layout.name,
                     "tokens_per_s": t.tokens_per_s, "peak_mem_bytes": peak, "headroom_bytes": rank - held,
                     "headroom_fraction": (rank - held) / rank if rank else None, "within_cap": held <= cap,
                     "mlflow_run_id": t.mlflow_run_id, "pick": t.number == chosen})
    return {"pareto_study": pareto, "objectives": ["maximize tokens_per_s"]
            + ([f"minimize {result.spec.objective.minimize}"] if pareto else []),
            "rule": pick.rule if pick else None, "rule_met": pick.met if pick else None,
            "pick": chosen, "deploy_headroom": result.spec.objective.deploy_headroom if pareto else None,
            "members": rows}


def stopped_data(result: StudyResult) -> list[dict[str, Any]]:
    """Early-stopped trials with the figures they measured before the stop (partial, kept)."""
    rows = []
    for t in result.trials:
        if t.status != Status.EARLY_STOPPED:
            continue
        iv = step_time_interval(t.step_times)
        rows.append({"number": t.number, "key": t.layout.key, "measured_steps": len(t.step_times),
                     "step_time_s": iv.median if iv.n else None, "step_time_lo_s": iv.lo if iv.known else None,
                     "step_time_hi_s": iv.hi if iv.known else None,
                     "tokens_per_s": t.metrics.get("tokens_per_s"), "reason": t.reason})
    return rows


def front_blocks(front: dict[str, Any], mem: Callable[[float | None], str], fmt_tokens: Callable,
                 fmt_pct: Callable) -> list[tuple]:
    """The front as a table, with the pick and the rule stated under it."""
    if not front["members"]:
        return [("p", "No trial finished with its peak memory measured: there is no front.")]
    blocks: list[tuple] = [
        ("p", f"Objectives: {' and '.join(front['objectives'])}. A layout is on the front when no other "
              f"finished trial is at least as fast with no more peak memory, and better on one of them."),
        ("table", ["trial", "layout", "tokens/s", "peak memory", "headroom", "within cap", "deploy"],
         [[f"#{r['number']}", r["key"], fmt_tokens(r["tokens_per_s"]), mem(r["peak_mem_bytes"]),
           f"{mem(r['headroom_bytes'])} ({fmt_pct(r['headroom_fraction'])})", "yes" if r["within_cap"] else "no",
           "pick" if r["pick"] else ""] for r in front["members"]])]
    if front["rule"]:
        pick = f"trial #{front['pick']}" if front["pick"] is not None else "none"
        met = "" if front["rule_met"] else " No layout on the front meets it: the pick is the one with the most " \
                                           "headroom within the memory cap."
        blocks.append(("p", f"Deployment pick: {pick}, by the rule: {front['rule']}.{met}"))
    return blocks


def stopped_blocks(rows: list[dict[str, Any]], fmt_ms: Callable, fmt_tokens: Callable,
                   short: Callable[[str], str]) -> list[tuple]:
    def interval(r: dict[str, Any]) -> str:
        if r["step_time_lo_s"] is None:
            return "-"
        return f"{fmt_ms(r['step_time_lo_s'])}-{fmt_ms(r['step_time_hi_s'])}"

    return [("p", "Figures measured before the stop (partial: fewer steps than a finished trial)."),
            ("table", ["trial", "layout", "measured steps", "step ms (median)", "interval ms", "tokens/s", "why"],
             [[f"#{r['number']}", r["key"], r["measured_steps"], fmt_ms(r["step_time_s"]), interval(r),
               fmt_tokens(r["tokens_per_s"]), short(r["reason"])] for r in rows])]
