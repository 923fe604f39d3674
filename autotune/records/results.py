"""What a study produced: one record per trial, plain data for tracking and reports."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from autotune.search.stats import (PRIOR_RUN_DOF, Interval, RunSpread, prior_run_sd, rule_text, runs_interval,
                                   tied_with_best)
from autotune.space.layout import Layout
from autotune.space.spec import Spec
from autotune.trial_record import TIE_REMEASURE, TrialRecord




def _step_times(t: TrialRecord) -> list[float]:
    if t.step_times:
        return [float(x) for x in t.step_times]
    return [float(t.metrics["step_time_s"])] if "step_time_s" in t.metrics else []


def pool(runs: list[TrialRecord]) -> TrialRecord:
    """One layout's runs as one record: the latest, with its step-time median, interval, p90 and
    throughput taken over every run's measured steps (throughput scales as 1 / step time)."""
    latest = runs[-1]
    if len(runs) < 2:
        if "step_time_lo_s" in latest.metrics or len(latest.step_times) < 2:
            return latest
        # recorded before intervals were: computed from its steps as the recorder does
        return replace(latest, metrics={**latest.metrics, **runs_interval([_step_times(latest)]).as_metrics()})
    times = [x for r in runs for x in _step_times(r)]
    own = latest.metrics.get("step_time_s")
    iv = runs_interval([_step_times(r) for r in runs])
    if not own or not times or not iv.median > 0:
        return latest
    scale = own / iv.median
    metrics = dict(latest.metrics)
    for k in ("tokens_per_s", "samples_per_s", "mfu"):
        if k in metrics:
            metrics[k] = metrics[k] * scale
    metrics["step_time_s"] = iv.median
    metrics["step_time_p90_s"] = float(np.quantile(times, 0.9))
    metrics.pop("step_time_lo_s", None)
    metrics.pop("step_time_hi_s", None)
    metrics.update(iv.as_metrics())
    return replace(latest, metrics=metrics, step_times=tuple(times))


@dataclass(frozen=True)
class LeaderEvidence:
    """A study's step-time evidence per fitting layout key: the bootstrap interval over its runs,
    how many runs it pools, and the run-to-run spread pooled over the layouts run more than once."""

    intervals: dict[str, Interval]
    runs: dict[str, int]
    spread: RunSpread


