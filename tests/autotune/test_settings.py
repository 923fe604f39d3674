"""One resolution of a study's settings (environment over space file over defaults) and the masking
of credentials in URLs and text."""

from __future__ import annotations


import pytest

from autotune.redaction import redact, redact_url, written_secrets
from autotune.settings import resolve, resolve_settings
from autotune.spec import spec_from_data

BASE = {"cluster": {"ranks": 1, "memory_gb": 1}, "search": {"global_batch_size": 8, "seq_len": 16}}


def spec(**study):
    tracking = study.pop("tracking", {})
    trainable = study.pop("trainable", None)
    data = {**BASE, "study": {"name": "s", **study}, "tracking": tracking}
    if trainable:
        data["trainable"] = trainable
    return spec_from_data(data)


def test_defaults_are_absolute_and_the_journal_lives_in_the_runs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = resolve_settings(spec(), environ={})
    assert s.runs_dir == tmp_path / "autotune-runs"
    assert s.storage == str(tmp_path / "autotune-runs" / "s" / "optuna.journal")
    assert s.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s.ray_address is None
    assert dict(s.origin) == {"runs_dir": "default", "storage": "default", "tracking_uri": "default",
                              "ray_address": "default"}


def test_the_space_file_over_defaults_and_relative_storage_against_the_runs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = resolve_settings(spec(output_dir="out", storage="nightly.journal", tracking={"uri": "http://m:5000"}),
                         environ={})
    assert s.runs_dir == tmp_path / "out" and s.storage == str(tmp_path / "out" / "nightly.journal")
    assert s.tracking_uri == "http://m:5000"
    assert s.origin["runs_dir"] == "study.output_dir" and s.origin["storage"] == "study.storage"


def test_the_environment_over_the_space_file(tmp_path):
    env = {"AUTOTUNE_RUNS_DIR": str(tmp_path / "runs"), "AUTOTUNE_STORAGE": "postgresql+psycopg://db/optuna",
           "MLFLOW_TRACKING_URI": "http://mlflow:5000", "RAY_ADDRESS": "head:6379"}
    sp = spec(output_dir="elsewhere", storage="x.journal", tracking={"uri": "http://other:5000"})
    s = resolve_settings(sp, environ=env)
    assert (s.runs_dir, s.storage, s.tracking_uri, s.ray_address) == (
        tmp_path / "runs", "postgresql+psycopg://db/optuna", "http://mlflow:5000", "head:6379")
    assert s.origin["storage"] == "AUTOTUNE_STORAGE" and s.origin["tracking_uri"] == "MLFLOW_TRACKING_URI"
    # a relative AUTOTUNE_STORAGE path is in the runs folder too; --address beats RAY_ADDRESS
    s = resolve_settings(sp, environ={**env, "AUTOTUNE_STORAGE": "a/b.journal"}, address="other:1")
    assert s.storage == str(tmp_path / "runs" / "a" / "b.journal") and s.ray_address == "other:1"
    # the resolved spec carries the values, and resolving it again changes nothing
    once = resolve(sp, env)
    assert once.study.directory() == tmp_path / "runs" / "s" and once.tracking.uri == "http://mlflow:5000"
    assert resolve(once, env) == once


@pytest.mark.parametrize("text,shown", [
    ("postgresql://user:hunter2@db/x", "postgresql://user:***@db/x"),
    ("postgresql://:hunter2@db/x", "postgresql://:***@db/x"),
    ("postgresql://db/x?sslmode=require&password=hunter2", "postgresql://db/x?sslmode=require&password=***"),
    ("http://hunter2@mlflow:5000", "http://***@mlflow:5000"),
    ("https://user:hunter2@mlflow", "https://user:***@mlflow"),
    ("cannot reach 'postgresql+psycopg://u:hunter2@db:5432/o' (refused)", "cannot reach 'postgresql+psycopg://u:***@db:5432/o' (refused)"),
    ("postgresql://user@db/x", "postgresql://user@db/x"),  # a user name is no secret
    ("http://mlflow:5000", "http://mlflow:5000"),
])
def test_credentials_are_masked_in_urls_and_text(text, shown):
    assert redact(text) == shown
    assert "hunter2" not in redact_url(text)


def test_database_urls_are_rendered_by_sqlalchemy():
    assert redact_url("postgresql+psycopg://u:p%40ss@db:5432/optuna") == "postgresql+psycopg://u:***@db:5432/optuna"


def test_a_space_that_would_write_a_secret_into_a_job_says_which_field():
    assert written_secrets(spec(storage="postgresql://u:pw@db/o")).startswith("study.storage:")
    assert written_secrets(spec(tracking={"uri": "http://tok@m:5000"})).startswith("tracking.uri:")
    program = {"command": ["prog", "{metrics_file}"], "env": {"HF_TOKEN": "abc"}}
    assert written_secrets(spec(trainable=program)).startswith("trainable.env:")
    assert written_secrets(spec(trainable={**program, "env": {}, "env_from": ["HF_TOKEN"]})) is None
    assert written_secrets(spec(storage="postgresql://u@db/o")) is None


def test_a_job_refuses_state_that_dies_with_it(monkeypatch, tmp_path):
    from autotune.jobs import JobError, check_job_settings

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

    from autotune.jobs import stage

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
    assert (root / "autotune" / "lease.py").exists() and (root / "trainables").is_dir()


def test_ui_on_a_tracking_server_prints_its_address_without_the_credential(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://admin:hunter2@mlflow.example:5000"}
    out = subprocess.run([sys.executable, "-m", "autotune.cli", "ui"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "http://admin:***@mlflow.example:5000" in out.stdout and "hunter2" not in out.stdout + out.stderr
