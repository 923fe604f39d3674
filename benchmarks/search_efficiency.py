"""Search efficiency: how many launched trials until a search finds a near-best layout.

Two modes.

``--measure`` runs every structurally valid layout of a space (benchmarks/spaces/<name>.yaml) once
on this machine, on real gloo ranks (`tests.launch.launch`, the space's warm-up and measured
steps plus the memory probe), in a shuffled order so that a change in the machine's load does not
line up with one region of the grid. It saves the table as benchmarks/results/grid_<name>.csv
(one row per layout: throughput, measured and predicted peak memory, status, and the machine's
cpu count, platform and torch version) with grid_<name>.json beside it. A layout whose measured
peak exceeds the space's memory cap is an `oom` row: on a device with that much memory it would
not have run.

The default mode replays search strategies over a table of measured (or published) layouts,
20 seeds each, and counts the launched trials until one of them is within 2% of the table's
best tokens/s among layouts that fit the cap, and the summed trial seconds to get there (the
table's `seconds` per pass where it has them, else GPU-seconds of one step: a GPU-time proxy).
A table's columns: `ep,tp,pp,dp,micro_batch_size,precision,recompute,schedule,status,
tokens_per_s,peak_mem_bytes` (more are kept); a layout without a row was not measured, and a
strategy that launches it gets a failed trial.

* grid: every valid layout in the order the space enumerates them (no memory model);
* random: a random order of the valid layouts, without repeats (no memory model);
* plain TPE: Optuna's default `TPESampler(seed=seed)` over the same knobs as autotune, asked and
  told directly, as fair as a user would make it: a repeated layout gets its measured result back
  without a launch, an over-cap or failed layout is told as completed and infeasible (Optuna's
  constraint), a proposal that is no layout is refused before launch; no memory model;
* autotune: `autotune.search.searcher.LayoutSearcher` driven exactly as Ray Tune drives it (`suggest`,
  then `on_trial_complete`), on an in-memory Optuna study, with the default `study.sampler: auto`:
  memory-model pruning, the opening on the step-time model's fastest predicted layouts (one per
  (ep, tp, pp) family), then the calibrated model's best unmeasured layout alternating with TPE;
* autotune-no-model: the same searcher with `study.sampler: tpe`: pruning, cache and TPE,
  without the step-time model (what the model is worth);
* autotune-random: the same searcher with `study.sampler: random` (what the memory model and
  the cache alone are worth).

Trials run one at a time (a sequential replay). A strategy that never finds a near-best layout
(the memory model may prune it) counts as not found.

Goals (issue 13): autotune's median <= 5 trials and worst <= 12, each below every baseline's
median.

    python -m benchmarks.search_efficiency --measure --space tiny_cpu_pp --passes 3   # measure a grid
    python -m benchmarks.search_efficiency --space tiny_cpu_pp  # replay grid_tiny_cpu_pp.csv, 20 seeds
    python -m benchmarks.search_efficiency --table T.csv --space S.yaml   # any table and space
    python -m benchmarks.search_efficiency --measure            # measure the grid (~10 min, 2 cores)
    python -m benchmarks.search_efficiency                      # replay, 20 seeds (~1 min)
    python -m benchmarks.search_efficiency --quick              # replay 2 seeds: checks the script
    python -m benchmarks.search_efficiency --measure --quick    # measure 3 layouts into grid_<name>_quick.csv

Results: benchmarks/results/search_efficiency.{csv,json} (`_quick` with --quick).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from autotune.predict.candidates import INVALID, Screening, screen  # noqa: E402
from autotune.space.layout import Layout  # noqa: E402
from autotune.space.spec import Spec, spec_from_data  # noqa: E402
from benchmarks.common import RESULTS, SPACES, machine, say, write_csv, write_json  # noqa: E402

DEFAULT_SPACE = "tiny_cpu"
SEEDS = 20
WITHIN = 0.02
GOAL_FRACTION = 0.15
STRATEGIES = ("grid", "random", "plain-tpe", "autotune", "autotune-no-model", "autotune-random")
BASELINES = ("grid", "random", "plain-tpe", "autotune-no-model")
GOAL_MEDIAN, GOAL_WORST = 5, 12


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


def _preload_fork_server() -> None:
    import tests.launch as launch_mod

    # Each rank forks from a server that already imported these, so a run starts in milliseconds.
    launch_mod._CTX.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed.pipelining",
                                            "torch.distributed.fsdp.sharded_grad_scaler", "trainables.moe.train",
                                            "tests.launch"])


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
    _preload_fork_server()
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


# ------------------------------------------------------------------------------------------------
# The table and what a launched trial returns


@dataclass
class Table:
    rows: dict[str, dict[str, Any]]  # by layout key
    cap: int
    best_key: str
    best_tps: float
    good: frozenset[str]  # keys within WITHIN of the best, among layouts that fit the cap

    def status(self, key: str) -> str:
        row = self.rows.get(key)
        if row is None:
            return "crashed"  # not measured: a launch of it is a failed trial
        if row["status"] == "ok" and row["peak_mem_bytes"] > self.cap:
            return "oom"
        return row["status"]

    def cost(self, key: str) -> float:
        """Seconds a trial of this layout took (a GPU-time proxy where the table has no seconds)."""
        row = self.rows.get(key)
        return float(row["cost_s"]) if row is not None else self.median_cost

    @property
    def median_cost(self) -> float:
        return statistics.median(float(r["cost_s"]) for r in self.rows.values())


def _key_of(r: dict[str, Any]) -> str:
    return Layout(int(r["ep"]), int(r["tp"]), int(r["pp"]), int(r["dp"]), int(r["micro_batch_size"]),
                  r["precision"], r["recompute"], (r.get("schedule") or "1f1b") if int(r["pp"]) > 1 else "1f1b").key


def load_table(path: Path, cap: int, tokens_per_step: int | None = None) -> Table:
    """Rows `ep,tp,pp,dp,micro_batch_size,precision,recompute,schedule,status,tokens_per_s,
    peak_mem_bytes` (optional: layout_key, seconds, passes). A layout without a row was not measured."""
    rows: dict[str, dict[str, Any]] = {}
    with path.open() as f:
        for r in csv.DictReader(f):
            r["layout_key"] = r.get("layout_key") or _key_of(r)
            r["tokens_per_s"] = float(r["tokens_per_s"] or 0.0)
            r["peak_mem_bytes"] = int(float(r["peak_mem_bytes"])) if r.get("peak_mem_bytes") else 0
            world = int(r["ep"]) * int(r["tp"]) * int(r["pp"]) * int(r["dp"])
            if r.get("seconds"):  # measured trials: their own wall time, one pass of it
                r["cost_s"] = float(r["seconds"]) / max(1, int(r.get("passes") or 1))
            elif tokens_per_step and r["tokens_per_s"]:  # GPU-seconds of one step
                r["cost_s"] = tokens_per_step / r["tokens_per_s"] * world
            else:
                r["cost_s"] = 0.0
            rows[r["layout_key"]] = r
    fitting = {k: r for k, r in rows.items() if r["status"] in ("ok", "oom") and r["peak_mem_bytes"] <= cap}
    if not fitting:
        raise SystemExit(f"{path}: no measured layout fits the cap of {cap} bytes")
    best_key = max(fitting, key=lambda k: fitting[k]["tokens_per_s"])
    best = fitting[best_key]["tokens_per_s"]
    good = frozenset(k for k, r in fitting.items() if r["tokens_per_s"] >= (1 - WITHIN) * best)
    for r in rows.values():
        if r["status"] == "ok" and r["peak_mem_bytes"] > cap:
            r["status"] = "oom"
    return Table(rows, cap, best_key, best, good)


@dataclass
class Run:
    """One strategy, one seed: launched trials until a near-best layout, or None."""

    found_at: int | None
    launched: int
    ooms: int  # launched trials that failed for memory
    repeats: int = 0  # proposals of a layout already measured, answered from the record (plain TPE)
    pruned: int = 0  # proposals answered by the memory model without a launch
    seconds: float = 0.0  # summed trial seconds of the launches up to the hit (all, when never found)


def _run_order(order: list[Layout], table: Table) -> Run:
    ooms = 0
    seconds = 0.0
    for i, layout in enumerate(order, 1):
        ooms += table.status(layout.key) == "oom"
        seconds += table.cost(layout.key)
        if layout.key in table.good:
            return Run(i, i, ooms, seconds=seconds)
    return Run(None, len(order), ooms, seconds=seconds)


def replay_grid(data: dict[str, Any], table: Table, seed: int) -> Run:
    return _run_order(valid_layouts(screen(with_study(data, seed))), table)


def replay_random(data: dict[str, Any], table: Table, seed: int) -> Run:
    order = valid_layouts(screen(with_study(data, seed)))
    random.Random(seed).shuffle(order)
    return _run_order(order, table)


def replay_plain_tpe(data: dict[str, Any], table: Table, seed: int) -> Run:
    """Optuna's default TPE, asked and told directly, made as fair as a user would make it: a
    repeat of a measured layout gets its measured result back (no launch); an over-cap or failed
    layout is told as a completed, infeasible trial (constraint > 0), so TPE learns to avoid it;
    a proposal that is no valid layout is refused before launch. No memory model."""
    import optuna

    from autotune.predict.candidates import judge
    from autotune.search.searcher import distributions, layout_from_params

    spec = with_study(data, seed)
    space = distributions(spec)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    valid = len(valid_layouts(screen(spec)))
    launched = ooms = repeats = 0
    seconds = 0.0
    measured: dict[str, float] = {}  # layout -> value told (0 for a failed one)
    for _ in range(200 * valid):
        trial = study.ask(space)
        layout = layout_from_params(spec, trial.params)
        if isinstance(layout, str) or judge(spec, layout).verdict == INVALID:
            trial.set_constraint("memory_and_failures", 1.0)
            study.tell(trial, 0.0)
            continue
        if layout.key in measured:
            repeats += 1
            trial.set_constraint("memory_and_failures", -1.0 if measured[layout.key] else 1.0)
            study.tell(trial, measured[layout.key])
            continue
        launched += 1
        seconds += table.cost(layout.key)
        status = table.status(layout.key)
        value = table.rows[layout.key]["tokens_per_s"] if status == "ok" else 0.0
        ooms += status == "oom"
        measured[layout.key] = value
        trial.set_constraint("memory_and_failures", -1.0 if status == "ok" else 1.0)
        study.tell(trial, value)
        if layout.key in table.good:
            return Run(launched, launched, ooms, repeats, seconds=seconds)
        if launched >= valid:
            break
    return Run(None, launched, ooms, repeats, seconds=seconds)


def replay_layout_searcher(data: dict[str, Any], table: Table, seed: int, sampler: str | None = None) -> Run:
    """Ray Tune's side of a study, sequentially: suggest, then complete with the table's result."""
    from ray.tune.search import Searcher

    from autotune.schema import Status
    from autotune.search.searcher import LayoutSearcher, create_study
    from autotune.trial_record import TrialRecord

    spec = with_study(data, seed, sampler)
    screening = screen(spec)
    study = create_study(spec, None, load_if_exists=False)  # in memory
    configs: dict[str, dict[str, Any]] = {}
    pruned = 0

    def make_config(number: int, layout: Layout, cand) -> dict[str, Any]:
        return {"number": number, "layout": layout.params(), "layout_key": layout.key,
                "prediction": cand.prediction.as_metrics() if cand.prediction else {}}

    def on_decided(record: TrialRecord) -> TrialRecord:
        nonlocal pruned
        pruned += 1
        return record

    def on_complete(trial_id: str, result: dict | None, error: bool) -> TrialRecord:
        cfg = configs[trial_id]
        key = cfg["layout_key"]
        status = table.status(key)
        metrics: dict[str, float] = {}
        if key in table.rows and table.rows[key]["peak_mem_bytes"]:
            metrics["peak_mem_bytes"] = table.rows[key]["peak_mem_bytes"]
        if status == "ok":
            metrics["tokens_per_s"] = table.rows[key]["tokens_per_s"]
            metrics["step_time_s"] = spec.search.global_batch_size * spec.search.seq_len / metrics["tokens_per_s"]
        return TrialRecord(number=cfg["number"], layout=Layout.from_params(cfg["layout"]), status=Status(status),
                           reason="" if status == "ok" else f"{status} in the measured grid", metrics=metrics,
                           prediction=cfg["prediction"])

    fitting = sum(1 for c in screening.candidates if c.fits)
    searcher = LayoutSearcher(spec, screening, study, make_config, on_decided, on_complete, fitting)
    launched = ooms = 0
    seconds = 0.0
    for i in range(fitting + 1):
        trial_id = f"replay_{i:05d}"
        cfg = searcher.suggest(trial_id)
        if cfg is None or cfg == Searcher.FINISHED:
            break
        configs[trial_id] = cfg
        launched += 1
        key = cfg["layout_key"]
        seconds += table.cost(key)
        ooms += table.status(key) == "oom"
        tps = table.rows[key]["tokens_per_s"] if table.status(key) == "ok" else 0.0
        searcher.on_trial_complete(trial_id, {"tokens_per_s": tps, "autotune_final": True}, False)
        if key in table.good:
            return Run(launched, launched, ooms, pruned=pruned, seconds=seconds)
    return Run(None, launched, ooms, pruned=pruned, seconds=seconds)


REPLAYS: dict[str, Callable[[dict[str, Any], Table, int], Run]] = {
    "grid": replay_grid,
    "random": replay_random,
    "plain-tpe": replay_plain_tpe,
    "autotune": lambda d, t, s: replay_layout_searcher(d, t, s),
    "autotune-no-model": lambda d, t, s: replay_layout_searcher(d, t, s, "tpe"),
    "autotune-random": lambda d, t, s: replay_layout_searcher(d, t, s, "random"),
}


def _quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("ray").setLevel(logging.ERROR)


def _stats(runs: list[Run], grid_size: int) -> dict[str, Any]:
    counts = [r.found_at if r.found_at is not None else float("inf") for r in runs]
    not_found = sum(1 for r in runs if r.found_at is None)
    median = statistics.median(counts)
    return {"median": median, "worst": max(counts), "best": min(counts),
            "mean_found": statistics.fmean([c for c in counts if c != float("inf")]) if not_found < len(runs) else None,
            "not_found": not_found, "median_fraction_of_grid": median / grid_size,
            "ooms_launched_median": statistics.median(r.ooms for r in runs),
            "pruned_median": statistics.median(r.pruned for r in runs),
            "repeats_median": statistics.median(r.repeats for r in runs),
            "seconds_median": statistics.median(r.seconds for r in runs),
            "seconds_worst": max(r.seconds for r in runs)}


def _fmt(x: float) -> str:
    return "never" if x == float("inf") else f"{x:g}"


def replay(name: str, quick: bool, seeds: int, table_file: Path | None) -> int:
    _quiet()
    data = space_data(name)
    spec = with_study(data, 0)
    screening = screen(spec)
    grid_size = len(valid_layouts(screening))
    path = table_file or table_path(name, False)
    if not path.exists():
        raise SystemExit(f"{path} does not exist: measure it first with "
                         f"python -m benchmarks.search_efficiency --measure --space {name}")
    table = load_table(path, screening.cap_bytes, spec.search.global_batch_size * spec.search.seq_len)
    missing = [l.key for l in valid_layouts(screening) if l.key not in table.rows]
    started = time.monotonic()
    n_seeds = 2 if quick else seeds
    say(f"space {name}: {grid_size} valid layouts, {sum(1 for c in screening.candidates if c.fits)} under the "
        f"memory model's cap ({screening.cap_bytes / 1e6:.2f} MB); table {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
        f" ({len(table.rows)} rows, {sum(1 for r in table.rows.values() if r['status'] == 'oom')} over the cap"
        + (f", {len(missing)} layouts missing: counted as crashed" if missing else "") + ")")
    say(f"best fitting layout {table.best_key} at {table.best_tps:.0f} tokens/s; {len(table.good)} layout(s) within "
        f"{WITHIN:.0%}: {', '.join(sorted(table.good))}")
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for strategy in STRATEGIES:
        runs = []
        for seed in range(n_seeds):
            run = REPLAYS[strategy](data, table, seed)
            runs.append(run)
            rows.append({"strategy": strategy, "seed": seed, "found_at": run.found_at if run.found_at is not None else "",
                         "launched": run.launched, "ooms_launched": run.ooms, "pruned": run.pruned,
                         "repeats": run.repeats, "seconds": round(run.seconds, 2)})
        summary[strategy] = _stats(runs, grid_size)
    say("")
    say(f"launched trials until within {WITHIN:.0%} of the best ({n_seeds} seeds; grid size {grid_size})")
    say(f"  {'strategy':<18} {'median':>7} {'worst':>7} {'best':>5}  not found  ooms launched  trial s to hit (median)")
    for strategy in STRATEGIES:
        s = summary[strategy]
        say(f"  {strategy:<18} {_fmt(s['median']):>7} {_fmt(s['worst']):>7} {_fmt(s['best']):>5}  {s['not_found']:>9}  "
            f"{s['ooms_launched_median']:>13g}  {s['seconds_median']:.1f}")
    auto = summary["autotune"]
    limit = GOAL_FRACTION * grid_size
    below = {k: auto["median"] < summary[k]["median"] and auto["worst"] < summary[k]["median"] for k in BASELINES}
    goals = {"autotune_median_le_5": auto["median"] <= GOAL_MEDIAN, "autotune_worst_le_12": auto["worst"] <= GOAL_WORST,
             **{f"median_and_worst_below_{k}_median": v for k, v in below.items()}}
    ratio = {k: (summary[k]["median"] / auto["median"] if auto["median"] not in (0, float("inf")) else None)
             for k in BASELINES}
    say(f"ratio (baseline median / autotune median): "
        + ", ".join(f"{k} {v:.2f}x" if v is not None and v != float("inf") else f"{k} n/a" for k, v in ratio.items()))
    say(f"goal: autotune median <= {GOAL_MEDIAN}: {'met' if goals['autotune_median_le_5'] else 'NOT met'} "
        f"({_fmt(auto['median'])}); worst <= {GOAL_WORST}: {'met' if goals['autotune_worst_le_12'] else 'NOT met'} "
        f"({_fmt(auto['worst'])}); median and worst below each baseline's median: "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in below.items())
        + ("  (--quick: 2 seeds, the figures mean little)" if quick else ""))
    suffix = ("" if space_name(name) == DEFAULT_SPACE else f"_{space_name(name)}")
    suffix += f"_{path.stem}" if table_file is not None and path != table_path(name, False) else ""
    suffix += "_quick" if quick else ""
    out = {"benchmark": "search_efficiency", "quick": quick, "space": space_name(name), "table": str(path.relative_to(ROOT))
           if path.is_relative_to(ROOT) else str(path), "machine": machine(), "grid_size": grid_size,
           "fitting_by_memory_model": sum(1 for c in screening.candidates if c.fits), "cap_bytes": screening.cap_bytes,
           "best": {"layout": table.best_key, "tokens_per_s": table.best_tps}, "within": WITHIN,
           "good_layouts": sorted(table.good), "seeds": n_seeds, "strategies": summary, "ratio_vs_autotune": ratio,
           "goal": {"fraction_of_grid": GOAL_FRACTION, "trials": limit}, "goals_met": goals,
           "runtime_s": round(time.monotonic() - started, 1), "python": platform.python_version()}
    write_csv(RESULTS / f"search_efficiency{suffix}.csv", rows)
    write_json(RESULTS / f"search_efficiency{suffix}.json", _finite(out))
    say(f"wrote {RESULTS / f'search_efficiency{suffix}.csv'} and .json ({out['runtime_s']:.0f} s)")
    return 0


def _finite(x: Any) -> Any:
    """JSON has no infinity: a strategy that never found a near-best layout is null there."""
    if isinstance(x, float) and x in (float("inf"), float("-inf")):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search_efficiency", description=__doc__.split("\n")[0])
    p.add_argument("--measure", action="store_true", help="measure the space's grid and save the table")
    p.add_argument("--quick", action="store_true", help="replay 2 seeds (with --measure: measure 3 layouts)")
    p.add_argument("--add-pass", action="store_true",
                   help="with --measure: measure the grid once more and keep each layout's fastest pass")
    p.add_argument("--passes", type=int, default=1,
                   help="with --measure: this many interleaved passes, each layout's figure their mean")
    p.add_argument("--space", default=DEFAULT_SPACE,
                   help=f"a space file (YAML), or a name under benchmarks/spaces (default {DEFAULT_SPACE})")
    p.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per strategy (default {SEEDS})")
    p.add_argument("--table", type=Path, default=None, help="replay this table instead of grid_<space>.csv")
    args = p.parse_args(argv)
    if args.measure:
        return measure(args.space, args.quick, args.add_pass, args.passes, average=args.passes > 1)
    return replay(args.space, args.quick, args.seeds, args.table)


if __name__ == "__main__":
    sys.exit(main())