@dataclass(frozen=True)
class StudyResult:
    name: str
    spec: Spec
    trials: tuple[TrialRecord, ...]
    machine: dict[str, Any] = field(default_factory=dict)  # what the trials ran on
    wall_s: float | None = None
    mlflow_parent_run_id: str | None = None
    tracking_error: str | None = None  # set when MLflow stopped taking records mid-study
    cluster_probe: dict[str, Any] | None = None  # what the cluster profile measured at the start

    def measurements(self) -> dict[str, list[TrialRecord]]:
        """Each layout's successful runs that count: those of the latest run of the study that
        measured it. Re-measures within one run of the study add up (the end-of-study rounds
        that separate tied leaders); a later run's re-measure replaces (drift)."""
        runs: dict[str, list[TrialRecord]] = {}
        for t in sorted(self.trials, key=lambda t: t.number):
            if t.ok:
                kept = runs.setdefault(t.layout.key, [])
                if kept and kept[-1].session != t.session:
                    kept.clear()
                kept.append(t)
        return runs

    def ok_trials(self) -> list[TrialRecord]:
        """Successful trials, one per layout: the latest, with the step-time figures of every
        run that counts (`measurements`) pooled into it."""
        return sorted((pool(runs) for runs in self.measurements().values()), key=lambda t: t.number)

    def fitting(self) -> list[TrialRecord]:
        """`ok_trials` whose measured memory (on CUDA the device's) stayed within the memory cap."""
        cap = self.spec.objective.memory_cap * self.spec.cluster.memory_bytes
        return [t for t in self.ok_trials() if (t.held_bytes or 0) <= cap]

    def best(self) -> TrialRecord | None:
        """The layout to deploy: the fastest trial that ran within the memory cap or, in a Pareto
        study (`objective.minimize`), the one `deploy_pick` chooses from the front."""
        if self.spec.objective.minimize:
            return self.deploy_pick().trial
        return max(self.fitting(), key=lambda t: t.tokens_per_s, default=None)

    def evidence(self) -> "LeaderEvidence":
        """What the tie rule weighs, from one pass over the fitting layouts' runs (`measurements`):
        each one's interval and run count, and the run-to-run spread they show together."""
        runs = self.measurements()
        steps = {t.layout.key: [_step_times(r) for r in runs[t.layout.key]] for t in self.fitting()}
        return LeaderEvidence(intervals={k: runs_interval(v) for k, v in steps.items()},
                              runs={k: len(v) for k, v in steps.items()}, spread=RunSpread.of(steps))

    def run_steps(self, key: str) -> list[list[float]]:
        """One layout's measured steps, run by run (the runs that count, `measurements`)."""
        return [_step_times(r) for r in self.measurements().get(key, [])]

    def shown_intervals(self, ev: "LeaderEvidence | None" = None) -> dict[str, Interval]:
        """Every measured layout's interval as the report shows it, wherever it shows it: over the
        layout's runs, widened to the run-to-run spread (the study's, pooled with the device's prior
        until the study has re-measured enough to know its own), so that it says where the
        layout's next run falls, not only where its measured steps fell."""
        ev = ev or self.evidence()
        shown = ev.spread.with_prior(prior_run_sd(self.spec.cluster.device))
        out = {}
        for key, runs in self.measurements().items():
            iv = ev.intervals.get(key) or runs_interval([_step_times(r) for r in runs])
            out[key] = shown.widen(iv, len(runs))
        return out

    def standing(self, ev: "LeaderEvidence | None" = None) -> dict[str, Any] | None:
        """The best layout, the layouts statistically tied with it (autotune.search.stats) and the rule
        (`ev`: the study's `evidence()`, where the caller has it already)."""
        ev = ev or self.evidence()
        intervals, spread, counts = ev.intervals, ev.spread, ev.runs
        key, tied = tied_with_best(intervals, spread, counts)
        if key is None:
            return None
        by_key = {t.layout.key: t for t in self.fitting()}
        prior_sd = prior_run_sd(self.spec.cluster.device)
        shown, widened = spread.with_prior(prior_sd), self.shown_intervals(ev)

        def entry(k: str) -> dict[str, Any]:
            iv = widened[k]
            return {"layout": k, "trial": by_key[k].number, "tokens_per_s": by_key[k].tokens_per_s,
                    "step_time_s": iv.median, "step_time_lo_s": iv.lo, "step_time_hi_s": iv.hi,
                    "steps": iv.n, "runs": counts[k]}

        return {"best": entry(key), "tied": [entry(k) for k in tied], "rule": rule_text(),
                "confidence": intervals[key].confidence,
                "run_spread": {"sd_log": spread.sd, "dof": spread.dof, "shown_sd_log": shown.sd,
                               "prior_sd_log": prior_sd,
                               "prior_dof": PRIOR_RUN_DOF},
                "remeasures": sum(1 for t in self.trials if t.remeasure_of is not None
                                  and t.reason.startswith(TIE_REMEASURE))}

    def deploy_pick(self) -> "DeployPick":
        """A Pareto study's deployment choice, by a stated rule: the fastest layout on the front
        whose peak (on CUDA the device's used memory, `held_bytes`) leaves `objective.deploy_headroom`
        of the rank memory free (and is within the memory cap). When none does, the front's layout with the most headroom within the cap,
        and the pick says the rule was not met."""
        rank = self.spec.cluster.memory_bytes
        h, cap = self.spec.objective.deploy_headroom, self.spec.objective.memory_cap * rank
        rule = (f"the fastest layout on the Pareto front (tokens/s vs peak memory) that leaves at least "
                f"{h:.0%} of the rank memory free (objective.deploy_headroom = {h:g}) and is within the "
                f"memory cap ({self.spec.objective.memory_cap:.0%})")
        within = [t for t in self.pareto() if (t.held_bytes or 0) <= cap]
        roomy = [t for t in within if rank - (t.held_bytes or 0) >= h * rank]
        if roomy:
            return DeployPick(max(roomy, key=lambda t: t.tokens_per_s), rule, True)
        fallback = min(within, key=lambda t: t.held_bytes or 0, default=None)
        return DeployPick(fallback, rule, False)

    def sessions(self) -> int:
        return 1 + max((t.session for t in self.trials), default=0)

    def changes(self) -> dict[str, Any] | None:
        """What the latest run of the study added or changed; None for a study run once."""
        last = self.sessions() - 1
        if last == 0:
            return None
        before = StudyResult(self.name, self.spec, tuple(t for t in self.trials if t.session < last))
        prev_best, best = before.best(), self.best()
        by_number = {t.number: t for t in self.trials}
        counted = {t.number: t for t in before.ok_trials()}  # a layout's earlier runs, pooled
        drift = []
        for t in self.trials:
            if (t.session == last and t.remeasure_of is not None and t.remeasure_of in by_number
                    and not t.reason.startswith(TIE_REMEASURE)):
                old = counted.get(t.remeasure_of, by_number[t.remeasure_of])
                drift.append({"layout": t.layout.key, "trial": t.number, "previous_trial": old.number,
                              "previous_tokens_per_s": old.tokens_per_s if old.ok else None,
                              "tokens_per_s": t.tokens_per_s if t.ok else None, "status": t.status.value,
                              "change": (t.tokens_per_s / old.tokens_per_s - 1)
                              if t.ok and old.ok and old.tokens_per_s else None})
        return {"session": last, "new_trials": sum(1 for t in self.trials if t.session == last),
                "previous_best": {"layout": prev_best.layout.key, "trial": prev_best.number,
                                  "tokens_per_s": prev_best.tokens_per_s} if prev_best else None,
                "best": {"layout": best.layout.key, "trial": best.number,
                         "tokens_per_s": best.tokens_per_s} if best else None,
                "best_changed": (prev_best is None) != (best is None) or (
                    prev_best is not None and best is not None and prev_best.number != best.number),
                "remeasured": drift}

    def counts_by_status(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.status.value] = out.get(t.status.value, 0) + 1
        return out

    def pareto(self) -> list[TrialRecord]:
        """Trials no other beats on both throughput (higher) and peak memory (lower)."""
        ok = [t for t in self.ok_trials() if "peak_mem_bytes" in t.metrics]
        front = []
        for t in ok:
            dominated = any(o.tokens_per_s >= t.tokens_per_s and o.metrics["peak_mem_bytes"] <= t.metrics["peak_mem_bytes"]
                            and (o.tokens_per_s > t.tokens_per_s or o.metrics["peak_mem_bytes"] < t.metrics["peak_mem_bytes"])
                            for o in ok)
            if not dominated:
                front.append(t)
        return sorted(front, key=lambda t: t.metrics["peak_mem_bytes"])


