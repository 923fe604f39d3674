"""Unit tests of the study runner's Ray connection settings (the real connection: test_faults_study)."""
from __future__ import annotations

import json

from autotune.study.runner import PRIORITY_ENV, WORKER_NICENESS, connected_runtime_env


def test_a_connected_study_asks_for_its_ranks_at_normal_priority():
    assert connected_runtime_env({}) == {"env_vars": {PRIORITY_ENV: str(WORKER_NICENESS)}}
    assert WORKER_NICENESS == 0


def test_inside_a_ray_job_its_own_env_vars_merge_and_its_priority_stands():
    # the job's variables are merged by Ray; only one set by both would be refused
    other = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "x", "env_vars": {"A": "1"}}})}
    assert connected_runtime_env(other) == {"env_vars": {PRIORITY_ENV: "0"}}
    chosen = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": {PRIORITY_ENV: "5"}}})}
    assert connected_runtime_env(chosen) is None
    for broken in ("not json", "[]", json.dumps({"runtime_env": None})):
        assert connected_runtime_env({"RAY_JOB_CONFIG_JSON_ENV_VAR": broken}) == {"env_vars": {PRIORITY_ENV: "0"}}
