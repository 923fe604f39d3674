"""Unit tests of how the study gets its Ray: the settings it asks for on a cluster it connects to (the real
connection: test_faults_study, test_cluster_jobs)."""

from __future__ import annotations

import json

from autotune.study.connect import JOB_CONFIG_ENV, PRIORITY_ENV, WORKER_NICENESS, connected_runtime_env


def test_a_connected_study_asks_for_its_ranks_at_normal_priority():
    assert connected_runtime_env({}) == {"env_vars": {PRIORITY_ENV: str(WORKER_NICENESS)}}
    assert WORKER_NICENESS == 0


def test_the_names_are_rays_own():
    from ray._private import ray_constants
    from ray._private.runtime_env import constants

    assert JOB_CONFIG_ENV == constants.RAY_JOB_CONFIG_JSON_ENV_VAR
    assert PRIORITY_ENV == ray_constants.RAY_WORKER_NICENESS


def test_inside_a_ray_job_its_own_env_vars_merge_and_its_priority_stands():
    # the job's variables are merged by Ray; only one set by both would be refused
    other = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {"working_dir": "x", "env_vars": {"A": "1"}}})}
    assert connected_runtime_env(other) == {"env_vars": {PRIORITY_ENV: "0"}}
    chosen = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {"env_vars": {PRIORITY_ENV: "5"}}})}
    assert connected_runtime_env(chosen) is None
    for broken in ("not json", "[]", json.dumps({"runtime_env": None})):
        assert connected_runtime_env({JOB_CONFIG_ENV: broken}) == {"env_vars": {PRIORITY_ENV: "0"}}


def test_rays_own_merge_takes_ours_beside_the_jobs_and_would_refuse_a_second_priority():
    from ray.runtime_env.runtime_env import _merge_runtime_env  # what ray.init does inside a job

    job = {"working_dir": "x", "env_vars": {"A": "1"}}
    merged = _merge_runtime_env(job, connected_runtime_env({JOB_CONFIG_ENV: json.dumps({"runtime_env": job})}))
    assert merged["env_vars"] == {"A": "1", PRIORITY_ENV: "0"} and merged["working_dir"] == "x"
    assert _merge_runtime_env({"env_vars": {PRIORITY_ENV: "5"}}, connected_runtime_env({})) is None
