"""Fidelity: how far is a quick-start study's pick from the true best layout?

Regret of the pick over repeated quick-start studies, against the true best from long,
interleaved, repeated measurement of every fitting layout of the same space
(search_spaces/quickstart-cpu.yaml). Settings, fixed before any run:

* studies: 10 runs of `autotune run` on the quickstart space exactly as shipped (14 trials,
  1 warm-up + 3 measured steps, 2 at a time, the end-of-study re-measuring of tied leaders on
  its default budget), seeds 0-9, each in its own folder, MLflow store and Ray;
* true best: every layout the memory model lets through, run alone on local gloo ranks
  (`tests.launch`, one thread per rank, as in a trial) for 2 warm-up + 10 measured steps, in
  3 rounds, each round in its own shuffled order; a layout's true throughput is the global
  batch x seq_len over the median of its 30 measured steps; a layout whose measured peak
  exceeds the memory cap cannot be the true best (a study cannot pick it either);
* order: long round 1, studies 0-4, long round 2, studies 5-9, long round 3, so that the
  machine's drift over the benchmark hits both sides alike;
* regret of a study = true throughput of the true best / true throughput of its pick - 1;
  goal: regret <= 3%, or the true best among the layouts the study's report calls tied with
  its pick, in at least 9 of the 10 studies.

Secondary: Kendall tau-b between each study's measured throughputs (its layouts, re-measures
pooled) and the true ones, beside the noise floor: tau between repeated long rounds (round i
against round j over every layout), not between halves of one run.

    python -m benchmarks.fidelity            # the figure (~50 min on 2 quiet cores)
    python -m benchmarks.fidelity --quick    # 2 studies of 1 trial, 2 short rounds: checks the script
    python -m benchmarks.fidelity --space benchmarks/spaces/fidelity_unseen.yaml --studies 6
                                             # the same method on a case the rules never saw

Results: benchmarks/results/fidelity.{csv,json} (`fidelity_quick.*` with --quick; with --space,
`fidelity_<space file name without fidelity_>.*`). With --studies N the goal scales: at least 9/10 of N.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, preload_launch, say, write_csv, write_json  # noqa: E402

QUICKSTART = ROOT / "search_spaces" / "quickstart-cpu.yaml"
STUDIES = 10
LONG_ROUNDS = 3
LONG_WARMUP, LONG_MEASURE = 2, 10
GOAL_REGRET = 0.03
GOAL_STUDIES = 9
STUDY_TIMEOUT_S = 1800


def goal_studies(n: int) -> int:
    """How many of `n` studies must meet the regret goal: 9 of 10, scaled (6 of 6 is needed at 6)."""
    return math.ceil(GOAL_STUDIES * n / STUDIES)


def kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties in either ranking count as neither concordant nor discordant)."""
    n = len(x)
    conc = disc = tie_x = tie_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tie_x += 1
            elif dy == 0:
                tie_y += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + tie_x) * (conc + disc + tie_y)) ** 0.5
    return (conc - disc) / denom if denom else float("nan")


def _long_run(spec, layout, warmup: int, measure: int) -> tuple[list[float], float | None]:
    """Measured step times (slowest rank) and the measured peak of one run of a layout."""
    from autotune.trials.configs import run_config_for
    from tests.launch import launch

    cfg = replace(run_config_for(spec, layout, timeout_s=600), warmup_steps=warmup, steps=measure)
    results = launch(cfg, timeout=600)
    per_rank = [r.step_times for r in results]
    times = [max(ts[i] for ts in per_rank) for i in range(warmup + measure)][warmup:]
    summary = next((r.summary for r in results if r.summary), None) or {}
    return times, summary.get("peak_mem_bytes")


def _study(data: dict[str, Any], seed: int, work: Path, quick: bool) -> dict[str, Any]:
    """One `autotune run` of the space with this seed, in its own folder; its pick and trials."""
    import yaml

    from autotune.space.spec import spec_from_data
    from autotune.study.store import load_result

    d = json.loads(json.dumps(data))
    folder = work / f"study{seed}"
    folder.mkdir(parents=True)
    d["study"] = {**d.get("study", {}), "name": f"fidelity-{seed}", "seed": seed, "output_dir": str(folder / "runs")}
    d["tracking"] = {**d.get("tracking", {}), "uri": f"sqlite:///{folder / 'mlflow.db'}"}
    if quick:  # the script's path: one trial, no re-measuring round
        d["budget"] = {**d["budget"], "trials": 1, "remeasure_share": 0}
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump(d))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "autotune.cli", "run", str(space), "--plain"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=STUDY_TIMEOUT_S)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"study {seed} exited {proc.returncode}: {proc.stderr[-2000:]}")
    spec = spec_from_data(d)
    result = load_result(spec.study.name, Path(spec.study.output_dir))
    report = json.loads((spec.study.directory() / "report" / "report.json").read_text())
    standing = report["standing"]
    return {"seed": seed, "wall_s": round(wall, 1), "pick": standing["best"]["layout"],
            "pick_tokens_per_s": standing["best"]["tokens_per_s"],
            "tied": [t["layout"] for t in standing["tied"]], "verdict_tie": report["verdict"].get("tie"),
            "launches": sum(1 for t in result.trials if t.status.value not in ("pruned_by_memory_model", "invalid")),
            "remeasures": standing.get("remeasures", 0), "run_spread": standing.get("run_spread"),
            "measured": {t.layout.key: t.tokens_per_s for t in result.fitting()}}


