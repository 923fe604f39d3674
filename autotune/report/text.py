"""The report as text: one list of sections, rendered as markdown or as one self-contained HTML page.

`_sections` turns the report dict into titled blocks (paragraphs, lists, tables, code, images);
`render_markdown` and `render_html` only lay those blocks out, so both say the same things.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any

from autotune.report.format import (fmt_dropped, fmt_error, fmt_loss, fmt_mem, fmt_ms, fmt_num, fmt_pct,
                                    fmt_tokens, plural)
from autotune.report.front import front_blocks, stopped_blocks

RANK_ROWS = 16  # per-rank rows shown in text (the JSON has them all)
FAILURE_ROWS = 50

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
    spread = standing.get("run_spread") or {}
    if spread.get("dof"):
        seen = (f" Run-to-run spread of step time: {math.expm1(spread['sd_log']):.1%} (one standard deviation, "
                f"from {plural(spread['dof'], 'repeat')} of layouts measured more than once).")
    else:
        seen = " No layout was measured twice, so the run-to-run spread is unknown and ties rest on the intervals alone."
    if spread.get("prior_sd_log") is not None:
        seen += (f" The intervals above include a run-to-run spread of {math.expm1(spread['shown_sd_log']):.1%}: "
                 f"{math.expm1(spread['prior_sd_log']):.1%} assumed for this device (worth "
                 f"{plural(spread['prior_dof'], 'repeat')}) pooled with what the study measured, so that they "
                 f"say where the layout's next run falls, not only where its measured steps fell.")
    blocks.append(("p", f"Rule: {standing['rule']}." + (f" This study measured leaders again {plural(again, 'time')}."
                                                       if again else "") + seen))
    return blocks


_COLLECTIVE_NAMES = {"all_reduce": "all-reduce", "all_to_all": "all-to-all", "send_recv": "send/recv"}


def _probe_blocks(probe: dict[str, Any]) -> list[Block]:
    """What the cluster profile measured before the first trial, and what it cost."""
    if probe.get("error"):
        return [("p", f"The cluster probe failed ({probe['error']}); the step-time model started from the "
                      f"device profile's own figures.")]
    if probe.get("reused"):
        head = f"Reused from this cluster's cache (measured {probe['measured_at']} by {probe['world']} ranks)."
    else:
        cost = probe.get("wall_s") or 0.0
        share = f" ({cost / probe['trials_s']:.1%} of the trials' time)" if probe.get("trials_s") else ""
        head = (f"Measured at the study's start by {plural(probe['world'], probe['device'] + ' rank')} in "
                f"{cost:.1f} s{share}: {probe.get('measure_s') or 0.0:.1f} s measuring, the rest starting the "
                f"ranks' workers, which the trials then reuse.")
    items = []
    for precision, rates in sorted(probe.get("gemm_tflops", {}).items()):
        parts = [f"{kind} {rate:.3g} TFLOP/s" for kind, rate in sorted(rates.items())]
        items.append(f"GEMMs in {precision}: " + ", ".join(parts))
    items += [f"GEMM not measured ({e})" for e in probe.get("gemm_errors", [])]
    if probe.get("copy_gb_s"):
        items.append(f"memory copy: {probe['copy_gb_s']:.3g} GB/s")
    layer = probe.get("layer") or {}
    if layer.get("seconds"):
        kept = ("" if layer.get("used", True) else f"; a floor, below the device profile's "
                f"{layer.get('profile_seconds', 0.0) * 1e3:.3g} ms, which the model keeps")
        items.append(f"a layer's fixed cost per micro-batch: {layer['seconds'] * 1e3:.3g} ms forward and backward "
                     f"({'an MoE' if layer.get('moe') else 'a dense'} block at width {layer.get('d_model')}, "
                     f"{layer.get('tokens')} tokens{kept})")
    elif layer.get("error"):
        items.append(f"a layer's fixed cost not measured ({layer['error']})")
    for f in probe.get("fits", []):
        where = " across nodes" if f.get("where") == "across" else ""
        items.append(f"{_COLLECTIVE_NAMES.get(f['kind'], f['kind'])} over {f['group']} ranks{where}: "
                     f"{f['gb_s']:.3g} GB/s, {max(f['latency_us'], 1.0):.3g} us per step"
                     + (" (at most)" if f["latency_us"] < 1.0 else ""))
    return [("p", head + " The step-time model uses these figures in place of the device profile's."),
            ("list", items)]


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

    if report.get("cluster_probe"):
        out.append(("Cluster profile", _probe_blocks(report["cluster_probe"])))

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

