"""`autotune validate`: screen every candidate layout and rank the fitting ones by predicted speed.

No Ray and no GPU: structural rules, the memory model and the step-time model only, optionally
calibrated on a study's trials (--from) or asked about another cluster or device (--ranks,
--profile). autotune/cli/main.py registers the command.
"""

from __future__ import annotations

import gc
import itertools
import json
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from autotune.cli.common import _fail, _load, out
from autotune.space.spec import Spec, SpecError


TABLE_WIDTH = 100


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.3f}"


def validate(
    space: Path = typer.Argument(..., help="the space file (YAML)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    limit: int = typer.Option(50, min=0, help="rows shown in the table, fitting ones first (the JSON has them all)"),
    from_study: Optional[str] = typer.Option(None, "--from", help="calibrate the step-time model on this study's trials"),
    directory: Path = typer.Option(Path("autotune-runs"), "--dir", help="the --from study's output folder's parent"),
    storage: Optional[str] = typer.Option(None, "--storage", help="the --from study's Optuna storage"),
    ranks: Optional[int] = typer.Option(None, "--ranks", min=1, help="answer for a cluster of this many ranks"),
    profile: Optional[str] = typer.Option(None, "--profile", help="answer for this device profile (e.g. H100-SXM)"),
    terms: bool = typer.Option(False, "--terms", help="add a column per step-time term (a wider table)"),
) -> None:
    """Screen every candidate layout (structural rules, predicted memory) and rank the fitting
    ones by predicted tokens/s, term by term. No Ray, no GPU."""
    from autotune.predict.candidates import screen
    from autotune.predict.steptime import SHORT_NAMES, TERMS

    spec = _load(space)
    extrapolated = []
    if ranks is not None or profile is not None:
        spec = _what_if(spec, space, ranks, profile)
        extrapolated = [f"--ranks {ranks}"] * (ranks is not None) + [f"--profile {profile}"] * (profile is not None)
    sc = screen(spec)
    # The candidates live until the command ends and hold no cycles: leave them out of every
    # later collection (each would rescan 100,000 of them in a large space).
    gc.freeze()
    speed, model_note = _speed_model(spec, from_study, directory, storage)
    fitting = [c for c in sc.candidates if c.fits]
    times = speed.predict([c.layout for c in fitting])
    order = [int(i) for i in times.order([c.prediction.total if c.prediction else 0 for c in fitting])]
    ranked = [(fitting[i], times.row(i)) for i in (order if as_json else order[:limit])]
    note = model_note + (f"; EXTRAPOLATED to {' '.join(extrapolated)}: predicted, not measured" if extrapolated else "")
    if as_json:
        rows = [{"layout": c.layout.key, **c.layout.params(), "verdict": c.verdict, "reason": c.reason,
                 **(c.prediction.as_metrics() if c.prediction else {}),
                 **({"pred_terms_s": {t: row[t] for t in TERMS}, "pred_bubble_s": row["bubble"],
                     "pred_step_time_s": row["pred_step_time_s"], "pred_tokens_per_s": row["pred_tokens_per_s"]}
                    if row else {})}
                for c, row in itertools.chain(ranked, ((c, None) for c in sc.candidates if not c.fits))]
        print(json.dumps({"space": str(space), "step_time_model": note, "extrapolated": bool(extrapolated),
                          "device_profile": speed.profile.name, "candidates": rows, "counts": sc.counts,
                          "excluded_by_reason": sc.reasons, "cap_bytes": sc.cap_bytes}, indent=1))
        if not sc.fitting():
            _fail(_nothing_fits(sc), 1)
        return
    table = Table(title=f"{len(sc.candidates)} candidates for {spec.study.name} "
                        f"(cap {_gb(sc.cap_bytes)} GB per rank; fastest predicted first)", show_lines=False,
                  box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    term_cols = [*(SHORT_NAMES[t] for t in TERMS), "bubble"] if terms else []
    for col in ("layout", "world", "mb", "prec", "recompute", "sched", "GB", "pred tok/s", "step ms", *term_cols,
                "verdict"):
        table.add_column(col, justify="left" if col in ("layout", "prec", "recompute", "sched", "verdict") else "right",
                         no_wrap=col == "layout")
    shown = list(itertools.islice(itertools.chain(ranked, ((c, None) for c in sc.candidates if not c.fits)), limit))
    for c, row in shown:
        p = c.prediction
        ms = (lambda v: f"{v * 1e3:.1f}")
        term_cells = ([*(ms(row[t]) for t in TERMS), ms(row["bubble"])] if row else ["-"] * len(term_cols)) if terms \
            else []
        table.add_row(c.layout.name, str(c.layout.world_size), str(c.layout.micro_batch_size), c.layout.precision,
                      c.layout.recompute, c.layout.schedule if c.layout.pp > 1 else "-", _gb(p.total) if p else "-",
                      f"{row['pred_tokens_per_s']:,.0f}" if row else "-", ms(row["pred_step_time_s"]) if row else "-",
                      *term_cells, _verdict(c, terms))
    # 100 columns by default, whatever the terminal (a CI log, a pipe): the terms make it wider.
    out.print(table, width=out.width if terms else min(out.width, TABLE_WIDTH))
    if len(sc.candidates) > limit:
        out.print(f"({len(sc.candidates) - limit} more rows: use --json for all)")
    out.print(f"step-time model: {speed.profile.name} profile, {note}" + (" (terms in ms per step)" if terms else ""))
    if not terms:
        out.print("(--terms: a column per step-time term; --json: every candidate with its prediction)")
    out.print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(sc.counts.items())))
    if sc.reasons:
        out.print("excluded by reason: " + ", ".join(f"{k} {v}" for k, v in
                                                     sorted(sc.reasons.items(), key=lambda kv: -kv[1])))
    if not sc.fitting():
        _fail(_nothing_fits(sc), 1)