def analyse(spec, long_times: dict[str, list[list[float]]], peaks: dict[str, float], studies: list[dict[str, Any]],
            measure: int, quick: bool) -> dict[str, Any]:
    """Regret, ties and tau of every study against the long measurement; prints the table."""
    from autotune.search.stats import runs_interval, tied_with_best

    cap = spec.objective.memory_cap * spec.cluster.memory_bytes
    tokens = spec.search.global_batch_size * spec.search.seq_len
    rounds_n = min(len(r) for r in long_times.values())
    intervals = {k: runs_interval(runs) for k, runs in long_times.items()}
    true_tps = {k: tokens / iv.median for k, iv in intervals.items()}
    eligible = {k: iv for k, iv in intervals.items() if peaks.get(k, 0.0) <= cap}
    true_best, true_tied = tied_with_best(eligible)
    keys = sorted(long_times)
    round_tps = [[tokens / statistics.median(long_times[k][r]) for k in keys] for r in range(rounds_n)]
    floor = [kendall_tau_b(round_tps[i], round_tps[j]) for i, j in itertools.combinations(range(rounds_n), 2)]

    rows, details = [], []
    for s in studies:
        pick_true = true_tps.get(s["pick"])
        regret = true_tps[true_best] / pick_true - 1 if pick_true else None
        tied_ok = true_best == s["pick"] or true_best in s["tied"]
        common = [k for k in s["measured"] if k in true_tps]
        tau = kendall_tau_b([s["measured"][k] for k in common], [true_tps[k] for k in common]) \
            if len(common) >= 2 else float("nan")
        within = regret is not None and regret <= GOAL_REGRET
        rows.append({"seed": s["seed"], "pick": s["pick"], "pick_study_tokens_per_s": round(s["pick_tokens_per_s"], 1),
                     "pick_true_tokens_per_s": round(pick_true, 1) if pick_true else None,
                     "regret": round(regret, 4) if regret is not None else None, "within_goal": within,
                     "true_best_tied_with_pick": tied_ok, "success": within or tied_ok,
                     "tied": len(s["tied"]), "tied_layouts": " ".join(s["tied"]), "verdict_tie": s["verdict_tie"],
                     "launches": s["launches"], "remeasures": s["remeasures"], "layouts_measured": len(common),
                     "tau_vs_true": round(tau, 4), "wall_s": s["wall_s"]})
        details.append({"seed": s["seed"], "run_spread": s.get("run_spread"),
                        "measured_tokens_per_s": {k: round(v, 1) for k, v in s["measured"].items()}})

    successes = sum(r["success"] for r in rows)
    regrets = [r["regret"] for r in rows if r["regret"] is not None]
    goal = len(rows) if quick else goal_studies(len(rows))
    met = successes >= goal
    best_iv = eligible[true_best]
    say("")
    say(f"true best ({rounds_n} x {measure} measured steps, interleaved): {true_best} {true_tps[true_best]:.0f} tok/s, "
        f"90% interval {tokens / best_iv.hi:.0f}-{tokens / best_iv.lo:.0f}; tied with it in the long measurement: "
        f"{len(true_tied)}")
    say(f"{'seed':>4} {'pick':<40} {'regret':>7} {'tied':>4} {'true best tied':>14} {'tau':>6}")
    for r in rows:
        shown = f"{r['regret'] * 100:6.1f}%" if r["regret"] is not None else "     -"
        say(f"{r['seed']:>4} {r['pick']:<40} {shown} {r['tied']:>4} {str(r['true_best_tied_with_pick']):>14} "
            f"{r['tau_vs_true']:6.2f}")
    med_regret = statistics.median(regrets) if regrets else None
    say(f"regret: median {med_regret if med_regret is not None else float('nan'):.1%}, "
        f"max {max(regrets) if regrets else float('nan'):.1%}; within {GOAL_REGRET:.0%} of the true best or tied with "
        f"it by the report's rule: {successes} of {len(rows)} (goal >= {goal} of {len(rows)}): "
        f"{'met' if met else 'NOT met'}" + ("  (--quick: meaningless)" if quick else ""))
    taus = [r["tau_vs_true"] for r in rows if r["tau_vs_true"] == r["tau_vs_true"]]
    say(f"Kendall tau, study vs true (secondary): median {statistics.median(taus) if taus else float('nan'):.2f}; "
        f"noise floor, long round vs long round: {', '.join(f'{t:.2f}' for t in floor)}")
    return {"rows": rows, "layouts_long_measured": len(long_times),
            "true_best": {"layout": true_best, "tokens_per_s": true_tps[true_best],
                          "tokens_per_s_interval": [tokens / best_iv.hi, tokens / best_iv.lo],
                          "tied_in_long_measurement": true_tied},
            "successes": successes, "goal_met": met, "study_details": details, "regret_median": med_regret,
            "regret_max": max(regrets) if regrets else None, "studies": rows,
            "tau_median": statistics.median(taus) if taus else None, "tau_noise_floor_long_rounds": floor,
            "long": {k: {"tokens_per_s": true_tps[k], "peak_mem_bytes": peaks.get(k),
                         "rounds_tokens_per_s": [tokens / statistics.median(r) for r in long_times[k]]} for k in keys}}

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 studies of 1 trial, 2 short long-rounds")
    p.add_argument("--space", type=Path, default=QUICKSTART, help="the space file (default: the quick start's)")
    p.add_argument("--studies", type=int, default=STUDIES, help=f"how many studies (default {STUDIES})")
    args = p.parse_args(argv)
    if args.studies < 2:
        p.error("--studies must be at least 2")
    space_path = args.space.resolve()

    import yaml

    from autotune.predict.candidates import screen
    from autotune.space.spec import spec_from_data

    preload_launch()
    started = time.monotonic()
    data = yaml.safe_load(space_path.read_text())
    spec = spec_from_data(data)
    studies_n = 2 if args.quick else args.studies
    rounds_n = 2 if args.quick else LONG_ROUNDS
    warmup, measure = (1, 3) if args.quick else (LONG_WARMUP, LONG_MEASURE)
    fitting = sorted((c.layout for c in screen(spec).candidates if c.fits), key=lambda l: l.key)
    say(f"{space_path.name}: {len(fitting)} fitting layouts; {studies_n} studies (seeds 0-{studies_n - 1}); "
        f"long: {rounds_n} rounds of {warmup} warm-up + {measure} measured steps per layout")

    long_times: dict[str, list[list[float]]] = {}
    peaks: dict[str, float] = {}
    studies: list[dict[str, Any]] = []
    seconds = {"long": 0.0, "studies": 0.0}

    def long_round(k: int, layouts) -> None:
        order = list(layouts)
        random.Random(1000 + k).shuffle(order)
        t0 = time.monotonic()
        for layout in order:
            times, peak = _long_run(spec, layout, warmup, measure)
            long_times.setdefault(layout.key, []).append(times)
            if peak is not None:
                peaks[layout.key] = max(peaks.get(layout.key, 0.0), float(peak))
        seconds["long"] += time.monotonic() - t0
        say(f"  long round {k + 1}: {len(order)} layouts in {time.monotonic() - t0:.0f} s")

    def run_studies(seeds, work: Path) -> None:
        for seed in seeds:
            t0 = time.monotonic()
            s = _study(data, seed, work, args.quick)
            seconds["studies"] += time.monotonic() - t0
            studies.append(s)
            say(f"  study seed {seed}: pick {s['pick']} ({s['pick_tokens_per_s']:.0f} tok/s), "
                f"{len(s['tied'])} tied, {s['launches']} launches ({s['remeasures']} re-measures), {s['wall_s']:.0f} s")

    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        work = Path(tmp)
        if args.quick:  # the script's path only: long rounds over what the studies measured
            run_studies(range(studies_n), work)
            keys = {k for s in studies for k in s["measured"]} | {s["pick"] for s in studies}
            chosen = [l for l in fitting if l.key in keys]
            for k in range(rounds_n):
                long_round(k, chosen)
        else:
            half = studies_n // 2
            long_round(0, fitting)
            run_studies(range(half), work)
            long_round(1, fitting)
            run_studies(range(half, studies_n), work)
            for k in range(2, rounds_n):
                long_round(k, fitting)

    out = analyse(spec, long_times, peaks, studies, measure, args.quick)
    out.update({"benchmark": "fidelity", "quick": args.quick, "machine": machine(),
                "space": str(space_path.relative_to(ROOT)) if space_path.is_relative_to(ROOT) else str(space_path),
                "settings": {"studies": studies_n, "seeds": [s["seed"] for s in studies], "long_rounds": rounds_n,
                             "long_warmup_steps": warmup, "long_measure_steps": measure,
                             "study_budget": dict(data["budget"]), "goal_regret": GOAL_REGRET,
                             "goal_studies": goal_studies(studies_n), "goal_of": studies_n},
                "seconds": {k: round(v, 1) for k, v in seconds.items()},
                "runtime_s": round(time.monotonic() - started, 1)})
    rows = out.pop("rows")
    suffix = "_quick" if args.quick else ""
    if space_path != QUICKSTART.resolve():
        suffix = f"_{space_path.stem.removeprefix('fidelity_')}{suffix}"
    write_csv(RESULTS / f"fidelity{suffix}.csv", rows)
    write_json(RESULTS / f"fidelity{suffix}.json", out)
    say(f"wrote {RESULTS / f'fidelity{suffix}.csv'} and .json ({out['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
