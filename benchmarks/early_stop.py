"""Early stopping on the quick-start grid: the same study with and without `budget.early_stop`,
its picks judged by long, repeated, interleaved measurement rather than by the studies' own runs.

Settings, fixed before any run of this version (2026-12-08; the earlier version compared the two
studies' own pooled figures, which on 2 cores are mostly run-to-run noise):

* pairs: 3, seeds 0, 1, 2; each pair is the quick-start space (search_spaces/quickstart-cpu.yaml)
  unchanged but for the early-stop flag, the seed and a fresh study name, each study on its own
  Ray as a user's run is; the order inside a pair alternates (without first, then with first,
  then without first), so that the machine's drift hits both sides alike;
* judge: every layout that any of the 6 studies picked, run alone on local gloo ranks (as the
  fidelity benchmark measures its true best: 2 warm-up + 10 measured steps), in 3 rounds, each
  round in its own shuffled order; a pick's true throughput is the global batch x seq_len over
  the median step time of its runs (two-stage bootstrap median, autotune.search.stats);
* figures: measured steps and wall time over all pairs, with against without (ratio); per pair,
  the true throughput of each study's pick and their ratio (with / without);
* goals: measured steps saved (ratio < 1), and the best found no worse: the median over the pairs
  of (true throughput of the early-stopping study's pick / the other's) >= 0.97, the fidelity
  benchmark's 3% regret tolerance. The run exits 1 when a goal is missed.

    python -m benchmarks.early_stop            # the figure, ~10 min on 2 cores
    python -m benchmarks.early_stop --quick    # 1 pair of 2 trials on 2 ranks, a short judge: checks the script

Results: benchmarks/results/early_stop.{csv,json} (`early_stop_quick.*` with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, preload_launch, say, write_csv, write_json  # noqa: E402

QUICKSTART = ROOT / "search_spaces" / "quickstart-cpu.yaml"
PAIRS = 3
JUDGE_ROUNDS, JUDGE_WARMUP, JUDGE_MEASURE = 3, 2, 10  # as benchmarks.fidelity measures its true best
NO_WORSE = 0.97  # true throughput ratio, with / without: the fidelity benchmark's 3% regret tolerance


def space(early_stop: bool, seed: int, quick: bool, tmp: Path) -> dict[str, Any]:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["budget"]["early_stop"] = early_stop
    name = f"early-stop-{'with' if early_stop else 'without'}-{seed}"
    data["study"] = {**data.get("study", {}), "name": name, "seed": seed, "output_dir": str(tmp / "runs")}
    data["tracking"] = {"experiment": "benchmark-early-stop", "uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    if quick:  # a few short trials on 2 ranks: checks the script, not the figure
        data["cluster"].update(ranks=2, probe=False)  # the probe has its own check (benchmarks.cluster_probe)
        data["search"].update(world_sizes=[1, 2], ep=[1, 2], tp=[1], pp=[1], seq_len=32)
        data["budget"].update(trials=2, measure_steps=3, remeasure_share=0)
    return data


def run(early_stop: bool, seed: int, quick: bool, tmp: Path) -> dict[str, Any]:
    from autotune.schema import Status
    from autotune.space.spec import spec_from_data
    from autotune.study.runner import RunOptions, run_study

    data = space(early_stop, seed, quick, tmp)
    started = time.monotonic()
    result = run_study(spec_from_data(data), yaml.safe_dump(data), RunOptions(live=False, report=False))
    wall = time.monotonic() - started
    launched = [t for t in result.trials if t.status not in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID)]
    best = result.best()
    return {"seed": seed, "early_stop": early_stop, "wall_s": round(wall, 1), "trials": len(launched),
            "ok": sum(t.ok for t in launched), "early_stopped": sum(t.status == Status.EARLY_STOPPED for t in launched),
            "failed": sum(t.status not in (Status.OK, Status.EARLY_STOPPED) for t in launched),
            "measured_steps": sum(len(t.step_times) for t in launched),
            "full_steps": len(launched) * data["budget"]["measure_steps"],
            "best": best.layout.key if best else None,
            "best_study_tokens_per_s": round(best.tokens_per_s, 1) if best else None,
            "_layout": best.layout if best else None}


def judge(layouts: list, quick: bool, tmp: Path) -> dict[str, float]:
    """Each pick's true throughput: long runs alone, in rounds of shuffled order."""
    from autotune.search.stats import runs_interval
    from autotune.space.spec import spec_from_data
    from benchmarks.fidelity import _long_run

    preload_launch()
    spec = spec_from_data(space(False, 0, quick, tmp))
    rounds, warmup, measure = (1, 1, 2) if quick else (JUDGE_ROUNDS, JUDGE_WARMUP, JUDGE_MEASURE)
    times: dict[str, list[list[float]]] = {}
    for k in range(rounds):
        order = list(layouts)
        random.Random(2000 + k).shuffle(order)
        for layout in order:
            steps, _ = _long_run(spec, layout, warmup, measure)
            times.setdefault(layout.key, []).append(steps)
        say(f"  judge round {k + 1}: {len(order)} picks")
    tokens = spec.search.global_batch_size * spec.search.seq_len
    return {key: tokens / runs_interval(runs).median for key, runs in times.items()}


