"""Replaying a search over a table of measured layouts, as `benchmarks.search_efficiency` does.

A table (measured on this machine, published, or simulated) stands in for the cluster: a launch
of a layout returns the table's figure times a run-to-run noise drawn once per seed and layout,
a layout the table lacks is a failed trial, one over the memory cap an OOM. Each strategy (grid,
random, plain TPE, autotune's searcher and its ablations) proposes layouts one at a time until
it has launched at least `TRACE` and hit a near-best one; `Run` keeps what it launched.
"""

from __future__ import annotations

import csv
import random
import statistics
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autotune.predict.candidates import INVALID, screen
from autotune.space.layout import Layout
from benchmarks.grid_measure import valid_layouts, with_study

WITHIN = 0.02
NOISE_LOG_SD = 0.03  # run-to-run spread of one measurement (log throughput) in a replay


# ------------------------------------------------------------------------------------------------
# The table and what a launched trial returns


@dataclass
class Table:
    rows: dict[str, dict[str, Any]]  # by layout key
    cap: int
    best_key: str
    best_tps: float
    good: frozenset[str]  # keys within WITHIN of the best, among layouts that fit the cap
    limit: int | None = None  # no replay over it launches more (--quick: a later hit counts as not found)

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

    def true_tps(self, key: str) -> float:
        """The table's throughput of a layout that ran and fits the cap, else 0."""
        return float(self.rows[key]["tokens_per_s"]) if self.status(key) == "ok" else 0.0

    def within(self, share: float) -> frozenset[str]:
        return frozenset(k for k in self.rows if self.true_tps(k) >= (1 - share) * self.best_tps)

    def measured(self, key: str, seed: int) -> float:
        """What a trial of this layout measures in the run of this seed: the table's figure times
        a run-to-run noise (NOISE_LOG_SD, log-normal), drawn once per seed and layout. The seed
        changes what a second study on the same cluster would see; the near-best layouts are still
        judged on the table's own figures."""
        tps = self.true_tps(key)
        if not tps or not NOISE_LOG_SD:
            return tps
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        return tps * float(np.exp(rng.normal(0.0, NOISE_LOG_SD)))


def _key_of(r: dict[str, Any]) -> str:
    return Layout(int(r["ep"]), int(r["tp"]), int(r["pp"]), int(r["dp"]), int(r["micro_batch_size"]),
                  r["precision"], r["recompute"], (r.get("schedule") or "1f1b") if int(r["pp"]) > 1 else "1f1b").key


def load_table(path: Path, cap: int, tokens_per_step: int | None = None, limit: int | None = None) -> Table:
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
    return Table(rows, cap, best_key, best, good, limit)


@dataclass
class Run:
    """One strategy, one seed: the layouts it launched, in order (at least TRACE of them, or until
    it hit a near-best layout if that came later)."""

    keys: list[str]
    ooms: int  # launched trials that failed for memory
    repeats: int = 0  # proposals of a layout already measured, answered from the record (plain TPE)
    pruned: int = 0  # proposals answered by the memory model without a launch

    def found_at(self, table: Table, within: float = WITHIN) -> int | None:
        good = table.within(within)
        return next((i for i, k in enumerate(self.keys, 1) if k in good), None)

    def best_after(self, table: Table, n: int) -> float:
        """The best true throughput among the first n launches, as a share of the table's best."""
        return max((table.true_tps(k) for k in self.keys[:n]), default=0.0) / table.best_tps

    def seconds(self, table: Table, within: float = WITHIN) -> float:
        """Summed trial seconds up to the hit (all launches when never found)."""
        hit = self.found_at(table, within)
        return sum(table.cost(k) for k in self.keys[:hit or len(self.keys)])


TRACE = 20  # launches every replay makes at least (for "best after 20 trials")


def _enough(keys: list[str], table: Table) -> bool:
    return ((len(keys) >= TRACE and any(k in table.good for k in keys))
            or (table.limit is not None and len(keys) >= table.limit))


def _run_order(order: list[Layout], table: Table) -> Run:
    keys: list[str] = []
    for layout in order:
        keys.append(layout.key)
        if _enough(keys, table):
            break
    return Run(keys, sum(table.status(k) == "oom" for k in keys))


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
    keys: list[str] = []
    repeats = 0
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
        keys.append(layout.key)
        value = table.measured(layout.key, seed)
        measured[layout.key] = value
        trial.set_constraint("memory_and_failures", -1.0 if value else 1.0)
        study.tell(trial, value)
        if _enough(keys, table) or len(keys) >= valid:
            break
    return Run(keys, sum(table.status(k) == "oom" for k in keys), repeats)


def replay_layout_searcher(data: dict[str, Any], table: Table, seed: int, sampler: str | None = None,
                           guide: str | None = None) -> Run:
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
            metrics["tokens_per_s"] = table.measured(key, seed)
            metrics["step_time_s"] = spec.search.global_batch_size * spec.search.seq_len / metrics["tokens_per_s"]
        return TrialRecord(number=cfg["number"], layout=Layout.from_params(cfg["layout"]), status=Status(status),
                           reason="" if status == "ok" else f"{status} in the measured grid", metrics=metrics,
                           prediction=cfg["prediction"])

    fitting = sum(1 for c in screening.candidates if c.fits)
    searcher = LayoutSearcher(spec, screening, study, make_config, on_decided, on_complete, fitting, guide=guide)
    keys: list[str] = []
    for i in range(fitting + 1):
        trial_id = f"replay_{i:05d}"
        cfg = searcher.suggest(trial_id)
        if cfg is None or cfg == Searcher.FINISHED:
            break
        configs[trial_id] = cfg
        key = cfg["layout_key"]
        keys.append(key)
        searcher.on_trial_complete(trial_id, {"tokens_per_s": table.measured(key, seed), "autotune_final": True},
                                   False)
        if _enough(keys, table):
            break
    return Run(keys, sum(table.status(k) == "oom" for k in keys), pruned=pruned)


# Every strategy sees the same table through the same seeded measurement noise.
REPLAYS: dict[str, Callable[[dict[str, Any], Table, int], Run]] = {
    "grid": replay_grid,
    "random": replay_random,
    "plain-tpe": replay_plain_tpe,
    "autotune-no-model": lambda d, t, s: replay_layout_searcher(d, t, s, "tpe"),
    "frontier-only": lambda d, t, s: replay_layout_searcher(d, t, s, guide="frontier"),
    "opening-only": lambda d, t, s: replay_layout_searcher(d, t, s, guide="opening"),
    "previous": lambda d, t, s: replay_layout_searcher(d, t, s, guide="alternate"),
    "model-only": lambda d, t, s: replay_layout_searcher(d, t, s, guide="greedy"),
    "autotune": lambda d, t, s: replay_layout_searcher(d, t, s),
}
