"""Per-trial overhead: autotune's trial executor against a fresh Ray Train TorchTrainer per trial.

Both paths run the same tiny MoE layouts (alternating world size 1 and 2, one warm-up step and a
few measured steps) as Ray Tune trials, one at a time, with `reuse_actors=True`:

* autotune: `tune.with_resources(autotune.trials.tune_trial.tune_trial, COORDINATOR)`, the trainable and the
  coordinator resources the study uses (`autotune.study.runner.COORDINATOR_RESOURCES`, else
  `{"CPU": 0.01}`): a thin coordinator reserves a placement group and runs each rank as a Ray task
  on worker processes that stay warm across trials;
* baseline: each Tune trial builds a `ray.train.torch.TorchTrainer` (Ray Train V2, the default in
  Ray 2.60) with `ScalingConfig(num_workers=world, use_gpu=False, resources_per_worker={"CPU": 1})`;
  its train loop calls `trainables.moe.train.iter_run` on the gloo process group Ray Train set up
  and reports through `ray.tune.integration.ray_train.TuneReportCallback`.

Trials are handed to `tune.Tuner` by a Searcher that returns a fixed list of configs (the Optuna
searcher of a study plays no part in the overhead). A trial's wall time is measured in the driver
from the moment the previous trial completed (or `Tuner.fit` started) to its own completion, so
Tune's scheduling gaps and the first trial's start-up count. Overhead = trial wall time minus
the time of its measured steps (the warm-up and memory-probe steps count as overhead on both sides).

Goal: autotune's median overhead <= 3 s per trial and >= 8x below the baseline's.

    python -m benchmarks.trial_overhead            # 8 autotune trials, 4 baseline trials (~3 min)
    python -m benchmarks.trial_overhead --quick    # 2 + 1 trials: checks the script works (~1 min)

The baseline runs fewer trials than autotune (each costs ~25 s here) to stay well inside the
15-minute limit on a 2-core machine. Results: benchmarks/results/trial_overhead.{csv,json}
(`trial_overhead_quick.*` with --quick). Timing figures are reported, not asserted: the
machine is shared and its load shows in them (the JSON records the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from benchmarks.common import RESULTS, machine, mean, median, say, write_csv, write_json  # noqa: E402
from trainables.moe.run_config import RunConfig  # noqa: E402

GOAL_OVERHEAD_S = 3.0
GOAL_RATIO = 8.0
NUM_CPUS = 8


def run_configs(n: int, steps: int) -> list[RunConfig]:
    """n tiny runs alternating world size 1 (EP1) and 2 (EP2)."""
    out = []
    for i in range(n):
        ep = 1 if i % 2 == 0 else 2
        out.append(RunConfig(model="tiny", ep=ep, micro_batch_size=8, global_batch_size=16, seq_len=64,
                             precision="fp32", recompute="none", steps=steps, warmup_steps=1, seed=i,
                             device="cpu", timeout_s=300))
    return out


# ------------------------------------------------------------------------------------------------
# The baseline: one TorchTrainer per Tune trial


def _baseline_train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker, in the process group TorchTrainer initialised."""
    import ray.train
    import torch

    from trainables.moe.train import RankResult, iter_run

    torch.set_num_threads(1)
    for item in iter_run(config["run"]):
        if isinstance(item, RankResult):
            s = item.summary or {}
            ray.train.report({"tokens_per_s": float(s.get("tokens_per_s", 0.0)),
                              "measured_s": float(sum(s.get("step_times_s", []))),
                              "status": "ok", "world_size": int(config["run"].dims.world_size)})


