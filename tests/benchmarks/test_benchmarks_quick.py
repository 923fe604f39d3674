"""Each benchmark's --quick mode still runs end to end and writes its results.

These check that the scripts work, not their figures: timings on a shared machine are not
asserted anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _check(proc: subprocess.CompletedProcess, *names: str) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = []
    for name in names:
        csv_path, json_path = RESULTS / f"{name}.csv", RESULTS / f"{name}.json"
        assert csv_path.stat().st_size > 0 and len(csv_path.read_text().splitlines()) >= 2, csv_path
        out.append(json.loads(json_path.read_text()))
    return out


def test_trial_overhead_quick():
    (data,) = _check(_run("benchmarks.trial_overhead", "--quick", timeout=240), "trial_overhead_quick")
    assert data["quick"] and data["all_trials_ok"]
    assert {"autotune", "torchtrainer", "ratio_median", "goals_met"} <= set(data)


def test_search_efficiency_quick_replays_the_committed_grid():
    assert (RESULTS / "grid_tiny_cpu.csv").exists(), "the measured grid table is part of the repository"
    (data,) = _check(_run("benchmarks.search_efficiency", "--quick", timeout=180), "search_efficiency_quick")
    assert set(data["strategies"]) == {"grid", "random", "plain-tpe", "autotune", "autotune-tpe",
                                       "autotune-random"}
    assert data["grid_size"] > 0 and data["good_layouts"]


def test_search_efficiency_measure_quick():
    (data,) = _check(_run("benchmarks.search_efficiency", "--measure", "--quick", timeout=180), "grid_tiny_cpu_quick")
    assert data["layouts"] == 3 and data["counts"]["crashed"] == 0
    assert {"cpus", "platform", "torch"} <= set(data["machine"])


def test_fidelity_quick():
    (data,) = _check(_run("benchmarks.fidelity", "--quick", timeout=180), "fidelity_quick")
    assert data["tau_at_quickstart_setting"] is not None and data["settings"]


def test_screening_quick():
    (data,) = _check(_run("benchmarks.screening", "--quick", timeout=180), "screening_quick")
    assert data["identical_verdicts"] and data["candidates"] > 1000


def test_memory_model_quick():
    (data,) = _check(_run("benchmarks.memory_model", "--quick", timeout=300), "memory_model_quick")
    assert data["summary"]["runs"] == 5 and data["summary"]["state_mismatching_runs"] == 0


def test_grad_overlap_quick():
    (data,) = _check(_run("benchmarks.grad_overlap", "--quick", timeout=300), "grad_overlap_quick")
    assert data["quick"] and set(data["layouts"]) == {"DP2", "EP2"}
    for per in data["layouts"].values():
        assert per["flat"]["mem_grads_bytes"] == per["bucketed"]["mem_grads_bytes"] > 0
        assert per["step_time_ratio"] > 0 and per["peak_mem_ratio"] > 0
