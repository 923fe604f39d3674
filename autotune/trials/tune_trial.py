"""The Ray Tune function trainable: one trial's coordinator, which hands the trial to the executor
(the built-in trainable) or to a user's command, and reports its steps and outcome to Tune."""

from __future__ import annotations

import json
from typing import Any

from autotune.schema import Status
from autotune.trials.executor import run_trial
from autotune.trials.outcome import TrialOutcome
from autotune.trials.placement import single


def tune_trial(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: a thin coordinator that imports no torch.

    Measured steps are reported as they happen (ASHA can stop a slow layout early); the last
    report carries the whole outcome.
    """
    from ray import tune

    measured = 0
    waited: dict[str, float | None] = {"s": None}

    def on_event(item: dict[str, Any]) -> None:
        if item.get("type") == "reserved":  # the trial's placement group is held
            waited["s"] = item["wait_s"]

    def on_step(step: dict[str, Any]) -> None:
        nonlocal measured
        if step["phase"] == "measure":
            measured += 1
            tune.report({"tokens_per_s": step["tokens_per_s"], "step_time_s": step["step_time_s"],
                         "loss": step["loss"], "step": step["step"], "measured_steps": measured,
                         "placement_wait_s": waited["s"]})

    def attempt() -> TrialOutcome:
        if config.get("command") is not None:  # the user's own program (autotune.trials.command_trial)
            from autotune.trials.command_trial import run_command_trial

            return run_command_trial(config["command"], config["placement"], timeout_s=config["timeout_s"],
                                     placement_wait_s=config.get("placement_wait_s"), owner=config.get("owner"),
                                     number=config.get("number", -1))
        placement = config.get("placement") or single(config["bundle"], config.get("strategy", "PACK"))
        return run_trial(config["run"], placement, timeout_s=config["timeout_s"], on_step=on_step,
                         placement_wait_s=config.get("placement_wait_s"), on_event=on_event,
                         owner=config.get("owner"), number=config.get("number", -1))

    outcome, attempts = attempt(), 1
    if outcome.status == Status.NODE_LOST:  # once more, on what remains of the cluster
        lost = outcome.reason
        outcome, attempts = attempt(), 2
        outcome.reason = (f"retried after: {lost}" if outcome.status == Status.OK
                          else f"{outcome.reason} (first attempt: {lost})")
    # Tune flattens nested results; the outcome travels as one JSON string instead.
    tune.report({
        "autotune_final": True, "status": outcome.status.value, "measured_steps": measured,
        "tokens_per_s": outcome.summary["tokens_per_s"] if outcome.summary is not None else 0.0,
        "outcome": json.dumps({"status": outcome.status.value, "reason": outcome.reason,
                               "summary": outcome.summary, "ranks": outcome.ranks, "steps": outcome.steps,
                               "duration_s": outcome.duration_s, "attempts": attempts,
                               "placement_wait_s": outcome.placement_wait_s}),
    })
