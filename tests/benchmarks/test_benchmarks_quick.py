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


def test_warm_workers_quick():
    (data,) = _check(_run("benchmarks.warm_workers", "--quick", timeout=600), "warm_workers_quick")
    assert data["all_trials_ok"] and [r["side"] for r in data["studies"]] == ["default", "warm"]
    default, warm = data["studies"]
    assert default["soft_limit"] == -1 and warm["soft_limit"] > 0 and warm["rank_starts"] > 0


def test_search_efficiency_quick_replays_a_published_table_in_its_own_columns(tmp_path):
    """A table in the documented columns only (no layout key, no seconds) and a space given by path."""
    import csv

    space = ROOT / "benchmarks" / "spaces" / "tiny_cpu.yaml"
    src = list(csv.DictReader((RESULTS / "grid_tiny_cpu.csv").open()))
    cols = ["ep", "tp", "pp", "dp", "micro_batch_size", "precision", "recompute", "schedule", "status",
            "tokens_per_s", "peak_mem_bytes"]
    table = tmp_path / "table.csv"
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(src[::2])  # half the layouts: the others were not measured
    (data,) = _check(_run("benchmarks.search_efficiency", "--quick", "--space", str(space), "--table", str(table),
                          timeout=180), "search_efficiency_table_quick")
    assert data["table"].endswith("table.csv") and data["strategies"]["autotune"]["seconds_median"] > 0


