"""`autotune validate` ranks by predicted tokens/s, shows the terms, calibrates on a study's
trials (--from) and answers for other clusters (--ranks, --profile), marked as extrapolated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from autotune.predict.candidates import screen
from autotune.predict.steptime import TERMS
from autotune.schema import Status
from autotune.search.searcher import LayoutSearcher, create_study, open_storage
from autotune.space.spec import spec_from_data
from autotune.study.speed import speed_model_for
from autotune.study.store import PROFILE_ATTR, SPEC_ATTR
from autotune.trial_record import TrialRecord

ROOT = Path(__file__).resolve().parents[3]
QUICK = ROOT / "search_spaces" / "quickstart-cpu.yaml"
SEED = ROOT / "search_spaces" / "seed-16x80gb.yaml"


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autotune.cli", "validate", *args], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_candidates_are_ranked_by_predicted_speed_with_their_terms():
    proc = _cli(str(QUICK), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    fitting = [c for c in data["candidates"] if c["verdict"] == "fits"]
    speeds = [c["pred_tokens_per_s"] for c in fitting]
    assert speeds == sorted(speeds, reverse=True) and not data["extrapolated"]
    first = fitting[0]
    assert set(first["pred_terms_s"]) == set(TERMS)
    assert abs(sum(first["pred_terms_s"].values()) - first["pred_step_time_s"]) < 1e-9
    table = _cli(str(QUICK), "--limit", "5")
    assert table.returncode == 0 and "pred tok/s" in table.stdout and "uncalibrated" in table.stdout


def test_the_table_fits_100_columns_and_the_terms_are_behind_a_flag():
    """As a pipe or a CI log reads it (no terminal): every line within 100 characters, fitting and
    excluded rows alike; --terms adds a column per step-time term."""
    plain = _cli(str(SEED), "--limit", "2000")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert any("over memory cap" in line for line in lines) and any("invalid: " in line for line in lines)
    assert "ep a2a" not in plain.stdout and "--terms" in plain.stdout
    wide = _cli(str(SEED), "--limit", "5", "--terms")
    assert wide.returncode == 0 and all(t in wide.stdout for t in ("ep a2a", "dp grad", "bubble"))
    assert max(len(line) for line in wide.stdout.splitlines()) > 100


def test_another_cluster_is_answered_and_marked_extrapolated():
    proc = _cli(str(SEED), "--json", "--ranks", "64", "--profile", "B200")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["extrapolated"] and "EXTRAPOLATED" in data["step_time_model"] and data["device_profile"] == "B200"
    assert {c["world_size"] for c in data["candidates"]} == {64}
    bad = _cli(str(SEED), "--ranks", "20")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --ranks") and "multiple of 8" in bad.stderr


def test_from_a_study_calibrates_on_its_trials(tmp_path):
    data = yaml.safe_load(QUICK.read_text())
    data["study"] = {"name": "calib", "output_dir": str(tmp_path)}
    spec = spec_from_data(data)
    (tmp_path / "calib").mkdir()
    study = create_study(spec, open_storage(spec.study.storage_url()), load_if_exists=False)
    study.set_user_attr(SPEC_ATTR, json.loads(spec.model_dump_json()))
    speed = speed_model_for(spec, study)  # measures this CPU once and keeps the figures in the study
    assert study.user_attrs[PROFILE_ATTR]["sources"]["measured"]
    sc = screen(spec)

    def on_complete(trial_id, result, error):
        cfg = result["autotune_config"]
        layout = next(c.layout for c in sc.candidates if c.layout.key == cfg["layout_key"])
        # a made-up machine twice as slow as the uncalibrated model says
        step = 2 * speed.predict([layout]).step_time_s[0]
        return TrialRecord(number=cfg["number"], layout=layout, status=Status.OK, prediction=cfg["prediction"],
                           metrics={"tokens_per_s": 1024 / step, "step_time_s": step})

    searcher = LayoutSearcher(spec, sc, study, lambda n, lay, c: {"number": n, "layout_key": lay.key},
                              lambda r: r, on_complete, 5, speed=speed)
    for i in range(5):
        cfg = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {}, False)
        assert "pred_tokens_per_s" in cfg["prediction"]
    proc = _cli(str(QUICK), "--json", "--from", "calib", "--dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "calibrated on 5 measured trials of study 'calib'" in out["step_time_model"]
    # Calibrated predictions are twice the study's uncalibrated ones (the measurements said so).
    by_key = {c.layout.key: c.layout for c in sc.candidates}
    for c in [c for c in out["candidates"] if c["verdict"] == "fits"][:5]:
        assert abs(c["pred_step_time_s"] / speed.predict([by_key[c["layout"]]]).step_time_s[0] - 2) < 0.1
    missing = _cli(str(QUICK), "--from", "nope", "--dir", str(tmp_path))
    assert missing.returncode == 2 and missing.stderr.startswith("error: --from:")
