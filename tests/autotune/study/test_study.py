"""A small study end to end: real Ray, Optuna (journal file), MLflow (SQLite), real trials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from autotune.predict.candidates import layouts_of, screen
from autotune.schema import MEMORY_CATEGORIES, Status
from autotune.search.searcher import open_storage
from autotune.space.spec import spec_from_data
from autotune.study.cluster_profile import apply
from autotune.study.runner import RunOptions, run_study
from autotune.study.store import PROFILE_ATTR, StudyError, load_result
from autotune.trial_record import TIE_REMEASURE

pytestmark = pytest.mark.slow

SPACE = {
    "model": {"preset": "tiny"},
    "cluster": {"ranks": 2, "device": "cpu", "memory_gb": 1.0, "cpus_per_rank": 1},
    "search": {"ep": [1, 2], "tp": [1, 2], "world_sizes": [1, 2], "micro_batch_size": [2, 8],
               "global_batch_size": 16, "seq_len": 32, "precision": ["fp32", "bf16"]},
    "budget": {"trials": 5, "warmup_steps": 1, "measure_steps": 2, "max_concurrent": 2, "trial_timeout_s": 120},
    "tracking": {"experiment": "study-test"},
    "study": {"name": "e2e", "seed": 1},
}


def _space(tmp: Path, **budget) -> tuple[dict, str]:
    """The space with a memory cap between the smallest and largest prediction: some layouts fit,
    some are pruned, whatever the calibration of the memory model."""
    data = json.loads(json.dumps(SPACE))
    data["tracking"]["uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    data["study"]["output_dir"] = str(tmp / "runs")
    data["budget"].update(budget)
    totals = sorted(c.prediction.total for c in screen(spec_from_data(data)).candidates if c.prediction)
    data["cluster"]["memory_gb"] = (totals[len(totals) // 2] + 1) / 0.9 / 1e9
    return data, yaml.safe_dump(data)


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    data, text = _space(tmp)
    spec = spec_from_data(data)
    result = run_study(spec, text, RunOptions(live=False))
    return tmp, data, spec, result


def _searched(trials):
    """Trials the search launched (not the end-of-study re-measures of tied leaders)."""
    return [t for t in trials if t.searched]


def test_every_trial_is_recorded_with_a_status(study_run):
    tmp, data, spec, result = study_run
    launched = _searched(result.trials)
    assert len(launched) == spec.budget.trials
    assert len({t.layout.key for t in launched}) == len(launched)  # no layout measured twice
    assert all(t.status == Status.OK for t in launched), [(t.layout.key, t.reason) for t in launched]
    for t in launched:
        assert t.layout.world_size in (1, 2)
        assert t.metrics["tokens_per_s"] == pytest.approx(16 * 32 / t.metrics["step_time_s"])
        assert t.metrics["peak_mem_bytes"] == sum(t.metrics[k] for k in MEMORY_CATEGORIES)
        assert len(t.ranks) == t.layout.world_size and all(r["node"] for r in t.ranks)
        assert t.prediction["pred_peak_mem_bytes"] <= 0.9 * spec.cluster.memory_bytes
    pruned = [t for t in result.trials if t.status == Status.PRUNED_BY_MEMORY_MODEL]
    for t in pruned:  # recorded with the prediction that excluded it, never run
        assert t.prediction["pred_peak_mem_bytes"] > 0.9 * spec.cluster.memory_bytes
        assert not t.metrics and "predicted peak" in t.reason


def test_trials_run_their_ranks_on_warm_workers(study_run):
    """Ray kills idle workers beyond a soft limit: at Ray's default, 3 of the 5 trials here started
    their second rank on a new worker that imported torch first (4-6 s of a 6 s trial). The
    study's Ray keeps one warm worker per rank."""
    tmp, data, spec, result = study_run
    launched = _searched(result.trials)
    workers = [{r["worker_pid"] for r in t.ranks} for t in launched]
    assert all(len(w) == t.layout.world_size for w, t in zip(workers, launched))
    # at most one worker per rank of the cluster (one more for a worker handed back a moment late)
    assert len(set().union(*workers)) <= spec.cluster.total_ranks + 1, workers
    # ... at normal priority, not the nice 15 Ray gives its workers (autotune.study.connect.WORKER_NICENESS)
    assert {r["nice"] for t in launched for r in t.ranks} == {0}


