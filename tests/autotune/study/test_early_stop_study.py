"""A study with early stopping, end to end on real Ray: a stopped trial leaves nothing behind (no
placement group in Ray's table, no rank process), and no trial waits for placement once started."""

from __future__ import annotations

import json

import pytest
import ray
import yaml
from mlflow import MlflowClient
from ray.util import placement_group_table

from autotune.records.tracking import FRONT_TAG, Tracker
from autotune.schema import Status
from autotune.space.spec import spec_from_data
from autotune.study.connect import WORKER_NICENESS
from autotune.study.runner import RunOptions, run_study
from tests.autotune.report.test_pareto import pareto_spec, trials
from tests.faults import wait_gone

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # wall-clock bounds: nothing beside it

# Layouts from 1 to 2 ranks whose step times differ by several times (bf16 autocast and full
# recompute are slow on a CPU), 6 measured steps each: slow ones are stopped mid-run.
SPACE = {
    "model": {"preset": "tiny"},
    "cluster": {"ranks": 2, "device": "cpu", "memory_gb": 1.0, "cpus_per_rank": 0.5},
    "search": {"ep": [1, 2], "tp": [1], "pp": [1], "world_sizes": [1, 2], "micro_batch_size": [2, 8],
               "global_batch_size": 16, "seq_len": 32, "precision": ["fp32", "bf16"], "recompute": ["none", "full"]},
    "budget": {"trials": 6, "warmup_steps": 1, "measure_steps": 6, "max_concurrent": 2, "trial_timeout_s": 300,
               "early_stop": True, "remeasure_share": 0},  # no re-measuring of tied leaders: not what is tested
    "study": {"name": "stops", "seed": 3, "sampler": "random"},
}


@pytest.fixture(scope="module")
def stopped_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stops")
    data = json.loads(json.dumps(SPACE))
    data["tracking"] = {"experiment": "stops", "uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    data["study"]["output_dir"] = str(tmp / "runs")
    # Ray started here, so that its placement-group table can be read after the study.
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR",
             _system_config={"worker_niceness": WORKER_NICENESS})  # as a study's own Ray runs its ranks
    try:
        result = run_study(spec_from_data(data), yaml.safe_dump(data), RunOptions(live=False))
        table = placement_group_table()
    finally:
        ray.shutdown()
    return result, table


def test_stopped_trials_leave_no_placement_group_and_no_rank_process(stopped_study):
    result, table = stopped_study
    stopped = [t for t in result.trials if t.status == Status.EARLY_STOPPED]
    assert stopped, [(t.number, t.status.value, t.step_times) for t in result.trials]
    assert [g["state"] for g in table.values() if g["state"] != "REMOVED"] == []
    assert len(table) >= len([t for t in result.trials if t.duration_s or t.step_times])
    pids = [r["pid"] for t in stopped for r in t.ranks]
    assert len(pids) == sum(t.layout.world_size for t in stopped)
    assert wait_gone(pids, timeout=5) == []
    for t in stopped:  # the partial figures are kept, with the peer that beat it
        assert 2 <= len(t.step_times) < 6 and t.metrics["tokens_per_s"] > 0
        assert "intervals do not overlap" in t.reason and "slower than trial #" in t.reason


def test_no_trial_waits_for_placement_after_it_starts(stopped_study):
    result, _ = stopped_study
    launched = [t for t in result.trials if t.status not in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID)]
    assert len(launched) == 6  # the budget
    assert not [t.reason for t in launched if "could not place" in t.reason]
    waits = {t.number: t.placement_wait_s for t in sorted(launched, key=lambda t: t.number)}
    assert all(w is not None for w in waits.values()), waits
    # The study's start places (and removes) one tiny group, so that even the first trial does not
    # pay a fresh cluster's first placement; a stopped trial's group is removed before the driver
    # admits the next trial (autotune.trials.owner), so none waits for another's leftovers.
    assert all(w < 1.0 for w in waits.values()), waits

def test_the_parent_run_tags_the_front_and_its_members(tmp_path):
    spec = pareto_spec()
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "front")
    tracker.check()
    parent = tracker.start_study(spec, "{}", {}, None)
    records = [r.__class__(**{**r.__dict__, "mlflow_run_id": tracker.start_trial(parent, r.number, {})})
               for r in trials(spec)]
    from tests.autotune.report.test_report import study

    result = study(spec, records)
    pick = result.deploy_pick()
    tracker.tag_front(parent, result.pareto(), pick.trial, pick.rule)
    client = MlflowClient(tracking_uri=tracker.uri)
    tags = client.get_run(parent).data.tags
    assert tags[FRONT_TAG] == "3,2,1" and tags["autotune.deploy_pick"] == "2"
    assert tags["autotune.deploy_rule"] == pick.rule
    member = {r.number: client.get_run(r.mlflow_run_id).data.tags.get(FRONT_TAG) for r in records}
    assert member == {1: "true", 2: "true", 3: "true", 4: None, 5: None}
    # a later run of the study with another front un-tags former members
    tracker.tag_front(parent, [records[0]], records[0], pick.rule)
    assert client.get_run(records[2].mlflow_run_id).data.tags[FRONT_TAG] == "false"
