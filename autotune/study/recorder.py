"""Turns trial events (Tune callbacks, searcher decisions) into MLflow runs and trial records."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable

from ray.tune import Callback

from autotune.records.tracking import Tracker, redact
from autotune.redaction import error_line
from autotune.schema import SUMMARY_METRICS, Status
from autotune.search.stats import step_time_interval
from autotune.space.layout import Layout
from autotune.space.spec import Spec
from autotune.study.progress import Progress
from autotune.trial_record import TIE_REMEASURE, TrialRecord


def record_from_result(number: int, layout: Layout, prediction: dict[str, int], result: dict | None,
                       error: bool, steps: list[dict[str, Any]], freed: list[dict[str, Any]] = (),
                       stop_reason: str | None = None) -> TrialRecord:
    """A trial's record from its last Tune result (the final one, or the last step it reported).

    `freed` are the rank processes the study's owner freed for it (rank, node, pid): a trial
    stopped before its final report still names them. `stop_reason` is the scheduler's own
    account of why it stopped the trial."""
    result = result or {}
    if result.get("autotune_final"):
        outcome = json.loads(result["outcome"])
        summary = outcome.get("summary") or {}
        metrics = {k: summary[k] for k in (*SUMMARY_METRICS, "flops_per_token", "accum_steps") if k in summary}
        step_times = summary.get("step_times_s") or [s["step_time_s"] for s in outcome.get("steps", [])
                                                     if s.get("phase") == "measure" and s.get("step_time_s")]
        if outcome["status"] == Status.OK.value:
            metrics.update(step_time_interval(step_times).as_metrics())
        rank_mem = {r["rank"]: r for r in summary.get("ranks", [])}
        ranks = tuple({**rank_mem.get(r["rank"], {}), "rank": r["rank"], "node": r.get("node"), "ip": r.get("ip"),
                       "worker_pid": r.get("worker_pid"), "nice": r.get("nice"), **r.get("memory", {})}
                      for r in outcome.get("ranks", []))
        return TrialRecord(number=number, layout=layout, status=Status(outcome["status"]),
                           reason=outcome.get("reason", ""), metrics=metrics, prediction=prediction, ranks=ranks,
                           losses=tuple(summary.get("losses", [s["loss"] for s in outcome.get("steps", [])
                                                                 if s.get("loss") is not None])),
                           step_times=tuple(step_times),
                           duration_s=outcome.get("duration_s"), attempts=int(outcome.get("attempts", 1)),
                           placement_wait_s=outcome.get("placement_wait_s"))
    ranks = tuple({"rank": r["rank"], "node": r["node"], "pid": r["pid"]} for r in freed)
    waits = [s["placement_wait_s"] for s in steps if s.get("placement_wait_s") is not None]
    if error:
        return TrialRecord(number=number, layout=layout, status=Status.CRASHED, prediction=prediction,
                           reason="the trial's coordinator failed; see the Ray logs of this study", ranks=ranks,
                           placement_wait_s=waits[0] if waits else None)
    # Partial figures: the median of the steps measured before the stop (kept, and reported).
    times = sorted(s["step_time_s"] for s in steps)
    tps = sorted(s["tokens_per_s"] for s in steps)
    metrics = {"tokens_per_s": tps[len(tps) // 2], "step_time_s": times[len(times) // 2]} if steps else {}
    metrics.update(step_time_interval(s["step_time_s"] for s in steps).as_metrics())
    return TrialRecord(number=number, layout=layout, status=Status.EARLY_STOPPED, prediction=prediction,
                       reason=stop_reason or f"stopped by the scheduler after {len(steps)} measured steps",
                       metrics=metrics, losses=tuple(s["loss"] for s in steps),
                       step_times=tuple(s["step_time_s"] for s in steps), ranks=ranks,
                       placement_wait_s=waits[0] if waits else None)


class Recorder(Callback):
    """Tune callback + searcher hooks: turns trial events into MLflow runs and records.

    Everything lands here, in the driver, so MLflow has a single writer however many trials run.
    If MLflow stops answering mid-study the study goes on: records keep going to the Optuna
    storage (the study's own memory) and `autotune sync` copies the missing ones to MLflow later.
    """

    def __init__(self, spec: Spec, tracker: Tracker, parent: str, progress: Progress, session: int = 0,
                 settling: bool = False,
                 release: Callable[[int, bool], list[dict[str, Any]]] | None = None,
                 stop_reasons: dict[str, str] | None = None, fenced: Callable[[], bool] = lambda: False) -> None:
        self.spec, self.tracker, self.parent, self.progress = spec, tracker, parent, progress
        self.session = session
        self.settling = settling  # the trials re-measure leaders tied with the best
        self.release = release  # frees a trial's placement group and rank processes (autotune.trials.owner)
        self.stop_reasons = stop_reasons if stop_reasons is not None else {}  # trial id -> the scheduler's why
        self.trials: dict[str, dict[str, Any]] = {}
        self.tracking_error: str | None = None
        self.fenced = fenced  # the lease is lost: free what a trial held, write nothing

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks for Tuner.restore, which autotune never uses: a study resumes
        # from its Optuna storage. This object only ever lives in the driver.
        return {}

    def _track(self, method: str, *args: Any) -> Any:
        if self.tracking_error is not None:
            return None
        try:
            return getattr(self.tracker, method)(*args)
        except Exception as exc:  # the store went away: keep the study, say so once
            self.tracking_error = (f"MLflow at {redact(self.tracker.uri)} stopped answering ({error_line(exc, 200)}); "
                                   f"the records are in the study's Optuna storage: run `autotune sync "
                                   f"{self.spec.study.name}` once it is back")
            self.progress.note(f"warning: {self.tracking_error}")
            return None

    def _entry(self, trial_id: str, config: dict[str, Any]) -> dict[str, Any]:
        if trial_id not in self.trials:
            layout = Layout.from_params(config["layout"])
            params = {**layout.params(), "global_batch_size": self.spec.search.global_batch_size,
                      "seq_len": self.spec.search.seq_len, "layout": layout.key}
            run_id = self._track("start_trial", self.parent, config["number"], params)
            self.trials[trial_id] = {"number": config["number"], "layout": layout, "run_id": run_id,
                                     "prediction": config.get("prediction", {}), "steps": [],
                                     "remeasure_of": config.get("remeasure_of")}
            self.progress.started(config["number"], layout)
        return self.trials[trial_id]

    # Tune callback hooks
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._entry(trial.trial_id, trial.config)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        # Its coordinator failed and Tune runs it again: free what the failed attempt held.
        if self.release is not None and trial.trial_id in self.trials:
            self.release(self.trials[trial.trial_id]["number"], False)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.fenced():
            return
        entry = self._entry(trial.trial_id, trial.config)
        if result.get("autotune_final"):
            return
        entry["steps"].append({k: result.get(k) for k in ("tokens_per_s", "step_time_s", "loss", "step",
                                                           "placement_wait_s")})
        if entry["run_id"]:
            self._track("log_step", entry["run_id"], int(result["step"]),
                        {k: result[k] for k in ("tokens_per_s", "step_time_s", "loss")})
        self.progress.step(entry["number"])

    # Searcher hooks
    def decided(self, record: TrialRecord) -> TrialRecord:
        run_id = self._track("log_unlaunched", self.parent, record, self.spec)
        record = replace(record, mlflow_run_id=run_id)
        self.progress.finished(record)
        return record

    def answered(self, number: int, kind: str) -> None:
        """A proposal the searcher answered without a run: counted on the console."""
        self.progress.answered_without_run(number, kind)

    def complete(self, trial_id: str, result: dict | None, error: bool) -> TrialRecord:
        entry = self.trials.get(trial_id) or self._entry(trial_id, (result or {})["autotune_config"])
        # Whatever way the trial ended, its resources go first: the next trial may be waiting.
        freed = self.release(entry["number"], True) if self.release is not None else []
        record = record_from_result(entry["number"], entry["layout"], entry["prediction"], result, error,
                                    entry["steps"], freed, self.stop_reasons.get(trial_id))
        record = replace(record, mlflow_run_id=entry["run_id"], session=self.session,
                         remeasure_of=entry["remeasure_of"])
        if record.remeasure_of is not None and not record.reason:
            why = f"{TIE_REMEASURE}: tied with the best, or the best measured once" if self.settling else "measured again"
            record = replace(record, reason=f"{why} (trial {record.remeasure_of} had this layout)")
        if self.fenced():
            return record
        if entry["run_id"]:
            self._track("finish_trial", entry["run_id"], record, self.spec)
        self.progress.finished(record)
        return record
