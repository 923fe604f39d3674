"""Warm workers: the quick-start study with Ray's default idle-worker limit against the study's own.

Ray kills idle worker processes beyond a soft limit. Left at Ray's default (-1), the local Ray of
a study killed workers between trials, so a trial's ranks often started on a new worker that
imports torch before it can fork the rank (`autotune.study.connect.warm_workers`). This runs the same
study both ways, each in a fresh process with its own Ray, MLflow store and Optuna journal,
interleaved and in alternating order (default first in odd rounds, warm first in even ones) so
that machine drift hits both alike:

* default: `num_workers_soft_limit = -1`, Ray's default, as the study ran before;
* warm: the limit `autotune.study.connect.warm_workers` gives for the space (the study's behaviour now).

Figures per side: the median trial's wall time (`TrialRecord.duration_s`: placement group to
ranks reaped), the study's wall time (`run_study`, Ray start to report), and how many rank starts
found no warm worker (a worker pid not seen earlier in the same study). Settings fixed before
any run: `search_spaces/quickstart-cpu.yaml` with 8 trials, 2 rounds.
Goal: the median trial at least 1.5x faster with warm workers.

    python -m benchmarks.warm_workers            # 2 rounds of 8-trial studies (~8 min on 2 cores)
    python -m benchmarks.warm_workers --quick    # 1 round of 1-trial studies: checks the script works

Results: benchmarks/results/warm_workers.{csv,json} (`warm_workers_quick.*` with --quick).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (RESULTS, machine, median, say, study_in_fresh_process, write_csv,  # noqa: E402
                               write_json)

SPACE = ROOT / "search_spaces" / "quickstart-cpu.yaml"
GOAL_RATIO = 1.5
SIDES = ("default", "warm")


def one_study(side: str, trials: int, folder: Path, remeasure: bool = True) -> dict[str, Any]:
    """Run the quick-start study once in this process; `side` picks Ray's idle-worker limit."""
    import yaml

    import autotune.study.connect as connect_module
    from autotune.space.spec import spec_from_data
    from autotune.study.runner import RunOptions, run_study

    if side == "default":
        connect_module.warm_workers = lambda spec, num_cpus: -1  # Ray's own default (ray_init reads it here)
    data = yaml.safe_load(SPACE.read_text())
    data["budget"]["trials"] = trials
    if not remeasure:  # --quick: the script's path, without the end-of-study round
        data["budget"]["remeasure_share"] = 0
    data["tracking"]["uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    data["study"]["output_dir"] = str(folder / "runs")
    text = yaml.safe_dump(data)
    spec = spec_from_data(data)
    limit = connect_module.warm_workers(spec, 0)
    started = time.monotonic()
    result = run_study(spec, text, RunOptions(live=False))
    wall = time.monotonic() - started
    launched = [t for t in result.trials if t.searched]
    seen: set[int] = set()
    cold = 0
    for t in sorted(launched, key=lambda t: t.number):
        for r in t.ranks:
            pid = r.get("worker_pid")
            if pid is not None and pid not in seen:
                cold += 1
                seen.add(pid)
    durations = [t.duration_s for t in launched if t.duration_s is not None]
    return {"side": side, "soft_limit": limit, "study_wall_s": round(wall, 2), "trials": len(launched),
            "ok": sum(1 for t in launched if t.ok), "trial_median_s": round(median(durations), 3),
            "trial_durations_s": [round(d, 3) for d in durations],
            "rank_starts": sum(len(t.ranks) for t in launched), "cold_rank_starts": cold,
            "workers": len(seen)}


def _run_side(side: str, trials: int, quick: bool) -> dict[str, Any]:
    return study_in_fresh_process("benchmarks.warm_workers", ["--one", side, "--trials", str(trials),
                                                              *(["--quick"] if quick else [])],
                                  f"the {side} study", prefix=f"bench-warm-{side}-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.warm_workers", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 1-trial studies, no re-measuring")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each one study per side (default 2)")
    p.add_argument("--trials", type=int, default=8, help="trials per study (default 8)")
    p.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)  # one study in this process
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one_study(args.one, args.trials, Path(args.folder), remeasure=not args.quick)), flush=True)
        return 0
    rounds, trials = (1, 1) if args.quick else (args.rounds, args.trials)
    suffix = "_quick" if args.quick else ""
    started = time.monotonic()
    say(f"warm workers: {rounds} round(s) of the quick-start study with {trials} trials, Ray's default idle-worker "
        f"limit against the study's own")
    rows: list[dict[str, Any]] = []
    for i in range(rounds):
        for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
            row = {"round": i + 1, **_run_side(side, trials, args.quick)}
            rows.append(row)
            say(f"  round {row['round']} {side:<8} limit {row['soft_limit']:>3}  study {row['study_wall_s']:7.1f} s  "
                f"median trial {row['trial_median_s']:6.2f} s  ok {row['ok']}/{row['trials']}  "
                f"rank starts on a new worker {row['cold_rank_starts']}/{row['rank_starts']}")
    per = {}
    for side in SIDES:
        mine = [r for r in rows if r["side"] == side]
        per[side] = {"trial_median_s": median([d for r in mine for d in r["trial_durations_s"]]),
                     "study_wall_median_s": median([r["study_wall_s"] for r in mine]),
                     "cold_rank_starts": sum(r["cold_rank_starts"] for r in mine),
                     "rank_starts": sum(r["rank_starts"] for r in mine),
                     "ok": sum(r["ok"] for r in mine), "trials": sum(r["trials"] for r in mine)}
    ratio = per["default"]["trial_median_s"] / per["warm"]["trial_median_s"]
    study_ratio = per["default"]["study_wall_median_s"] / per["warm"]["study_wall_median_s"]
    all_ok = all(r["ok"] == r["trials"] for r in rows)
    say("")
    for side in SIDES:
        s = per[side]
        say(f"  {side:<8} median trial {s['trial_median_s']:6.2f} s  median study {s['study_wall_median_s']:7.1f} s  "
            f"rank starts on a new worker {s['cold_rank_starts']}/{s['rank_starts']}")
    say(f"ratio default/warm: median trial {ratio:.2f}x, study {study_ratio:.2f}x")
    met = ratio >= GOAL_RATIO
    say(f"goal: the median trial >= {GOAL_RATIO:g}x faster with warm workers: {'met' if met else 'NOT met'}"
        + ("  (--quick: too few trials for the figures to mean much)" if args.quick else ""))
    data = {"benchmark": "warm_workers", "quick": args.quick, "machine": machine(),
            "settings": {"space": str(SPACE.relative_to(ROOT)), "trials": trials, "rounds": rounds,
                         "order": "default first in odd rounds, warm first in even ones"},
            "sides": per, "ratio_trial_median": ratio, "ratio_study_wall": study_ratio,
            "goal": {"ratio_trial_median_min": GOAL_RATIO}, "goal_met": met, "all_trials_ok": all_ok,
            "runtime_s": round(time.monotonic() - started, 1), "studies": rows}
    write_csv(RESULTS / f"warm_workers{suffix}.csv", [{k: v for k, v in r.items() if k != "trial_durations_s"}
                                                      for r in rows])
    write_json(RESULTS / f"warm_workers{suffix}.json", data)
    say(f"wrote {RESULTS / f'warm_workers{suffix}.csv'} and .json ({data['runtime_s']:.0f} s)")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