def _verdict(c, full: bool) -> str:
    """The table's verdict: the whole reason with --terms (a wide table), else the rule's short
    name (the GB column holds the predicted peak; --json and `excluded by reason` the rest)."""
    from autotune.space.layout import rule_of

    if c.fits:
        return "fits"
    if full:
        return f"{c.verdict}: {c.reason}"
    return c.verdict if c.verdict == "over memory cap" else f"{c.verdict}: {rule_of(c.reason)}"


def _what_if(spec: Spec, space: Path, ranks: Optional[int], profile: Optional[str]) -> Spec:
    """The space on another cluster size or device: same model and knobs, world = the new ranks."""
    from autotune.space.spec import spec_from_data

    data = spec.model_dump(exclude_none=True)
    cluster = data["cluster"]
    if profile is not None:
        cluster["profile"] = profile
        cluster["device"] = "cpu" if profile == "cpu" else "cuda"
    if ranks is not None:
        per_node = cluster.get("ranks_per_node")
        if per_node is None and cluster["device"] == "cuda":
            try:
                per_node = spec_from_data(data, str(space)).cluster.device_profile().ranks_per_node
            except SpecError as exc:
                _fail(str(exc))
        if per_node is not None and ranks > per_node:
            if ranks % per_node:
                _fail(f"--ranks: {ranks} is not a whole number of nodes of {per_node} ranks; give a multiple of {per_node}")
            cluster.update(nodes=ranks // per_node, ranks_per_node=per_node)
            cluster.pop("ranks", None)
        else:
            cluster.update(ranks=ranks, nodes=1)
            cluster.pop("ranks_per_node", None)
        data["search"].pop("world_sizes", None)
    try:
        return spec_from_data(data, str(space))
    except SpecError as exc:
        _fail(str(exc))


def _speed_model(spec: Spec, from_study: Optional[str], directory: Path, storage: Optional[str]):
    from autotune.predict.speedmodel import SpeedModel

    if from_study is None:
        return SpeedModel.of(spec), "uncalibrated (default efficiencies; --from STUDY calibrates)"
    from autotune.study.speed import load_speed_model
    from autotune.study.store import StudyError

    try:
        return load_speed_model(from_study, directory, storage, spec)
    except StudyError as exc:
        _fail(f"--from: {exc}")


def _nothing_fits(sc) -> str:
    top = max(sc.reasons, key=sc.reasons.get)
    fix = ("raise cluster.memory_gb or objective.memory_cap, or allow recompute/smaller micro-batches"
           if top == "over memory cap" else "widen the search lists so some combination satisfies it")
    return f"no candidate layout fits (most are excluded by: {top}, {sc.reasons[top]}); {fix}"
