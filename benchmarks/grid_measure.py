"""Measuring a space's grid for the search-efficiency replay (`python -m benchmarks.search_efficiency
--measure`): every structurally valid layout, run on real gloo ranks, into
benchmarks/results/grid_<name>.csv. See benchmarks/search_efficiency.py for the table's use.
"""

from __future__ import annotations

import csv
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from autotune.predict.candidates import INVALID, Screening, screen  # noqa: E402
from autotune.space.layout import Layout  # noqa: E402
from autotune.space.spec import Spec, spec_from_data  # noqa: E402
from benchmarks.common import RESULTS, SPACES, machine, preload_launch, say, write_csv, write_json  # noqa: E402


def space_file(name: str) -> Path:
    """A space by name (benchmarks/spaces/<name>.yaml) or by path."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else SPACES / f"{name}.yaml"


def space_data(name: str) -> dict[str, Any]:
    return yaml.safe_load(space_file(name).read_text())


def space_name(name: str) -> str:
    return space_file(name).stem


def with_study(data: dict[str, Any], seed: int, sampler: str | None = None) -> Spec:
    """The space's Spec with the study's seed (and sampler) replaced."""
    d = json.loads(json.dumps(data))
    d.setdefault("study", {})["seed"] = seed
    if sampler is not None:
        d["study"]["sampler"] = sampler
    return spec_from_data(d, where=f"benchmarks/spaces ({d['study'].get('name', '?')})")


def valid_layouts(screening: Screening) -> list[Layout]:
    """Every layout that breaks no structural rule, fitting the cap or not, in screening order."""
    return [c.layout for c in screening.candidates if c.verdict != INVALID]


def table_path(name: str, quick: bool) -> Path:
    return RESULTS / f"grid_{space_name(name)}{'_quick' if quick else ''}.csv"


# ------------------------------------------------------------------------------------------------
# Measuring the grid


def _read_rows(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    with path.open() as f:
        return {r["layout_key"]: r for r in csv.DictReader(f)}


def _merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """One row per layout over several passes: the fastest pass stands for the layout.

    Other work on a shared machine only ever slows a run down, so the best of a few passes is
    the closest to what the layout does on a quiet machine; every pass's figure is kept.
    """
    if old is None:
        return {**new, "passes": 1, "tokens_per_s_passes": f"{new['tokens_per_s']}",
                "loadavg_passes": f"{new['loadavg_1m']}", "seconds": new["seconds"]}
    merged = dict(old)
    merged["passes"] = int(old["passes"]) + 1
    merged["tokens_per_s_passes"] = f"{old['tokens_per_s_passes']} {new['tokens_per_s']}"
    merged["loadavg_passes"] = f"{old['loadavg_passes']} {new['loadavg_1m']}"
    merged["seconds"] = round(float(old["seconds"] or 0) + new["seconds"], 2)
    if new["status"] != "crashed" and (old["status"] == "crashed" or new["tokens_per_s"] > float(old["tokens_per_s"] or 0)):
        for k in ("status", "tokens_per_s", "step_time_s", "step_time_p90_s", "peak_mem_bytes", "reason"):
            merged[k] = new[k]
    for k in ("pred_peak_mem_bytes", "predicted_fits", "cpus", "platform", "torch"):
        merged[k] = new[k]
    return merged


COLUMNS = ("layout_key", "ep", "tp", "pp", "dp", "world_size", "micro_batch_size", "precision", "recompute", "schedule",
           "status", "tokens_per_s", "step_time_s", "step_time_p90_s", "peak_mem_bytes", "pred_peak_mem_bytes",
           "predicted_fits", "passes", "tokens_per_s_passes", "loadavg_passes", "seconds", "reason", "cpus", "platform",
           "torch")


def _averaged(row: dict[str, Any], tokens_per_step: int) -> dict[str, Any]:
    """The row with its throughput the mean of its passes (the crashed ones left out)."""
    passes = [float(x) for x in str(row["tokens_per_s_passes"]).split() if float(x) > 0]
    if passes:
        row = {**row, "tokens_per_s": round(statistics.fmean(passes), 2)}
        row["step_time_s"] = round(tokens_per_step / row["tokens_per_s"], 5)
    return row


def measure(name: str, quick: bool, add_pass: bool, passes: int = 1, average: bool = False) -> int:
    """Measure the grid: `passes` interleaved passes (each in its own shuffled order), each layout's
    figure the mean of its passes when `average`, else the fastest."""
    code = 0
    for _ in range(passes):
        code = max(code, _measure_pass(name, quick, add_pass, average))
        add_pass = True
    return code


def _measure_pass(name: str, quick: bool, add_pass: bool, average: bool) -> int:
    preload_launch()
    import torch

    from autotune.trials.configs import run_config_for
    from tests.launch import launch

    data = space_data(name)
    spec = with_study(data, 0)
    screening = screen(spec)
    cap = screening.cap_bytes
    by_key = screening.by_key()
    path = table_path(name, quick)
    table = _read_rows(path) if add_pass else {}
    pass_no = 1 + max((int(r["passes"]) for r in table.values()), default=0)
    layouts = valid_layouts(screening)
    random.Random(pass_no - 1).shuffle(layouts)
    if quick:  # three of the quicker layouts: this checks the measuring path, not the grid
        layouts = [l for l in layouts if l.precision == "fp32" and l.micro_batch_size == max(spec.search.micro_batch_size)][:3]
    mach = machine()
    started = time.monotonic()
    say(f"measuring {len(layouts)} layouts of {name}, pass {pass_no} ({spec.budget.warmup_steps} warm-up + "
        f"{spec.budget.measure_steps} measured steps each; cap {cap / 1e6:.2f} MB per rank)")
    for i, layout in enumerate(layouts, 1):
        cand = by_key[layout.key]
        cfg = run_config_for(spec, layout, timeout_s=spec.budget.trial_timeout_s)
        load = round(os.getloadavg()[0], 1)
        t0 = time.monotonic()
        row: dict[str, Any] = {"layout_key": layout.key, **layout.params(),
                               "pred_peak_mem_bytes": cand.prediction.total if cand.prediction else "",
                               "predicted_fits": int(cand.fits), "loadavg_1m": load}
        try:
            summary = launch(cfg, timeout=spec.budget.trial_timeout_s)[0].summary
            peak = int(summary["peak_mem_bytes"])
            row.update(status="oom" if peak > cap else "ok", tokens_per_s=round(summary["tokens_per_s"], 2),
                       step_time_s=round(summary["step_time_s"], 5),
                       step_time_p90_s=round(summary["step_time_p90_s"], 5), peak_mem_bytes=peak, reason="")
        except Exception as exc:  # a crashed layout is a row too
            row.update(status="crashed", tokens_per_s=0.0, step_time_s="", step_time_p90_s="", peak_mem_bytes="",
                       reason=str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        row.update(seconds=round(time.monotonic() - t0, 2), cpus=mach["cpus"], platform=mach["platform"],
                   torch=torch.__version__)
        table[layout.key] = _merge(table.get(layout.key), row)
        if average:
            table[layout.key] = _averaged(table[layout.key], spec.search.global_batch_size * spec.search.seq_len)
        say(f"{i:>3}/{len(layouts)} {layout.key:<40} {row['status']:<7} {row['tokens_per_s']:>9} tok/s  "
            f"peak {(row['peak_mem_bytes'] or 0) / 1e6:6.2f} MB (pred {(row['pred_peak_mem_bytes'] or 0) / 1e6:6.2f})"
            f"  {row['seconds']:5.1f} s  load {load}")
        write_csv(path, [table[k] for k in sorted(table)], COLUMNS)  # kept current: a cut run keeps its rows
    rows = list(table.values())
    info_path = path.with_suffix(".json")
    previous = json.loads(info_path.read_text()) if add_pass and info_path.exists() else {}
    this_pass = {"pass": pass_no, "machine": mach, "layouts": len(layouts),
                 "runtime_s": round(time.monotonic() - started, 1), "loadavg_1m_end": machine().get("loadavg_1m")}
    info = {"space": name, "space_file": f"benchmarks/spaces/{name}.yaml", "space_data": data, "machine": mach,
            "cap_bytes": cap, "layouts": len(rows),
            "measure": {"launcher": "tests.launch.launch (gloo, 1 thread per rank)",
                        "warmup_steps": spec.budget.warmup_steps, "measure_steps": spec.budget.measure_steps,
                        "per_layout": ("the mean of its passes" if average else "the fastest of its passes")
                        + " (tokens_per_s_passes keeps each)"},
            "counts": {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "oom", "crashed")},
            "passes": previous.get("passes", []) + [this_pass]}
    write_json(info_path, info)
    say(f"wrote {path} and {info_path.name}: {info['counts']}, pass {pass_no} in {this_pass['runtime_s']:.0f} s")
    return 0 if info["counts"]["crashed"] == 0 else 1
