"""A study submitted twice through the Ray Jobs API to a real two-node Ray cluster, tracked by a
real `mlflow server` on PostgreSQL, with the Optuna study in PostgreSQL too."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from autotune.schema import Status
from autotune.study.store import load_result
from tests.faults import start_cluster
from tests.services import postgres_bindir, start_mlflow_server, start_postgres

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(postgres_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl) are not "
                                                         "installed: install Debian's postgresql package"),
]


def cli(args, cwd, env, timeout=300):
    import subprocess

    return subprocess.run([sys.executable, "-m", "autotune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    pg = start_postgres()
    server = cluster = None
    try:
        server = start_mlflow_server(pg.create_database("mlflow"), tmp)
        optuna_url = pg.create_database("optuna")
        # Two nodes of one rank each: a world-2 trial has to span both. Started as by hand, its
        # workers at Ray's own nice 15.
        cluster = start_cluster([{"num_cpus": 1}, {"num_cpus": 1, "resources": {"node2": 1}}], dashboard=True,
                                ray_priority=True)
        yield tmp, pg, server, cluster, optuna_url
    finally:
        if cluster:
            cluster.stop()
        if server:
            server.stop()
        pg.stop()


def _wait(cwd, env, address, job_id, timeout=900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = cli(["jobs", "status", job_id, "--address", address], cwd, env)
        assert proc.returncode == 0, proc.stderr
        state = proc.stdout.split(":", 1)[1].split()[0]
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(2)
    raise TimeoutError(f"job {job_id} did not finish")


def test_a_request_without_the_token_is_refused(stack):
    tmp, pg, server, cluster, optuna_url = stack
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{cluster.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code == 401
    wrong = urllib.request.Request(f"{cluster.dashboard_url}/api/jobs/", headers={"Authorization": "Bearer nope"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(wrong, timeout=10)
    assert err.value.code in (401, 403)
    right = urllib.request.Request(f"{cluster.dashboard_url}/api/jobs/",
                                   headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"})
    assert urllib.request.urlopen(right, timeout=10).status == 200


def test_a_study_submitted_twice_continues_on_both_nodes(stack):
    tmp, pg, server, cluster, optuna_url = stack
    data = {
        "model": {"preset": "tiny"},
        "cluster": {"nodes": 2, "ranks_per_node": 1, "device": "cpu", "memory_gb": 1.0, "cpus_per_rank": 1},
        "search": {"ep": [1, 2], "tp": [1], "world_sizes": [1, 2], "micro_batch_size": [1, 2],
                   "global_batch_size": 8, "seq_len": 32, "precision": ["fp32"], "recompute": ["none", "full"]},
        "budget": {"trials": 3, "warmup_steps": 1, "measure_steps": 2, "max_concurrent": 1,
                   "trial_timeout_s": 180},
        "tracking": {"uri": server.uri, "experiment": "cluster-jobs"},
        "study": {"name": "nightly", "storage": optuna_url, "output_dir": str(tmp / "runs"), "seed": 5},
    }
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    env = {**cluster.env}
    address = cluster.dashboard_url
    numbers_first = None
    for round_ in (1, 2):
        proc = cli(["submit", str(space), "--address", address, "--python", sys.executable], tmp, env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        job_id = proc.stdout.strip().splitlines()[-1]
        state = _wait(tmp, env, address, job_id)
        logs = cli(["jobs", "logs", job_id, "--address", address], tmp, env)
        assert state == "SUCCEEDED", logs.stdout[-4000:]
        assert "best:" in logs.stdout
        result = load_result("nightly", tmp / "runs", optuna_url)
        launched = [t for t in result.trials if t.status not in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID)]
        assert len(launched) == 3 * round_, [(t.status, t.reason) for t in launched]
        assert len({t.layout.key for t in launched}) == len(launched)  # nothing re-run
        if round_ == 1:
            numbers_first = {t.number: t.to_dict() for t in result.trials}
        else:
            for number, record in numbers_first.items():
                assert next(t for t in result.trials if t.number == number).to_dict() == record
            assert result.sessions() == 2

    nodes_per_trial = [{r["node"] for r in t.ranks} for t in launched if t.ok]
    assert len(set().union(*nodes_per_trial)) == 2, nodes_per_trial  # trials ran on both nodes
    # ... at normal priority: the job's driver asks for it (autotune.study.connect.connected_runtime_env)
    assert {r["nice"] for t in launched if t.ok for r in t.ranks} == {0}
    # The first job measured the cluster before its first trial: one rank per node, so the
    # collectives were timed between the two nodes, and the network's figures are the profile's.
    probe = result.cluster_probe
    assert probe and not probe.get("error"), probe
    assert {f["kind"] for f in probe["fits"] if f["where"] == "across"} == {"all_reduce", "send_recv"}, probe["fits"]
    assert any(len(n) == 2 for n in nodes_per_trial), nodes_per_trial  # a trial spanned both nodes

    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("cluster-jobs")
    runs = client.search_runs([exp.experiment_id], "tags.`autotune.trial` != ''", max_results=1000)
    assert {int(r.data.tags["autotune.trial"]) for r in runs} == {t.number for t in result.trials}
    assert all(r.info.status in ("FINISHED", "FAILED") for r in runs)
    for r in runs:  # no credentials or URLs with secrets in what MLflow holds
        assert "RAY_AUTH_TOKEN" not in json.dumps(r.data.params) and cluster.env["RAY_AUTH_TOKEN"] not in \
            json.dumps(r.data.tags)
    study = optuna.load_study(study_name="nightly", storage=optuna_url)
    assert not [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    assert (Path(data["study"]["output_dir"]) / "nightly" / "report" / "report.md").exists()
