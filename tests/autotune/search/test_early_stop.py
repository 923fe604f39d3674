"""The noise-aware early stopper's decisions, fed step results the way Tune feeds them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ray.tune.schedulers import TrialScheduler

from autotune.schema import Status
from autotune.search.early_stop import NoiseAwareStopper
from autotune.space.layout import Layout
from autotune.space.spec import spec_from_data
from autotune.trial_record import TrialRecord

SPACE = {"model": {"preset": "tiny"}, "cluster": {"ranks": 4, "device": "cpu", "memory_gb": 0.02},
         "search": {"world_sizes": [1, 2, 4], "global_batch_size": 16, "seq_len": 64},
         "budget": {"measure_steps": 6, "early_stop": True}, "study": {"name": "stop"}}


@dataclass
class Trial:  # what the stopper reads of Tune's Trial: its id and config
    trial_id: str
    config: dict[str, Any] = field(default_factory=dict)


def stopper(pareto: bool = False) -> NoiseAwareStopper:
    data = json.loads(json.dumps(SPACE))
    if pareto:
        data["objective"] = {"minimize": "peak_mem_bytes"}
    return NoiseAwareStopper(spec_from_data(data))


def feed(s: NoiseAwareStopper, trial: Trial, times: list[float]) -> list[str]:
    return [s.on_trial_result(None, trial, {"step_time_s": t, "measured_steps": i + 1})
            for i, t in enumerate(times)]


def trial(n: int, pred_mem: int = 1000) -> Trial:
    return Trial(f"t{n}", {"number": n, "prediction": {"pred_peak_mem_bytes": pred_mem}})


def test_a_layout_slower_beyond_noise_is_stopped_and_told_why():
    s = stopper()
    fast, slow = trial(1), trial(2)
    assert feed(s, fast, [0.50, 0.52, 0.51]) == [TrialScheduler.CONTINUE] * 3
    decisions = feed(s, slow, [1.00, 1.05])
    assert decisions == [TrialScheduler.CONTINUE, TrialScheduler.STOP]  # one step says nothing
    reason = s.reasons["t2"]
    assert reason.startswith("stopped after 2 measured steps: median step 1025.0 ms")
    assert "trial #1's 510.0 ms" in reason and "do not overlap" in reason


def test_overlapping_intervals_are_noise_not_a_reason_to_stop():
    s = stopper()
    feed(s, trial(1), [0.50, 0.90, 0.60])  # a noisy fast layout
    assert feed(s, trial(2), [0.70, 0.80, 0.75, 0.72]) == [TrialScheduler.CONTINUE] * 4
    assert s.reasons == {}


def test_the_last_step_and_a_finished_failed_peer_stop_nothing():
    s = stopper()
    peer = trial(1)
    feed(s, peer, [0.1, 0.1])
    s.on_trial_result(None, peer, {"autotune_final": True,
                                   "outcome": json.dumps({"status": "oom", "summary": None})})
    assert feed(s, trial(2), [1.0, 1.1, 1.0, 1.05, 1.0, 1.1]) == [TrialScheduler.CONTINUE] * 6
    s2 = stopper()
    feed(s2, trial(1), [0.1, 0.1])
    # measured_steps = measure_steps: the trial is about to finish, stopping saves nothing
    assert s2.on_trial_result(None, trial(3), {"step_time_s": 1.0, "measured_steps": 5}) == TrialScheduler.CONTINUE
    assert s2.on_trial_result(None, trial(3), {"step_time_s": 1.0, "measured_steps": 6}) == TrialScheduler.CONTINUE


def test_in_a_pareto_study_a_faster_peer_that_needs_more_memory_stops_nobody():
    s = stopper(pareto=True)
    feed(s, trial(1, pred_mem=5000), [0.5, 0.5, 0.5])
    assert feed(s, trial(2, pred_mem=1000), [1.0, 1.0, 1.0]) == [TrialScheduler.CONTINUE] * 3
    # a peer both faster and no larger does dominate it
    feed(s, trial(3, pred_mem=900), [0.4, 0.41])
    assert s.on_trial_result(None, trial(2), {"step_time_s": 1.0, "measured_steps": 4}) == TrialScheduler.STOP
    assert "trial #3" in s.reasons["t2"] and "needs no more memory" in s.reasons["t2"]


def test_a_gap_that_two_runs_of_one_layout_could_show_stops_nothing():
    # Tight, separated intervals, 1.2x apart: a trial's steps share its run's conditions, and on
    # CPU two runs of one layout differ by more (the device's prior spread: a 1.37x margin).
    s = stopper()
    feed(s, trial(1), [0.50, 0.50, 0.50])
    assert feed(s, trial(2), [0.60, 0.60, 0.60, 0.60]) == [TrialScheduler.CONTINUE] * 4
    assert s.reasons == {}
    assert 1.3 < math.exp(s.spread.margin(1, 1)) < 1.45
    # The same gap on a dedicated card (prior 0.03: a 1.09x margin) is beyond doubt.
    data = json.loads(json.dumps(SPACE))
    data["cluster"] = {"ranks": 4, "device": "cuda", "memory_gb": 80}
    g = NoiseAwareStopper(spec_from_data(data))
    feed(g, trial(1), [0.50, 0.50, 0.50])
    assert feed(g, trial(2), [0.60, 0.60]) == [TrialScheduler.CONTINUE, TrialScheduler.STOP]
    assert "1.20x is beyond the run-to-run margin of 1.09x" in g.reasons["t2"]


def test_the_studys_own_re_measures_narrow_the_margin():
    # Earlier runs in which a layout measured twice within 1% of itself: the study's spread, pooled
    # with the prior, lets a 1.25x gap stop a trial that the prior alone would let run.
    layout = Layout(1, 1, 1, 4, 2, "fp32", "none")
    known = [TrialRecord(n, layout, Status.OK, step_times=(t, t, t)) for n, t in enumerate((0.500, 0.505) * 10)]
    s = NoiseAwareStopper(spec_from_data(json.loads(json.dumps(SPACE))), known)
    assert s.spread.dof > 5 and math.exp(s.spread.margin(1, 1)) < 1.2
    feed(s, trial(30), [0.50, 0.50, 0.50])
    assert feed(s, trial(31), [0.625, 0.625]) == [TrialScheduler.CONTINUE, TrialScheduler.STOP]
    prior_only = stopper()  # the same two trials without the study's re-measures: it runs on
    feed(prior_only, trial(30), [0.50, 0.50, 0.50])
    assert feed(prior_only, trial(31), [0.625, 0.625]) == [TrialScheduler.CONTINUE] * 2