def test_tied_leaders_are_measured_again_until_separated_or_the_budget_is_spent(study_run):
    tmp, data, spec, result = study_run
    again = [t for t in result.trials if t.reason.startswith(TIE_REMEASURE)]
    budget = spec.budget.remeasure_launches()
    assert budget == 2 and len(again) <= budget
    standing = result.standing()
    if standing["tied"]:  # still tied: only because too little budget was left for a round
        assert budget - len(again) < 2
    first = {t.number: t for t in result.trials}
    for t in again:  # a re-measure of a measured layout, recorded like any trial
        assert t.ok and first[t.remeasure_of].layout == t.layout and t.session == 0
        assert "step_time_lo_s" in t.metrics
    if again:
        assert standing["remeasures"] == len(again)
        counted = {t.layout.key: t for t in result.ok_trials()}
        assert all(len(counted[t.layout.key].step_times) > spec.budget.measure_steps for t in again)
    md = (spec.study.directory() / "report" / "report.md").read_text()
    assert "Rule: a layout is tied with the best" in md and "interval ms" in md


def test_mlflow_holds_the_parent_and_one_child_per_trial(study_run):
    tmp, data, spec, result = study_run
    client = MlflowClient(tracking_uri=data["tracking"]["uri"])
    exp = client.get_experiment_by_name("study-test")
    parent = client.get_run(result.mlflow_parent_run_id)
    assert parent.data.tags["autotune.study"] == "e2e" and parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"space.yaml", "spec.json", "report"} <= artifacts
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == len(result.trials)
    by_id = {c.info.run_id: c for c in children}
    for t in result.trials:
        run = by_id[t.mlflow_run_id]
        assert run.data.tags["status"] == t.status.value
        assert run.info.status in ("FINISHED", "FAILED")
        for p in ("ep", "tp", "pp", "dp", "world_size", "micro_batch_size", "precision", "recompute", "schedule",
                  "global_batch_size", "seq_len"):
            assert p in run.data.params
        assert int(run.data.params["ep"]) == t.layout.ep
        assert "pred_peak_mem_bytes" in run.data.metrics
        if t.ok:
            for m in ("tokens_per_s", "step_time_s", "step_time_p90_s", "peak_mem_bytes", *MEMORY_CATEGORIES,
                      "expert_load_imbalance", "tokens_dropped_frac", "loss_first", "loss_last"):
                assert m in run.data.metrics, m
            # the bootstrap interval on the median step time, beside it
            lo, hi = run.data.metrics["step_time_lo_s"], run.data.metrics["step_time_hi_s"]
            assert lo <= t.metrics["step_time_s"] <= hi
            assert (lo, hi) == (t.metrics["step_time_lo_s"], t.metrics["step_time_hi_s"])
            series = client.get_metric_history(run.info.run_id, "tokens_per_s")
            assert len(series) >= spec.budget.measure_steps  # one point per measured step, then the summary
            assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.jsonl"}


def test_optuna_storage_keeps_every_record_and_nothing_running(study_run):
    tmp, data, spec, result = study_run
    study = optuna.load_study(study_name="e2e", storage=open_storage(spec.study.storage_url()))
    states = {t.state for t in study.get_trials(deepcopy=False)}
    assert optuna.trial.TrialState.RUNNING not in states
    ok = {t.number: t for t in result.trials if t.ok}
    attrs = [t.user_attrs for t in study.get_trials(deepcopy=False) if "step_time_lo_s" in t.user_attrs]
    assert len(attrs) >= len(ok) and all(a["step_time_lo_s"] <= a["step_time_hi_s"] for a in attrs)
    again = load_result("e2e", Path(spec.study.output_dir))
    assert [t.to_dict() for t in again.trials] == [t.to_dict() for t in result.trials]


