"""Early stopping on the quick-start grid: the same study with and without `budget.early_stop`.

Both runs use the quick-start space (search_spaces/quickstart-cpu.yaml) unchanged but for the
early-stop flag and a fresh study name, one after the other on this machine (baseline first).
Figures:

* measured steps run, trials stopped early, and the study's wall time in each run: the steps
  and seconds early stopping saved (ratio = with / without);
* the best layout each run found, with its tokens/s and the 90% interval on its median step
  time (autotune.search.stats): "no worse" when the early-stopping run's best is faster, or their
  intervals overlap (tied within noise).

    python -m benchmarks.early_stop            # the quick-start budget (14 trials), ~2 x 2 min
    python -m benchmarks.early_stop --quick    # 2 ranks, 2 trials, one Ray for both, no cluster probe: checks the script

Results: benchmarks/results/early_stop.{csv,json} (`early_stop_quick.*` with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, say, write_csv, write_json  # noqa: E402

QUICKSTART = ROOT / "search_spaces" / "quickstart-cpu.yaml"


def space(early_stop: bool, quick: bool, tmp: Path) -> dict[str, Any]:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["budget"]["early_stop"] = early_stop
    name = "with" if early_stop else "without"
    data["study"] = {**data.get("study", {}), "name": f"early-stop-{name}", "output_dir": str(tmp / "runs")}
    data["tracking"] = {"experiment": "benchmark-early-stop", "uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    if quick:  # a few short trials on 2 ranks: checks the script, not the figure
        data["cluster"].update(ranks=2, probe=False)  # the probe has its own check (benchmarks.cluster_probe)
        data["search"].update(world_sizes=[1, 2], ep=[1, 2], tp=[1], pp=[1], seq_len=32)
        data["budget"].update(trials=2, measure_steps=3, remeasure_share=0)
    return data


def run(early_stop: bool, quick: bool, tmp: Path) -> dict[str, Any]:
    from autotune.schema import Status
    from autotune.search.stats import step_time_interval
    from autotune.space.spec import spec_from_data
    from autotune.study.runner import RunOptions, run_study

    data = space(early_stop, quick, tmp)
    started = time.monotonic()
    result = run_study(spec_from_data(data), yaml.safe_dump(data), RunOptions(live=False, report=False))
    wall = time.monotonic() - started
    launched = [t for t in result.trials if t.status not in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID)]
    best = result.best()
    iv = step_time_interval(best.step_times) if best is not None else None
    return {"early_stop": early_stop, "wall_s": round(wall, 1), "trials": len(launched),
            "ok": sum(t.ok for t in launched), "early_stopped": sum(t.status == Status.EARLY_STOPPED for t in launched),
            "failed": sum(t.status not in (Status.OK, Status.EARLY_STOPPED) for t in launched),
            "measured_steps": sum(len(t.step_times) for t in launched),
            "full_steps": len(launched) * data["budget"]["measure_steps"],
            "best": best.layout.key if best else None, "best_tokens_per_s": round(best.tokens_per_s, 1) if best else None,
            "best_step_time_s": iv.median if iv else None, "best_step_time_lo_s": iv.lo if iv and iv.known else None,
            "best_step_time_hi_s": iv.hi if iv and iv.known else None, "_interval": iv}


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

    ray_init(spec_from_data(space(False, True, tmp)), None)
    try:
        yield
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.early_stop", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 ranks, 2 trials: checks the script works")
    args = p.parse_args(argv)
    from autotune.search.stats import separated

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-early-stop-") as d, _one_ray(args.quick, Path(d)):
        tmp = Path(d)
        say("baseline: the quick-start study without early stopping")
        base = run(False, args.quick, tmp)
        say(f"  {base['trials']} trials, {base['measured_steps']} measured steps, {base['wall_s']} s; best "
            f"{base['best']} at {base['best_tokens_per_s']} tokens/s")
        say("the same study with budget.early_stop: true")
        stop = run(True, args.quick, tmp)
        say(f"  {stop['trials']} trials ({stop['early_stopped']} stopped early), {stop['measured_steps']} measured "
            f"steps, {stop['wall_s']} s; best {stop['best']} at {stop['best_tokens_per_s']} tokens/s")
    a, b = base.pop("_interval"), stop.pop("_interval")
    if a is None or b is None:
        no_worse = b is not None or a is None
    else:
        no_worse = b.median <= a.median or not separated(a, b)
    steps_ratio = stop["measured_steps"] / base["measured_steps"] if base["measured_steps"] else float("nan")
    wall_ratio = stop["wall_s"] / base["wall_s"] if base["wall_s"] else float("nan")
    say(f"early stopping: {base['measured_steps'] - stop['measured_steps']} measured steps saved "
        f"(ratio {steps_ratio:.2f} of the baseline's), {base['wall_s'] - stop['wall_s']:+.1f} s wall time saved "
        f"(ratio {wall_ratio:.2f}); {stop['early_stopped']} of {stop['trials']} trials stopped; best found "
        f"{'no worse' if no_worse else 'WORSE'} than without ({stop['best_tokens_per_s']} vs "
        f"{base['best_tokens_per_s']} tokens/s)" + ("  (--quick: meaningless)" if args.quick else ""))
    suffix = "_quick" if args.quick else ""
    rows = [base, stop]
    data = {"benchmark": "early_stop", "quick": args.quick, "machine": machine(),
            "space": str(QUICKSTART.relative_to(ROOT)), "runs": rows,
            "steps_saved": base["measured_steps"] - stop["measured_steps"], "steps_ratio": round(steps_ratio, 3),
            "wall_s_saved": round(base["wall_s"] - stop["wall_s"], 1), "wall_ratio": round(wall_ratio, 3),
            "trials_stopped": stop["early_stopped"], "best_no_worse": no_worse,
            "runtime_s": round(time.monotonic() - started, 1)}
    write_csv(RESULTS / f"early_stop{suffix}.csv", rows)
    write_json(RESULTS / f"early_stop{suffix}.json", json.loads(json.dumps(data, default=str)))
    say(f"wrote {RESULTS / f'early_stop{suffix}.csv'} and .json ({data['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
