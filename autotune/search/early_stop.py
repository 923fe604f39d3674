"""Early stopping that respects noise: stop a layout only when a peer is faster beyond doubt.

ASHA compares one number per trial at a rung: with 1-step rungs on a shared 2-core machine,
where one layout's step time moves 1.75x from run to run, it stopped layouts on noise. Here a
running layout is stopped only when its measured steps so far give a step-time interval
(`autotune.search.stats`) that lies wholly above a peer's, and its median is slower than the
peer's by more than two runs of one layout differ (the run-to-run margin of the tie rule, from
the study's re-measures pooled with the device's prior spread): a trial's steps share its run's
conditions, so steps alone separate two runs that the next runs would not. In a Pareto study
(`objective.minimize: peak_mem_bytes`) the peer must also need no more memory (measured, or
predicted until measured), since a slower layout that needs less memory belongs on the front.
The reason names the peer, both intervals and the margin; the trial's partial figures are kept
in its record.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from autotune.schema import Status
from autotune.search.stats import CONFIDENCE, Interval, RunSpread, prior_run_sd, separated, step_time_interval
from autotune.space.spec import Spec
from autotune.trial_record import TrialRecord

MIN_STEPS = 2  # an interval needs two steps; with one, nothing is known


def _ms(s: float) -> str:
    return f"{s * 1000:.1f}"


class NoiseAwareStopper(FIFOScheduler):
    """A Tune scheduler: FIFO, plus a stop decision after each measured step of a trial."""

    def __init__(self, spec: Spec, known: list[TrialRecord] = (), reasons: dict[str, str] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.pareto = bool(spec.objective.minimize)
        self.reasons = reasons if reasons is not None else {}  # trial id -> why it was stopped
        # label -> (step times, peak memory); earlier runs of the study take part as peers
        self.peers: dict[str, tuple[list[float], float | None]] = {
            f"trial #{t.number}": (list(t.step_times), t.metrics.get("peak_mem_bytes"))
            for t in known if t.status == Status.OK and t.step_times}
        self.label: dict[str, str] = {}
        # How far apart two runs of one layout land: the study's own re-measures so far, pooled with
        # the device's prior (what the report assumes of a layout measured once).
        runs: dict[str, list[list[float]]] = {}
        for t in known:
            if t.status == Status.OK and t.step_times:
                runs.setdefault(t.layout.key, []).append(list(t.step_times))
        self.spread = RunSpread.of(runs).with_prior(prior_run_sd(spec.cluster.device))
        # Fixed for the stopper's life: the largest log step-time ratio of two single runs that
        # the spread explains.
        self.margin = self.spread.margin(1, 1)

    def _peer(self, trial: Any) -> str:
        if trial.trial_id not in self.label:
            self.label[trial.trial_id] = f"trial #{trial.config.get('number', trial.trial_id)}"
            memory = (trial.config.get("prediction") or {}).get("pred_peak_mem_bytes")
            self.peers.setdefault(self.label[trial.trial_id], ([], memory))
        return self.label[trial.trial_id]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        me = self._peer(trial)
        if result.get("autotune_final"):
            self._finished(me, result)
            return TrialScheduler.CONTINUE
        times, memory = self.peers[me]
        if result.get("step_time_s") is not None:
            times.append(float(result["step_time_s"]))
        # Nothing to save on the last step, and nothing known before two.
        if len(times) < MIN_STEPS or int(result.get("measured_steps", 0)) >= self.spec.budget.measure_steps:
            return TrialScheduler.CONTINUE
        why = self.beaten_by(me)
        if why is None:
            return TrialScheduler.CONTINUE
        self.reasons[trial.trial_id] = why
        return TrialScheduler.STOP

    def beaten_by(self, me: str) -> str | None:
        """Why `me` should stop: the fastest peer it is slower than beyond doubt, or None."""
        times, memory = self.peers[me]
        mine = step_time_interval(times)
        best: tuple[str, Interval] | None = None
        for label, (peer_times, peer_memory) in self.peers.items():
            if label == me:
                continue
            theirs = step_time_interval(peer_times)
            if not (separated(mine, theirs) and theirs.hi < mine.lo):
                continue
            if math.log(mine.median / theirs.median) <= self.margin:
                continue  # the next runs of the two may well swap places
            if self.pareto and (memory is None or peer_memory is None or peer_memory > memory):
                continue  # the peer is faster but needs more memory: both may be on the front
            if best is None or theirs.median < best[1].median:
                best = (label, theirs)
        if best is None:
            return None
        label, theirs = best
        also = " and needs no more memory" if self.pareto else ""
        return (f"stopped after {mine.n} measured steps: median step {_ms(mine.median)} ms "
                f"[{_ms(mine.lo)}, {_ms(mine.hi)}] is slower than {label}'s {_ms(theirs.median)} ms "
                f"[{_ms(theirs.lo)}, {_ms(theirs.hi)}] ({CONFIDENCE:.0%} intervals do not overlap, and "
                f"{mine.median / theirs.median:.2f}x is beyond the run-to-run margin of "
                f"{math.exp(self.margin):.2f}x){also}")

    def _finished(self, me: str, result: dict[str, Any]) -> None:
        """A finished trial is a peer with all its steps and its measured peak memory; a failed one
        (out of memory, crashed) is no layout to deploy, so it stops nobody."""
        try:
            outcome = json.loads(result["outcome"])
        except (KeyError, ValueError):
            return
        summary = outcome.get("summary") or {}
        times = summary.get("step_times_s")
        if outcome.get("status") != Status.OK.value:
            self.peers.pop(me, None)
        elif times:
            self.peers[me] = (list(times), summary.get("peak_mem_bytes", self.peers[me][1]))