def test_report_is_written_and_consistent(study_run):
    tmp, data, spec, result = study_run
    report = json.loads((spec.study.directory() / "report" / "report.json").read_text())
    best = result.best()
    assert best is not None
    text = (spec.study.directory() / "report" / "report.md").read_text()
    assert best.layout.name in text and "torchrun" in text
    assert json.dumps(report)  # serialisable as written
    priority = next(c for c in report["checks"] if c["id"] == "ranks_priority")
    assert priority["passed"] is True and priority["figure"] == 0, priority
    # The cluster was measured (or its figures reused) before the first trial; the step-time
    # model's profile, kept with the study, is the device profile with those figures.
    probe = result.cluster_probe
    assert probe and not probe.get("error") and report["cluster_probe"]["fits"] == probe["fits"]
    assert "## Cluster profile" in text and "all-reduce over 2 ranks" in text
    assert "a layer's fixed cost per micro-batch" in text and report["cluster_probe"]["layer"]["seconds"] > 0
    stored = optuna.load_study(study_name="e2e", storage=open_storage(spec.study.storage_url())).user_attrs
    assert stored[PROFILE_ATTR] == apply(spec.cluster.device_profile(), probe).to_dict()


def test_report_command_takes_the_space_file_as_run_does(study_run):
    """`autotune report space.yaml` finds the study where `autotune run space.yaml` put it; a
    name it cannot find says how to point at the study."""
    tmp, data, spec, result = study_run
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    out = spec.study.directory() / "report"
    (out / "report.md").unlink()
    cmd = [sys.executable, "-m", "autotune.cli", "report"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOTUNE_")}
    proc = subprocess.run([*cmd, str(space)], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert str(out / "report.md") in proc.stdout and result.best().layout.name in (out / "report.md").read_text()
    proc = subprocess.run([*cmd, "e2e"], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no study 'e2e' under ")
    assert "name the study's space file, or pass --dir or --storage" in proc.stderr


def test_resume_extends_the_study_without_rerunning(study_run):
    tmp, data, spec, result = study_run
    data2 = json.loads(json.dumps(data))
    data2["budget"]["trials"] = spec.budget.trials + 2
    spec2 = spec_from_data(data2)
    with pytest.raises(StudyError, match="already exists.*--resume"):
        run_study(spec2, yaml.safe_dump(data2), RunOptions(live=False, report=False))
    more = run_study(spec2, yaml.safe_dump(data2), RunOptions(resume=True, live=False, report=False))
    launched = _searched(more.trials)
    assert len(launched) == spec.budget.trials + 2
    assert len({t.layout.key for t in launched}) == len(launched)
    first = {t.number: t.to_dict() for t in result.trials}
    assert all(t.to_dict() == first[t.number] for t in more.trials if t.number in first)  # untouched
    assert more.mlflow_parent_run_id == result.mlflow_parent_run_id
    assert len(layouts_of(spec2)) >= len(launched)


def test_continue_measures_the_best_again_and_the_report_says_what_changed(study_run):
    tmp, data, spec, result = study_run
    data3 = json.loads(json.dumps(data))
    data3["budget"]["trials"] = 2
    spec3 = spec_from_data(data3)
    before = load_result("e2e", Path(spec.study.output_dir))
    best_before = before.best()
    more = run_study(spec3, yaml.safe_dump(data3), RunOptions(extend=True, remeasure_top=1, live=False))
    new = [t for t in more.trials if t.session == more.sessions() - 1 and t.number not in
           {b.number for b in before.trials}]
    launched_now = _searched(new)
    assert len(launched_now) == 2  # --continue adds budget.trials launches
    again = [t for t in launched_now if t.remeasure_of is not None]
    assert len(again) == 1 and again[0].remeasure_of == best_before.number
    assert again[0].layout == best_before.layout and "measured again" in again[0].reason
    changes = more.changes()
    assert changes["remeasured"][0]["previous_tokens_per_s"] == pytest.approx(best_before.tokens_per_s)
    md = (spec3.study.directory() / "report" / "report.md").read_text()
    assert "## Since the last run" in md and best_before.layout.key in md
