"""One resolution of a study's settings: the environment over the space file over defaults."""

from __future__ import annotations



from autotune.settings import resolve, resolve_settings
from autotune.space.spec import spec_from_data

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


def test_ui_on_a_tracking_server_prints_its_address_without_the_credential(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://admin:hunter2@mlflow.example:5000"}
    out = subprocess.run([sys.executable, "-m", "autotune.cli", "ui"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "http://admin:***@mlflow.example:5000" in out.stdout and "hunter2" not in out.stdout + out.stderr
