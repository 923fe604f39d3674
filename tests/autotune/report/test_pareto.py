"""Pareto studies: the report lists the front with headroom, picks by the stated rule and says so;
early-stopped trials keep and show their partial figures."""

from __future__ import annotations

import json

from autotune.report.write import build_report, render_markdown, write_report
from autotune.schema import Status
from autotune.space.spec import spec_from_data
from autotune.trial_record import TrialRecord
from tests.autotune.report.test_report import lay, ok_record, parts_of, study


def pareto_spec(headroom: float | None = None):
    objective = {"minimize": "peak_mem_bytes"} | ({"deploy_headroom": headroom} if headroom is not None else {})
    return spec_from_data({
        "model": {"preset": "tiny"}, "cluster": {"ranks": 4, "device": "cpu", "memory_gb": 0.05},
        "search": {"ep": [1, 2, 4], "world_sizes": [1, 2, 4], "micro_batch_size": [2, 8],
                   "global_batch_size": 16, "seq_len": 64},
        "objective": objective, "study": {"name": "front"}})


def trials(spec):
    # 50 MB ranks, cap 45 MB. Front: #1 (fast, 44 MB), #2 (middle, 30 MB), #3 (slow, 12 MB).
    # #4 is dominated by #2 (slower and larger); #5 was stopped early.
    return [ok_record(spec, 1, lay(ep=4, dp=1), 0.10, parts_of(44)),
            ok_record(spec, 2, lay(ep=2, dp=2), 0.20, parts_of(30)),
            ok_record(spec, 3, lay(ep=1, dp=4, recompute="full"), 0.40, parts_of(12)),
            ok_record(spec, 4, lay(ep=2, dp=2, mb=8), 0.25, parts_of(35)),
            TrialRecord(5, lay(ep=1, dp=1), Status.EARLY_STOPPED, reason="stopped after 2 measured steps: slower",
                        metrics={"tokens_per_s": 900.0, "step_time_s": 1.1}, step_times=(1.0, 1.2))]


def test_the_front_lists_each_non_dominated_layout_with_headroom_and_the_pick():
    spec = pareto_spec()
    report = build_report(study(spec, trials(spec)))
    front = report["front"]
    assert [m["number"] for m in front["members"]] == [3, 2, 1]  # by peak memory
    by = {m["number"]: m for m in front["members"]}
    assert by[2]["headroom_bytes"] == 50_000_000 - by[2]["peak_mem_bytes"]
    assert abs(by[2]["headroom_fraction"] - 0.4) < 1e-6
    # Default rule: the fastest on the front leaving 20% (10 MB) free: #1 leaves 6 MB, so #2.
    assert front["pick"] == 2 and by[2]["pick"] and front["rule_met"] is True
    assert report["best"]["number"] == 2
    assert "deploy_headroom = 0.2" in front["rule"]
    assert report["verdict"]["reasons"][0].startswith("deployment pick: trial #2")
    assert front["rule"] in report["verdict"]["reasons"][0]
    md = render_markdown(report)
    assert "## Pareto front" in md and "Deployment pick: trial #2, by the rule:" in md
    assert "| #1 | EP4_TP1_PP1_DP1/mb2/fp32/none/1f1b |" in md and "| #4 |" not in md.split("## Stopped")[0] \
        .split("## Pareto front")[1]


def test_the_rule_follows_the_headroom_field_and_says_when_no_layout_meets_it():
    spec = pareto_spec(headroom=0.05)
    assert build_report(study(spec, trials(spec)))["front"]["pick"] == 1  # 6 MB free >= 2.5 MB
    spec = pareto_spec(headroom=0.9)  # nothing leaves 45 MB free
    report = build_report(study(spec, trials(spec)))
    assert report["front"]["pick"] == 3 and report["front"]["rule_met"] is False
    assert any("no layout on the Pareto front leaves 90%" in w for w in report["verdict"]["warnings"])


def test_report_json_carries_the_front_and_stopped_trials_keep_partial_figures(tmp_path):
    spec = pareto_spec()
    files = write_report(study(spec, trials(spec)), tmp_path)
    data = json.loads(files.json.read_text())
    assert [m["key"] for m in data["front"]["members"]][0] == "EP1_TP1_PP1_DP4/mb2/fp32/full/1f1b"
    stopped = data["stopped"]
    assert [s["number"] for s in stopped] == [5]
    assert stopped[0]["measured_steps"] == 2 and stopped[0]["tokens_per_s"] == 900.0
    assert stopped[0]["step_time_lo_s"] <= 1.1 <= stopped[0]["step_time_hi_s"]
    md = files.markdown.read_text()
    assert "## Stopped early" in md and "| #5 |" in md


def test_a_single_objective_study_keeps_its_fastest_best_and_shows_no_front_section():
    spec = spec_from_data({**json.loads(pareto_spec().model_dump_json()), "objective": {}})
    report = build_report(study(spec, trials(spec)))
    assert report["best"]["number"] == 1 and report["front"]["pareto_study"] is False
    assert "## Pareto front" not in render_markdown(report)