@contextlib.contextmanager
def _one_ray(quick: bool, tmp: Path):
    """--quick: both studies on one local Ray (started as a study starts its own), so the check
    pays for one start, not two; the full run gives each study its own, as a user's runs have."""
    if not quick:
        yield
        return
    import ray

    from autotune.space.spec import spec_from_data
    from autotune.study.connect import ray_init

    ray_init(spec_from_data(space(False, 0, True, tmp)), None)
    try:
        yield
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.early_stop", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 pair of 2 trials on 2 ranks: checks the script works")
    args = p.parse_args(argv)
    pairs = 1 if args.quick else PAIRS

    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-early-stop-") as d:
        tmp = Path(d)
        with _one_ray(args.quick, tmp):
            for seed in range(pairs):
                for early_stop in ((False, True) if seed % 2 == 0 else (True, False)):
                    r = run(early_stop, seed, args.quick, tmp)
                    rows.append(r)
                    say(f"seed {seed} {'with' if early_stop else 'without'} early stopping: {r['trials']} trials "
                        f"({r['early_stopped']} stopped early), {r['measured_steps']} measured steps, {r['wall_s']} s; "
                        f"pick {r['best']} at {r['best_study_tokens_per_s']} tokens/s (its study's figure)")
        picks = list({r["best"]: r["_layout"] for r in rows if r["_layout"] is not None}.values())
        say(f"judging {len(picks)} distinct picks by long interleaved runs")
        true = judge(picks, args.quick, tmp)
    for r in rows:
        r.pop("_layout")
        r["best_true_tokens_per_s"] = round(true[r["best"]], 1) if r["best"] in true else None

    ratios = []
    for seed in range(pairs):
        base = next(r for r in rows if r["seed"] == seed and not r["early_stop"])
        stop = next(r for r in rows if r["seed"] == seed and r["early_stop"])
        if base["best_true_tokens_per_s"] and stop["best_true_tokens_per_s"]:
            ratios.append(stop["best_true_tokens_per_s"] / base["best_true_tokens_per_s"])
            say(f"seed {seed}: true throughput of the picks, with {stop['best_true_tokens_per_s']:,.0f} / without "
                f"{base['best_true_tokens_per_s']:,.0f} = {ratios[-1]:.3f}")
    steps = {e: sum(r["measured_steps"] for r in rows if r["early_stop"] == e) for e in (False, True)}
    wall = {e: sum(r["wall_s"] for r in rows if r["early_stop"] == e) for e in (False, True)}
    steps_ratio = steps[True] / steps[False] if steps[False] else float("nan")
    wall_ratio = wall[True] / wall[False] if wall[False] else float("nan")
    true_ratio = statistics.median(ratios) if ratios else None
    saved, no_worse = steps_ratio < 1, true_ratio is not None and true_ratio >= NO_WORSE
    met = saved and no_worse
    quick_note = "  (--quick: meaningless)" if args.quick else ""
    say(f"early stopping over {pairs} pairs: measured steps {steps[False]} -> {steps[True]} (ratio {steps_ratio:.2f}), "
        f"wall time {wall[False]:.0f} s -> {wall[True]:.0f} s (ratio {wall_ratio:.2f}), "
        f"{sum(r['early_stopped'] for r in rows)} trials stopped; picks' true throughput with / without, median over "
        f"the pairs: {true_ratio if true_ratio is not None else float('nan'):.3f} (goal >= {NO_WORSE}); goals "
        f"{'met' if met else 'NOT met'}{quick_note}")
    suffix = "_quick" if args.quick else ""
    data = {"benchmark": "early_stop", "quick": args.quick, "machine": machine(),
            "space": str(QUICKSTART.relative_to(ROOT)), "runs": rows,
            "settings": {"pairs": pairs, "seeds": list(range(pairs)),
                         "judge": {"rounds": JUDGE_ROUNDS, "warmup_steps": JUDGE_WARMUP,
                                   "measure_steps": JUDGE_MEASURE} if not args.quick else "quick",
                         "no_worse_ratio": NO_WORSE},
            "steps_saved": steps[False] - steps[True], "steps_ratio": round(steps_ratio, 3),
            "wall_s_saved": round(wall[False] - wall[True], 1), "wall_ratio": round(wall_ratio, 3),
            "trials_stopped": sum(r["early_stopped"] for r in rows), "true_tokens_per_s": true,
            "pair_true_ratios": [round(x, 4) for x in ratios],
            "true_ratio_median": round(true_ratio, 4) if true_ratio is not None else None,
            "best_no_worse": no_worse, "goals_met": met, "runtime_s": round(time.monotonic() - started, 1)}
    write_csv(RESULTS / f"early_stop{suffix}.csv", rows)
    write_json(RESULTS / f"early_stop{suffix}.json", json.loads(json.dumps(data, default=str)))
    say(f"wrote {RESULTS / f'early_stop{suffix}.csv'} and .json ({data['runtime_s']:.0f} s)")
    return 0 if met or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