def torchtrainer_trial(config: dict[str, Any]) -> None:
    """A Tune function trainable that launches a fresh TorchTrainer, the usual Ray Tune + Train pattern."""
    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg: RunConfig = config["run"]
    trainer = TorchTrainer(
        _baseline_train_loop,
        train_loop_config={"run": cfg},
        scaling_config=ScalingConfig(num_workers=cfg.dims.world_size, use_gpu=False,
                                     resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"baseline-{config['number']}", storage_path=config["storage"],
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


# ------------------------------------------------------------------------------------------------
# Driving Tune


def _searcher(configs: list[dict[str, Any]]):
    from ray.tune.search import Searcher

    class FixedConfigs(Searcher):
        """Hands Tune a fixed list of trial configs, in order."""

        def __init__(self, items: list[dict[str, Any]]) -> None:
            super().__init__(metric="tokens_per_s", mode="max")
            self.items = list(items)

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            return self.items.pop(0) if self.items else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            pass

    return FixedConfigs(configs)


def _timer():
    from ray.tune import Callback

    class TrialTimer(Callback):
        """Driver-side timestamps of each trial's start and completion, and its last result."""

        def __init__(self) -> None:
            self.events: dict[str, dict[str, Any]] = {}

        def _e(self, trial) -> dict[str, Any]:
            return self.events.setdefault(trial.trial_id, {"number": trial.config.get("number")})

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self._e(trial)["start"] = time.monotonic()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self._e(trial)["last"] = dict(result)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._e(trial)["end"] = time.monotonic()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            e = self._e(trial)
            e["end"], e["error"] = time.monotonic(), True

    return TrialTimer()


def _measured_s(last: dict[str, Any]) -> tuple[float, str, float, float | None]:
    """(seconds of measured steps, status, tokens/s, seconds inside run_trial) from a trial's last result."""
    if "outcome" in last:  # autotune's final report carries the whole outcome as JSON
        outcome = json.loads(last["outcome"])
        summary = outcome.get("summary") or {}
        return (float(sum(summary.get("step_times_s", []))), outcome["status"], float(summary.get("tokens_per_s", 0)),
                outcome.get("duration_s"))
    return float(last.get("measured_s", 0.0)), str(last.get("status", "crashed")), float(last.get("tokens_per_s", 0)), None


def coordinator_resources() -> dict[str, float]:
    """What a study gives each trial's coordinator."""
    import autotune.study.runner

    return dict(getattr(autotune.study.runner, "COORDINATOR_RESOURCES", {"CPU": 0.01}))


def run_path(name: str, trainable, configs: list[dict[str, Any]], storage: str) -> tuple[list[dict[str, Any]], float]:
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    timer = _timer()
    tuner = tune.Tuner(
        tune.with_resources(trainable, coordinator_resources()),
        tune_config=tune.TuneConfig(search_alg=_searcher(configs), num_samples=len(configs),
                                    max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[timer, JsonLoggerCallback()], verbose=0),
    )
    t0 = time.monotonic()
    tuner.fit()
    fit_s = time.monotonic() - t0
    rows, previous = [], t0
    for ev in sorted(timer.events.values(), key=lambda e: e.get("end", float("inf"))):
        end = ev.get("end", time.monotonic())
        measured, status, tps, executor_s = _measured_s(ev.get("last", {}))
        if ev.get("error"):
            status = "crashed"
        wall = end - previous
        rows.append({"path": name, "trial": ev["number"], "world_size": configs[ev["number"]]["run"].dims.world_size,
                     "status": status, "wall_s": round(wall, 3),
                     "start_to_end_s": round(end - ev.get("start", previous), 3),
                     "measured_steps_s": round(measured, 4), "overhead_s": round(wall - measured, 3),
                     "run_trial_s": round(executor_s, 3) if executor_s is not None else "",
                     "tokens_per_s": round(tps, 1)})
        previous = end
    return rows, fit_s


def summarize(rows: list[dict[str, Any]], fit_s: float) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    over = [r["overhead_s"] for r in ok]
    return {"trials": len(rows), "ok": len(ok), "overhead_median_s": median(over), "overhead_mean_s": mean(over),
            "overhead_min_s": min(over, default=float("nan")), "overhead_max_s": max(over, default=float("nan")),
            "wall_median_s": median([r["wall_s"] for r in ok]),
            "measured_steps_median_s": median([r["measured_steps_s"] for r in ok]),
            "run_trial_median_s": median([r["run_trial_s"] for r in ok if r["run_trial_s"] != ""]),
            "tuner_fit_s": round(fit_s, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trial_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 autotune trials and 1 baseline trial")
    p.add_argument("--trials", type=int, default=8, help="autotune trials (default 8)")
    p.add_argument("--baseline-trials", type=int, default=4, help="TorchTrainer trials (default 4)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per trial (default 3)")
    args = p.parse_args(argv)
    n_auto, n_base = (2, 1) if args.quick else (args.trials, args.baseline_trials)
    suffix = "_quick" if args.quick else ""

    import ray

    from autotune.study.connect import WORKER_NICENESS
    from autotune.trials.tune_trial import tune_trial

    started = time.monotonic()
    # Workers (so both paths' ranks) at the priority a study gives its own: at Ray's nice 15 both
    # paths' ranks yield to any other process on the machine.
    ray.init(num_cpus=NUM_CPUS, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _system_config={"worker_niceness": WORKER_NICENESS})
    try:
        with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
            auto_cfgs = [{"number": i, "run": cfg, "bundle": {"CPU": 1.0}, "strategy": "PACK", "timeout_s": 300,
                          "placement_wait_s": 300} for i, cfg in enumerate(run_configs(n_auto, args.steps))]
            say(f"autotune executor: {n_auto} trials (world 1 and 2 alternating, {args.steps} measured steps)")
            auto_rows, auto_fit = run_path("autotune", tune_trial, auto_cfgs, tmp)
            base_cfgs = [{"number": i, "run": cfg, "storage": tmp} for i, cfg in enumerate(run_configs(n_base, args.steps))]
            say(f"baseline, a TorchTrainer per trial: {n_base} trials")
            base_rows, base_fit = run_path("torchtrainer", torchtrainer_trial, base_cfgs, tmp)
    finally:
        ray.shutdown()

    rows = auto_rows + base_rows
    for r in rows:
        say(f"  {r['path']:<12} trial {r['trial']} world {r['world_size']} {r['status']:<7} wall {r['wall_s']:7.2f} s  "
            f"measured steps {r['measured_steps_s']:6.2f} s  overhead {r['overhead_s']:7.2f} s")
    auto, base = summarize(auto_rows, auto_fit), summarize(base_rows, base_fit)
    ratio_median = base["overhead_median_s"] / auto["overhead_median_s"] if auto["overhead_median_s"] > 0 else float("inf")
    ratio_mean = base["overhead_mean_s"] / auto["overhead_mean_s"] if auto["overhead_mean_s"] > 0 else float("inf")
    all_ok = auto["ok"] == n_auto and base["ok"] == n_base
    goals = {"autotune_overhead_median_le_3s": auto["overhead_median_s"] <= GOAL_OVERHEAD_S,
             "ratio_median_ge_8x": ratio_median >= GOAL_RATIO}
    say("")
    say(f"overhead per trial   median    mean    (min..max)")
    for name, s in (("autotune", auto), ("torchtrainer", base)):
        say(f"  {name:<14} {s['overhead_median_s']:7.2f} s {s['overhead_mean_s']:7.2f} s  "
            f"({s['overhead_min_s']:.2f}..{s['overhead_max_s']:.2f}) over {s['ok']}/{s['trials']} ok trials")
    say(f"  autotune: median {auto['run_trial_median_s']:.2f} s of a trial's wall time is inside run_trial "
        f"(placement group, rank processes, process group, model, steps, memory probe); the rest is Tune")
    say(f"ratio baseline/autotune: {ratio_median:.1f}x (median), {ratio_mean:.1f}x (mean)")
    say(f"goal: autotune <= {GOAL_OVERHEAD_S:g} s per trial: {'met' if goals['autotune_overhead_median_le_3s'] else 'NOT met'}; "
        f">= {GOAL_RATIO:g}x below the baseline: {'met' if goals['ratio_median_ge_8x'] else 'NOT met'}"
        + ("" if not args.quick else "  (--quick: too few trials for the figures to mean much)"))
    data = {"benchmark": "trial_overhead", "quick": args.quick, "machine": machine(),
            "settings": {"autotune_trials": n_auto, "baseline_trials": n_base, "measured_steps": args.steps,
                         "warmup_steps": 1, "model": "tiny", "micro_batch_size": 8, "global_batch_size": 16,
                         "seq_len": 64, "ray_num_cpus": NUM_CPUS, "coordinator_resources": coordinator_resources(), "max_concurrent_trials": 1, "reuse_actors": True},
            "autotune": auto, "torchtrainer": base, "ratio_median": ratio_median, "ratio_mean": ratio_mean,
            "goal": {"autotune_overhead_s_max": GOAL_OVERHEAD_S, "ratio_min": GOAL_RATIO}, "goals_met": goals,
            "all_trials_ok": all_ok, "runtime_s": round(time.monotonic() - started, 1), "trials": rows}
    write_csv(RESULTS / f"trial_overhead{suffix}.csv", rows)
    write_json(RESULTS / f"trial_overhead{suffix}.json", data)
    say(f"wrote {RESULTS / f'trial_overhead{suffix}.csv'} and .json ({data['runtime_s']:.0f} s)")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