@dataclass(frozen=True)
class DeployPick:
    trial: TrialRecord | None
    rule: str  # the rule in words, as the verdict states it
    met: bool  # False: no layout on the front met the rule; `trial` is the closest one within the cap


def launch_command(spec: Spec, layout: Layout) -> str:
    """The exact command that reproduces a trial's run: the user's own (`trainable:`, node 0's
    line with the layout filled in) or torchrun of the built-in MoE run, one node per `nodes`."""
    if spec.trainable is not None:
        from autotune.trials.command_trial import command_placement, command_trial
        from trainables.command import render_argv

        place = command_placement(layout, spec)
        values = {**command_trial(spec, 0, layout).values, "nproc": place.nproc, "nnodes": place.nnodes,
                  "node_rank": 0, "master_addr": "MASTER_ADDR", "master_port": 29500,
                  "trial_dir": "run", "metrics_file": "metrics.jsonl"}
        return " ".join(shlex.quote(a) for a in render_argv(spec.trainable.command, values))
    from autotune.trials.configs import run_config_for

    cfg = run_config_for(spec, layout)
    nodes = spec.cluster.nodes if spec.cluster.ranks_per_node else 1
    per_node = layout.world_size // nodes if layout.world_size % nodes == 0 and nodes > 1 else layout.world_size
    nnodes = layout.world_size // per_node
    head = ["torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={per_node}"]
    if nnodes > 1:
        head += ["--rdzv-backend=c10d", "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT"]
    return " ".join(head + ["-m", "trainables.moe.train"] + [shlex.quote(a) for a in cfg.argv()]
                    + ["--metrics-out", "metrics.jsonl"])
