"""A program's secret stays a secret when the program prints it: a study of a failing program
that prints its `env_from` value and looks for the Ray token leaves neither in any file or on
the console, and the program never sees the token."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest
import yaml

from autotune.schema import Status
from autotune.space.spec import spec_from_data
from autotune.study.runner import RunOptions, run_study
from tests.faults import worker_exits

pytestmark = pytest.mark.slow

SECRET = "hf_" + "5ec7e7" * 6
PROGRAM = textwrap.dedent("""\
    import os, sys
    token = os.environ.get("HF_TOKEN")
    print("loading with token", token, "ray token:", os.environ.get("RAY_AUTH_TOKEN"), flush=True)
    print(f"PermissionError: 401 for token {token}", file=sys.stderr)
    sys.exit(3)
""")


def test_a_failing_program_that_prints_its_secret_leaves_it_nowhere(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    (tmp_path / "leaky.py").write_text(PROGRAM)
    data = {
        "model": {"preset": "tiny"},
        "cluster": {"ranks": 1, "device": "cpu", "memory_gb": 1.0, "cpus_per_rank": 1},
        "search": {"ep": [1], "tp": [1], "pp": [1], "world_sizes": [1], "micro_batch_size": [2, 4],
                   "global_batch_size": 8, "seq_len": 32, "precision": ["fp32"], "recompute": ["none"]},
        "budget": {"trials": 2, "warmup_steps": 1, "measure_steps": 2, "trial_timeout_s": 60, "remeasure_share": 0},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "secrets"},
        "study": {"name": "leaky", "output_dir": str(tmp_path / "runs")},
        "trainable": {"command": [sys.executable, "leaky.py"], "metrics_regex": {"step_time_s": r"time (\S+)"},
                      "env_from": ["HF_TOKEN"], "cwd": str(tmp_path)},
    }
    spec = spec_from_data(data)
    import ray

    from autotune.study.connect import ray_init

    ray_init(spec, None)  # the study's own Ray, kept up after the study to read what its GCS recorded
    try:
        session = ray._private.worker._global_node.get_session_dir_path()
        result = run_study(spec, yaml.safe_dump(data), RunOptions(live=False))
        # No Ray worker died or was killed while the failing trials ran (Ray's "A worker died or was
        # killed ... SYSTEM_ERROR"): neither a trial's coordinator nor a rank's worker.
        exits = worker_exits(session)
        assert not [e for e in exits if e[1] == "SYSTEM_ERROR"], exits
        console = capfd.readouterr()  # what the study printed (checked below)

        @ray.remote
        class Doomed:
            def die(self) -> None:
                os._exit(1)

        doomed = Doomed.remote()  # ... which the check would see: a worker that does die
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(doomed.die.remote())
        deadline = time.monotonic() + 30
        while not [e for e in worker_exits(session) if e[1] == "SYSTEM_ERROR"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len([e for e in worker_exits(session) if e[1] == "SYSTEM_ERROR"]) == 1
    finally:
        ray.shutdown()

    launched = [t for t in result.trials if t.status not in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID)]
    assert len(launched) == 2 and all(t.status == Status.CRASHED for t in launched), [t.status for t in launched]
    assert all("PermissionError: 401 for token ***" in t.reason for t in launched), [t.reason for t in launched]
    token = os.environ["RAY_AUTH_TOKEN"]  # the session's cluster token (tests/conftest.py)
    logs = list(tmp_path.rglob("command.log"))
    assert logs and all("ray token: None" in p.read_text() for p in logs)  # the program never saw it
    # the failing trials' Ray workers and Tune's actors end as planned: nothing of Ray's own on the console
    for ray_line in ("worker died", "SYSTEM_ERROR", "Trial task failed", "Traceback"):
        assert ray_line not in console.out + console.err, (console.out + console.err)[-3000:]
    for value in (SECRET, token):
        assert value not in console.out + console.err
        holders = [str(p) for p in tmp_path.rglob("*") if p.is_file() and value.encode() in p.read_bytes()]
        assert not holders, holders
