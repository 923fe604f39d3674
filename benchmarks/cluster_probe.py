"""What the cluster profile costs a study: the quick-start study with and without it.

At its start a study measures the cluster (`autotune/study/cluster_profile.py`): its ranks start
(the workers the trials then reuse) and time GEMMs and collectives. This runs the same study both
ways, each in a fresh process with its own Ray, MLflow store, Optuna journal and an empty
profile cache (so the probe really measures), interleaved and in alternating order (without
first in odd rounds, with first in even ones), so that machine drift hits both alike:

* without: `cluster.probe: false` (the device profile's figures, on CPU a matmul measurement on
  the driver, as studies ran before the probe);
* with: the probe, measured at the study's start.

Figures per side: the study's wall time (`run_study`, Ray start to report), the median trial's
wall time and, with the probe, its own wall and measuring time. Settings fixed before any run:
`search_spaces/quickstart-cpu.yaml` as it is (14 trials and the end-of-study re-measures), 2
rounds. There is no goal to meet: the figure is the probe's net cost on short CPU trials.

    python -m benchmarks.cluster_probe              # 2 rounds (~7 min on 2 cores)
    python -m benchmarks.cluster_probe --rounds 1   # one study per side

Results: benchmarks/results/cluster_probe.{csv,json}.
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
SIDES = ("without", "with")


def one_study(side: str, folder: Path) -> dict[str, Any]:
    """Run the quick-start study once in this process, with or without the cluster probe."""
    import yaml

    from autotune.space.spec import spec_from_data
    from autotune.study.runner import RunOptions, run_study

    data = yaml.safe_load(SPACE.read_text())
    data["cluster"]["probe"] = side == "with"
    data["tracking"]["uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    data["study"]["output_dir"] = str(folder / "runs")
    spec = spec_from_data(data)
    started = time.monotonic()
    result = run_study(spec, yaml.safe_dump(data), RunOptions(live=False))
    wall = time.monotonic() - started
    probe = result.cluster_probe or {}
    durations = [t.duration_s for t in result.trials if t.duration_s is not None]
    best = result.best()
    return {"side": side, "study_wall_s": round(wall, 2), "trials": len(durations),
            "ok": sum(1 for t in result.trials if t.ok), "trial_median_s": round(median(durations), 3),
            "trials_total_s": round(sum(durations), 2), "probe_wall_s": probe.get("wall_s"),
            "probe_measure_s": probe.get("measure_s"), "probe_error": probe.get("error"),
            "best": best.layout.key if best is not None else None}


def _run_side(side: str) -> dict[str, Any]:
    return study_in_fresh_process("benchmarks.cluster_probe", ["--one", side], f"the study {side} the probe",
                                  env={"AUTOTUNE_CACHE_DIR": "{folder}/cache"}, prefix=f"bench-probe-{side}-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster_probe", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds, each one study per side (default 2)")
    p.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)  # one study in this process
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one_study(args.one, Path(args.folder))), flush=True)
        return 0
    started = time.monotonic()
    say(f"cluster probe: {args.rounds} round(s) of the quick-start study without and with it")
    rows: list[dict[str, Any]] = []
    for i in range(args.rounds):
        for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
            row = {"round": i + 1, **_run_side(side)}
            rows.append(row)
            probe = (f"  probe {row['probe_wall_s']:.1f} s ({row['probe_measure_s']:.1f} s measuring)"
                     if row["probe_wall_s"] else "")
            say(f"  round {row['round']} {side:<8} study {row['study_wall_s']:7.1f} s  median trial "
                f"{row['trial_median_s']:6.2f} s  trials {row['trials_total_s']:6.1f} s  ok {row['ok']}/{row['trials']}"
                + probe)
    per = {side: {"study_wall_median_s": median([r["study_wall_s"] for r in rows if r["side"] == side]),
                  "trial_median_s": median([r["trial_median_s"] for r in rows if r["side"] == side]),
                  "trials_total_median_s": median([r["trials_total_s"] for r in rows if r["side"] == side])}
           for side in SIDES}
    probes = [r for r in rows if r["side"] == "with"]
    per["with"]["probe_wall_median_s"] = median([r["probe_wall_s"] or 0.0 for r in probes])
    per["with"]["probe_measure_median_s"] = median([r["probe_measure_s"] or 0.0 for r in probes])
    net = per["with"]["study_wall_median_s"] - per["without"]["study_wall_median_s"]
    share = per["with"]["probe_wall_median_s"] / per["with"]["trials_total_median_s"]
    say("")
    say(f"median study: without {per['without']['study_wall_median_s']:.1f} s, with {per['with']['study_wall_median_s']:.1f}"
        f" s (net {net:+.1f} s, ratio {per['with']['study_wall_median_s'] / per['without']['study_wall_median_s']:.2f}x)")
    say(f"probe: {per['with']['probe_wall_median_s']:.1f} s in all, {per['with']['probe_measure_median_s']:.1f} s "
        f"measuring; {share:.1%} of the trials' summed time")
    errors = [r["probe_error"] for r in probes if r["probe_error"]]
    data = {"benchmark": "cluster_probe", "machine": machine(),
            "settings": {"space": str(SPACE.relative_to(ROOT)), "rounds": args.rounds,
                         "order": "without first in odd rounds, with first in even ones", "cache": "empty per study"},
            "sides": per, "net_study_s": net, "probe_share_of_trials": share, "probe_errors": errors,
            "runtime_s": round(time.monotonic() - started, 1), "studies": rows}
    write_csv(RESULTS / "cluster_probe.csv", rows)
    write_json(RESULTS / "cluster_probe.json", data)
    say(f"wrote {RESULTS / 'cluster_probe.csv'} and .json ({data['runtime_s']:.0f} s)")
    return 1 if errors or not all(r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
