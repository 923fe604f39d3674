"""A study that tunes a user's own training program (`trainable:`): the project's toy trainer,
run by real Ray trials through `trainables.command`, recorded and reported like the built-in run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from autotune.records.results import launch_command
from autotune.schema import Status
from autotune.space.spec import spec_from_data
from autotune.study.runner import RunOptions, run_study
from autotune.study.store import load_result

pytestmark = pytest.mark.slow

COMMAND = [sys.executable, "-m", "trainables.examples.toy_train", "--ep", "{ep}", "--tp", "{tp}", "--pp", "{pp}",
           "--dp", "{dp}", "--micro-batch-size", "{micro_batch_size}", "--global-batch-size", "{global_batch_size}",
           "--seq-len", "{seq_len}", "--precision", "{precision}", "--recompute", "{recompute}",
           "--steps", "3", "--warmup-steps", "1"]


SECRET = "tok-3f9a1c7e55d0"


def _space(tmp, trainable):
    return {
        "model": {"preset": "tiny"},
        "cluster": {"ranks": 2, "device": "cpu", "memory_gb": 1.0, "cpus_per_rank": 1},
        "search": {"ep": [1, 2], "tp": [1, 2], "world_sizes": [1, 2], "micro_batch_size": [2, 4],
                   "global_batch_size": 8, "seq_len": 32, "precision": ["fp32"], "recompute": ["none", "full"]},
        "budget": {"trials": 3, "warmup_steps": 1, "measure_steps": 3, "max_concurrent": 1, "trial_timeout_s": 60},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "command"},
        "study": {"name": "toy", "seed": 2, "output_dir": str(tmp / "runs")},
        "trainable": trainable,
    }


@pytest.mark.parametrize("channel", ["file", "regex"])
def test_a_study_tunes_the_toy_trainer_through_its_command(tmp_path, channel):
    if channel == "file":
        trainable = {"command": COMMAND + ["--metrics-file", "{metrics_file}"], "env": {"TOY_API_TOKEN": SECRET}}
        trainable["command"] += ["--require-env", "TOY_API_TOKEN"]  # fails the trial unless the value arrives
    else:
        trainable = {"command": COMMAND, "metrics_regex": {
            "step": r"^step (\d+) ", "step_time_s": r"^step \d+ .*\| step time ([0-9.]+) s",
            "loss": r"^step \d+ .*\| loss ([0-9.]+)"}}
    data = _space(tmp_path, trainable)
    spec = spec_from_data(data)
    result = run_study(spec, yaml.safe_dump(data), RunOptions(live=False))

    launched = [t for t in result.trials if t.status not in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID)]
    assert len(launched) == 3 and all(t.ok for t in launched), [(t.layout.key, t.reason) for t in launched]
    for t in launched:
        assert t.tokens_per_s > 0
        assert len(t.ranks) == t.layout.world_size and all(r["node"] for r in t.ranks)
        assert {r["nice"] for r in t.ranks} == {0}  # the command ran at normal priority (autotune.study.connect)
        node0 = spec.study.directory() / "trials" / f"{t.number:04d}" / "node0"
        log = (node0 / "command.log").read_text()
        assert f"EP{t.layout.ep}_TP{t.layout.tp}_" in log  # the layout reached the program
    # The toy's speed depends on the layout: the ranking is the program's, not a constant.
    assert len({round(t.tokens_per_s) for t in launched}) > 1

    best = load_result("toy", tmp_path / "runs").best()
    command = launch_command(spec, best.layout)
    assert "trainables.examples.toy_train" in command and f"--ep {best.layout.ep}" in command
    assert "{" not in command
    report = (spec.study.directory() / "report" / "report.md").read_text()
    assert command in report

    client = MlflowClient(tracking_uri=data["tracking"]["uri"])
    exp = client.get_experiment_by_name("command")
    runs = client.search_runs([exp.experiment_id], "tags.`autotune.trial` != ''")
    assert {int(r.data.tags["autotune.trial"]) for r in runs} == {t.number for t in result.trials}
    # The program's environment values are never written where others read: MLflow, the study's
    # storage, the report.
    parent = client.search_runs([exp.experiment_id], "tags.`autotune.study` = 'toy'")[0]
    logged = client.download_artifacts(parent.info.run_id, "", str(tmp_path / "artifacts"))
    texts = [p.read_text(errors="replace") for p in Path(logged).rglob("*") if p.is_file()]
    texts += [p.read_text(errors="replace") for p in spec.study.directory().rglob("*")
              if p.is_file() and p.suffix in (".md", ".json", ".html", ".journal", ".log")]
    assert texts and not [t for t in texts if SECRET in t]
    if channel == "file":
        assert any("TOY_API_TOKEN" in t for t in texts)  # the key is shown, its value masked
