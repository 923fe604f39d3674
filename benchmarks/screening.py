"""Screening speed: `autotune validate` on a space of over 100,000 candidate layouts.

Figures, all measured in this run:

* `autotune validate benchmarks/spaces/screen_100k.yaml` as a user runs it: a fresh Python
  process, wall time from start to exit (imports, YAML, validation, screening, the table);
  best and median of several runs. Goal: under 1 s.
* `autotune.predict.candidates.screen(spec)` alone, in this process.
* Baseline: the same verdicts by `autotune.predict.candidates.judge(spec, layout)` one layout at a time,
  the straightforward path (the model rebuilt and every rule checked per candidate). The ratio
  baseline / screen says what screen's sharing buys. Both must give identical verdicts and
  identical memory predictions.

    python -m benchmarks.screening           # 5 CLI runs, 3 in-process runs of each
    python -m benchmarks.screening --quick   # 1 run of each on a 1/16 slice of the space

Results: benchmarks/results/screening.{csv,json} (`screening_quick.*` with --quick).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, SPACES, machine, say, write_csv, write_json  # noqa: E402

GOAL_S = 1.0
SPACE = SPACES / "screen_100k.yaml"


def _cli_seconds(space: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "autotune.cli", "validate", str(space)], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"autotune validate failed: {proc.stderr[-2000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one run of each on a slice of the space")
    args = ap.parse_args(argv)

    import yaml

    from autotune.predict.candidates import judge, layouts_of, screen
    from autotune.space.spec import load_spec, spec_from_data

    space = SPACE
    if args.quick:  # a slice: fewer micro-batch sizes and world sizes
        data = yaml.safe_load(SPACE.read_text())
        data["search"]["micro_batch_size"] = [1, 2]
        data["search"]["world_sizes"] = [8, 16]
        space = RESULTS / "screen_quick_space.yaml"
        RESULTS.mkdir(parents=True, exist_ok=True)
        space.write_text(yaml.safe_dump(data))
        spec = spec_from_data(data)
    else:
        spec = load_spec(space)
    n = len(layouts_of(spec))
    runs_cli, runs_inproc = (1, 1) if args.quick else (5, 3)
    say(f"space {space.name}: {n} candidate layouts")

    _cli_seconds(space)  # warm the page cache for the imports; not counted
    cli = [_cli_seconds(space) for _ in range(runs_cli)]
    say(f"autotune validate (fresh process): best {min(cli):.3f} s, median {statistics.median(cli):.3f} s")

    screen_s, baseline_s = [], []
    from autotune.predict.memory import clear_caches as clear_memory_caches
    from autotune.space.layout import clear_caches as clear_layout_caches

    def clear_caches() -> None:
        clear_memory_caches()
        clear_layout_caches()

    for _ in range(runs_inproc):  # each from a cold start, as in a fresh `autotune validate`
        clear_caches()
        t0 = time.perf_counter()
        sc = screen(spec)
        screen_s.append(time.perf_counter() - t0)
        clear_caches()
        t0 = time.perf_counter()
        one_by_one = [judge(spec, layout) for layout in layouts_of(spec)]
        baseline_s.append(time.perf_counter() - t0)
    same = [(c.layout, c.verdict, c.reason) for c in sc.candidates] == \
        [(c.layout, c.verdict, c.reason) for c in one_by_one]
    same_predictions = [c.prediction for c in sc.candidates] == [c.prediction for c in one_by_one]
    ratio = statistics.median(baseline_s) / statistics.median(screen_s)
    say(f"screen() in process: median {statistics.median(screen_s):.3f} s; one-by-one judge() baseline: "
        f"median {statistics.median(baseline_s):.3f} s; ratio {ratio:.1f}x; identical verdicts: {same}, "
        f"identical predictions: {same_predictions}")
    say(f"counts: {sc.counts}")
    met = min(cli) < GOAL_S
    say(f"goal: validate under {GOAL_S:.0f} s on {n} candidates: {'met' if met else 'NOT met'} "
        f"({min(cli):.3f} s best, {statistics.median(cli):.3f} s median)")

    name = "screening_quick" if args.quick else "screening"
    rows = [{"what": "validate_cli_s", "run": i, "seconds": round(s, 4)} for i, s in enumerate(cli)]
    rows += [{"what": "screen_s", "run": i, "seconds": round(s, 4)} for i, s in enumerate(screen_s)]
    rows += [{"what": "judge_one_by_one_s", "run": i, "seconds": round(s, 4)} for i, s in enumerate(baseline_s)]
    write_csv(RESULTS / f"{name}.csv", rows, ["what", "run", "seconds"])
    write_json(RESULTS / f"{name}.json", {
        "benchmark": "screening", "quick": args.quick, "space": str(space.relative_to(ROOT)), "candidates": n,
        "machine": machine(), "counts": sc.counts, "validate_cli_best_s": min(cli),
        "validate_cli_median_s": statistics.median(cli), "screen_median_s": statistics.median(screen_s),
        "judge_one_by_one_median_s": statistics.median(baseline_s), "ratio_baseline_over_screen": ratio,
        "identical_verdicts": same, "identical_predictions": same_predictions, "goal_s": GOAL_S, "goal_met": met})
    say(f"wrote {RESULTS / name}.csv and .json")
    return 0 if same and same_predictions else 1


if __name__ == "__main__":
    sys.exit(main())