def test_the_simulator_writes_the_committed_tables_and_every_family_replays(tmp_path):
    """The held-out tables are what benchmarks/moe_simulator.py writes (seeded, so the same bytes),
    and the replay of every family runs with all its strategies."""
    proc = _run("benchmarks.moe_simulator", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("sim_h100", "sim_a100_64"):
        assert (tmp_path / f"{name}.csv").read_text() == (RESULTS / f"{name}.csv").read_text()
    (data,) = _check(_run("benchmarks.search_efficiency", "--all", "--quick", timeout=600), "search_efficiency_all_quick")
    assert [t["label"] for t in data["tables"]] == ["tiny_cpu", "tiny_cpu_pp", "sim_h100", "sim_a100_64"]
    for t in data["tables"]:
        assert t["seeds"] == 2 and set(t["goals_met"]) >= {"autotune_median_le_8", "autotune_worst_le_20"}
        assert t["grid_size"] > 0 and t["good_layouts"]
        assert set(t["strategies"]) == {"grid", "random", "plain-tpe", "autotune-no-model", "frontier-only",
                                        "opening-only", "previous", "model-only", "autotune"}
        for s in t["strategies"].values():
            assert 0 <= s["best_after_5_median"] <= s["best_after_20_median"] <= 1 and s["seconds_median"] >= 0
    # The CPU grids are replayed over what a live study here starts from: this machine's cluster
    # profile; the simulated families over their own device profiles.
    profiles = {t["label"]: t["profile"] for t in data["tables"]}
    assert all(profiles[k].startswith("the cluster profile of this machine") for k in ("tiny_cpu", "tiny_cpu_pp"))
    assert profiles["sim_h100"] == "the space's H100-SXM profile", profiles


def test_steptime_tables_quick():
    (data,) = _check(_run("benchmarks.steptime_tables", "--quick", timeout=120), "steptime_tables_quick")
    names = {t["table"] for t in data["tables"]}
    assert {"qwen3_235b_h100_megatron", "bloom_181b_a100_gbs2048", "grid_tiny_cpu"} <= names
    for t in data["tables"]:
        assert t["tau_uncalibrated"] is not None and -1 <= t["tau_uncalibrated"] <= 1
    # Issue 24's goals are judged per published table: tau on those of >= 5 rows, the leave-one-out
    # top pick's shortfall (the measured best's share it misses) on every MoE one, whatever its rows;
    # the MoE tables of >= 5 rows are counted.
    tables = {t["table"]: t for t in data["tables"]}
    judged = set(data["published_goals_met"])
    assert judged == {k for k, t in tables.items() if t["published"] and (t["rows"] >= data["goal_min_rows"] or t["moe"])}
    assert "grid_tiny_cpu" not in judged and "qwen3_235b_h100_megatron" in judged  # measured here; MoE of 4 rows
    assert "gpt_1b3_v100_megatron_ds" in judged  # dense, 15 rows
    for t in tables.values():
        assert 0 <= t["loo_top_pick_shortfall"] < 1 and 0 <= t["uncalibrated_top_pick_shortfall"] < 1
        assert (t["uncalibrated_top_pick_shortfall"] == 0) == (t["best_predicted_uncalibrated"] == t["best_measured"])
    for k in judged:  # a MoE table's verdict follows its top pick; a dense table's never does
        if tables[k]["moe"] and tables[k]["loo_top_pick_shortfall"] > data["goal_top_pick_shortfall"]:
            assert data["published_goals_met"][k] is False
    assert data["published_moe_tables"] == sum(1 for k in judged if tables[k]["moe"]
                                               and tables[k]["rows"] >= data["goal_min_rows"])
    # The fixed cost per layer and micro-batch, from the layouts a table has at two micro-batch sizes.
    split = tables["qwen3_30b_h100_megatron_bridge"]["fixed_costs"]
    assert len(split) == 2 and all(c["micro_batch_sizes"] == [1, 4] for c in split)
    assert not tables["qwen3_235b_h800_pai_megatron"]["fixed_costs"]  # every row at micro-batch 1


def test_seed_opening_quick():
    (data,) = _check(_run("benchmarks.seed_opening", "--quick", timeout=120), "seed_opening_quick")
    assert len(data["opening"]) == 10 and data["bubble_check_met"]
    assert data["first_ratio_vs_rules_of_thumb"] > 1


def test_search_efficiency_measure_quick():
    (data,) = _check(_run("benchmarks.search_efficiency", "--measure", "--quick", timeout=180), "grid_tiny_cpu_quick")
    assert data["layouts"] == 3 and data["counts"]["crashed"] == 0
    assert {"cpus", "platform", "torch"} <= set(data["machine"])


def test_fidelity_quick():
    (data,) = _check(_run("benchmarks.fidelity", "--quick", timeout=600), "fidelity_quick")
    assert len(data["studies"]) == 2 and data["true_best"]["layout"]
    for s in data["studies"]:  # each study's pick was measured long, so its regret is known
        assert s["regret"] is not None and s["regret"] >= 0 or s["true_best_tied_with_pick"]
    assert len(data["tau_noise_floor_long_rounds"]) == 1


def test_screening_quick():
    (data,) = _check(_run("benchmarks.screening", "--quick", timeout=180), "screening_quick")
    assert data["identical_verdicts"] and data["identical_predictions"] and data["candidates"] > 1000


def test_memory_model_quick():
    (data,) = _check(_run("benchmarks.memory_model", "--quick", timeout=300), "memory_model_quick")
    assert data["summary"]["runs"] == 5 and data["summary"]["state_mismatching_runs"] == 0


def test_grad_overlap_quick():
    (data,) = _check(_run("benchmarks.grad_overlap", "--quick", timeout=300), "grad_overlap_quick")
    assert data["quick"] and set(data["layouts"]) == {"DP2", "EP2"}
    for per in data["layouts"].values():
        assert per["flat"]["mem_grads_bytes"] == per["bucketed"]["mem_grads_bytes"] > 0
        assert per["step_time_ratio"] > 0 and per["peak_mem_ratio"] > 0


def _gpu_check(out: Path, *args: str, env: dict[str, str] | None = None, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(out), *args],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check_cpu.json").read_text())


def test_gpu_check_on_cpu_runs_every_part(tmp_path):
    """The device check's own command with --device cpu: the tiny preset through every part."""
    data = _gpu_check(tmp_path, timeout=1300)
    parts = data["parts"]
    assert {p: parts[p]["status"] for p in ("small", "moe64e", "kernels", "world", "study")} == dict.fromkeys(
        ("small", "moe64e", "kernels", "world", "study"), "ok"), parts
    for name in ("small", "moe64e"):
        run = parts[name]
        assert run["tokens_per_s"] > 0 and run["mfu_vs_matmul"] > 0
        assert 0.8 < run["alloc_bytes"] / run["pred_alloc_bytes"] < 1.25  # the memory model on a real run
    # As many layers as fit the CPU budget by the memory model, and no more.
    assert 1 <= parts["moe64e"]["n_layers"] <= 4 and parts["moe64e"]["pred_alloc_bytes"] <= parts["moe64e"]["fit_budget_bytes"]
    study = parts["study"]
    assert study["best_layout"] and study["tokens_per_s"] > 0 and study["trial_counts"].get("ok", 0) >= 1
    assert (tmp_path / "gpu_check_cpu_study_report.md").stat().st_size > 0
    # The cluster profile the study measured before its first trial is kept with the figures.
    probe = study["cluster_probe"]
    assert probe["error"] is None and probe["device"] == "cpu", probe
    assert probe["gemm_tflops"]["fp32"]["dense"] > 0 and probe["copy_gb_s"] > 0 and probe["layer"]["seconds"] > 0
    assert bool(probe["fits"]) == (probe["world"] > 1)  # one rank has no collectives to time
    kernels = {k["part"]: k for k in parts["kernels"]["parts"]}
    assert parts["kernels"]["kernel_goal_met"] and kernels["layer"]["kernels_grouped"] <= 24 < kernels["layer"]["kernels_loop"]
    (world,) = parts["world"]["runs"]  # 4 CPU ranks over gloo: EP and TP at once
    assert world["status"] == "ok" and world["world_size"] == 4 and world["dims"] == {"ep": 2, "tp": 2, "pp": 1, "dp": 1}
    assert 0.8 < world["alloc_bytes"] / world["pred_alloc_bytes"] < 1.25 and len(world["rank_memory"]) == 4
    assert data["probe"]["torch_build"]["git"]
    rows = (tmp_path / "gpu_check_cpu.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("part,status")  # small, moe64e, kernels, one world run, study


def test_gpu_check_skips_the_study_without_the_tuner(tmp_path):
    """Where ray/optuna/mlflow/pydantic do not import (the GPU machine), the study part says so."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'mlflow'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Absent())\n")
    data = _gpu_check(tmp_path / "out", "--parts", "study", env={"PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"},
                      timeout=300)
    study = data["parts"]["study"]
    assert study["status"] == "skipped" and "ray, mlflow not installed" in study["reason"]
    assert data["probe"]["name"] == "cpu" and "small" not in data["parts"]


def test_early_stop_quick():
    (data,) = _check(_run("benchmarks.early_stop", "--quick", timeout=400), "early_stop_quick")
    assert data["quick"] and [r["early_stop"] for r in data["runs"]] == [False, True]
    assert all(r["trials"] == 2 and r["failed"] == 0 for r in data["runs"])
    assert {"steps_saved", "wall_s_saved", "steps_ratio", "wall_ratio", "best_no_worse", "goals_met"} <= set(data)
    # Both picks judged by runs of their own, outside the studies.
    assert all(r["best_true_tokens_per_s"] > 0 for r in data["runs"])
    assert set(data["true_tokens_per_s"]) == {r["best"] for r in data["runs"]}
    assert len(data["pair_true_ratios"]) == 1
