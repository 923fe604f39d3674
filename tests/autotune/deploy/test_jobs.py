"""A study as a Ray Job: what it refuses to ship (secret values, state that dies with the job) and
what it ships (autotune's packages, a user program's files)."""

from __future__ import annotations

import pytest

from autotune.deploy.secrets import written_secrets
from autotune.space.spec import spec_from_data
from tests.autotune.test_settings import BASE, spec


def test_a_space_that_would_write_a_secret_into_a_job_says_which_field():
    assert written_secrets(spec(storage="postgresql://u:pw@db/o")).startswith("study.storage:")
    assert written_secrets(spec(tracking={"uri": "http://tok@m:5000"})).startswith("tracking.uri:")
    program = {"command": ["prog", "{metrics_file}"], "env": {"HF_TOKEN": "abc"}}
    assert written_secrets(spec(trainable=program)).startswith("trainable.env:")
    assert written_secrets(spec(trainable={**program, "env": {}, "env_from": ["HF_TOKEN"]})) is None
    assert written_secrets(spec(storage="postgresql://u@db/o")) is None


def test_a_job_refuses_state_that_dies_with_it(monkeypatch, tmp_path):
    from autotune.deploy.jobs import JobError, check_job_settings

    for name in ("AUTOTUNE_RUNS_DIR", "AUTOTUNE_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(JobError, match="^AUTOTUNE_RUNS_DIR: a submitted study writes its report"):
        check_job_settings(spec(tracking={"uri": "http://m:5000"}))
    monkeypatch.setenv("AUTOTUNE_RUNS_DIR", str(tmp_path))
    with pytest.raises(JobError, match="^MLFLOW_TRACKING_URI: a submitted study needs a tracking store"):
        check_job_settings(spec())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://m:5000")
    check_job_settings(spec())


def test_a_job_ships_the_program_beside_the_space_and_no_secret(tmp_path):
    import yaml

    from autotune.deploy.jobs import stage

    folder = tmp_path / "config"
    (folder / ".git").mkdir(parents=True)
    (folder / "train.py").write_text("print('hi')\n")
    space = folder / "space.yaml"
    program = {"command": ["python", "train.py", "{metrics_file}"], "env_from": ["HF_TOKEN"]}
    data = {**BASE, "study": {"name": "s"}, "trainable": program,
            "tracking": {"experiment": "e"}}
    space.write_text("# tracking at http://hunter2@m:5000 once\n" + yaml.safe_dump(data))
    root = stage(space, tmp_path / "job", spec_from_data(data))
    shipped = (root / "space.yaml").read_text()
    assert "hunter2" not in shipped and yaml.safe_load(shipped)["trainable"]["cwd"] == "program"
    assert (root / "program" / "train.py").exists() and not (root / "program" / ".git").exists()
    assert (root / "autotune" / "study" / "lease.py").exists() and (root / "trainables").is_dir()
