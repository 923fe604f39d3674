"""The noise-aware best: runs of a layout pooled, ties with the best in the report and verdict."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from autotune.report.write import build_report, write_report
from autotune.trial_record import TIE_REMEASURE
from tests.autotune.report.test_report import lay, make_spec, md_table, ok_record, parts_of, study


def _again(record, number: int, step_time_s: float, spec, session: int = 0, tie: bool = True):
    """`record`'s layout measured once more, at another step time."""
    fresh = ok_record(spec, number, record.layout, step_time_s, parts_of(10))
    reason = f"{TIE_REMEASURE}, tied within their intervals" if tie else "measured again"
    return replace(fresh, session=session, remeasure_of=record.number, reason=f"{reason} (trial {record.number})")


def test_close_leaders_are_a_tie_in_the_report_and_the_verdict(tmp_path):
    spec = make_spec()
    a = ok_record(spec, 0, lay(ep=1), 0.100, parts_of(10))
    b = ok_record(spec, 1, lay(ep=2, dp=1), 0.102, parts_of(10))  # 2% slower, 3 steps with 15% spread
    c = ok_record(spec, 2, lay(ep=4), 0.200, parts_of(10))  # twice as slow: separated
    result = study(spec, [a, b, c])
    standing = result.standing()
    assert standing["best"]["layout"] == a.layout.key
    assert [t["layout"] for t in standing["tied"]] == [b.layout.key]
    report = build_report(result)
    assert report["verdict"]["tie"] is True
    assert any("statistical tie with 1 layout" in r and b.layout.key in r for r in report["verdict"]["reasons"])
    files = write_report(result, tmp_path)
    md = files.markdown.read_text()
    assert "Statistically tied with it: 1 layout" in md and "Rule: a layout is tied with the best" in md
    rows = md_table(md, "rank | trial")
    assert "(best)" in rows[0][1] and "(tied)" in rows[1][1] and "(tied)" not in rows[2][1]
    lo, hi = rows[0][10].split("-")  # the interval column: 90% bootstrap of 3 steps
    assert float(lo) <= float(rows[0][9]) <= float(hi)
    assert json.loads(files.json.read_text())["standing"]["tied"][0]["layout"] == b.layout.key


def test_a_clear_best_is_said_to_be_separated():
    spec = make_spec()
    result = study(spec, [ok_record(spec, 0, lay(ep=1), 0.100, parts_of(10)),
                          ok_record(spec, 1, lay(ep=2), 0.150, parts_of(10))])
    report = build_report(result)
    assert result.standing()["tied"] == [] and report["verdict"]["tie"] is False
    assert any("separated from every other layout" in r for r in report["verdict"]["reasons"])


def test_runs_of_one_study_run_pool_and_separate_a_tie():
    spec = make_spec()
    a = ok_record(spec, 0, lay(ep=1), 0.100, parts_of(10))
    b = ok_record(spec, 1, lay(ep=2), 0.104, parts_of(10))
    assert study(spec, [a, b]).standing()["tied"]
    again = [_again(a, 2 + 2 * i, 0.100, spec) for i in range(6)] + \
            [_again(b, 3 + 2 * i, 0.125, spec) for i in range(6)]
    result = study(spec, [a, b, *again])
    standing = result.standing()
    assert standing["best"]["layout"] == a.layout.key and standing["tied"] == []
    assert standing["best"]["runs"] == 7 and standing["best"]["steps"] == 21 and standing["remeasures"] == 12
    pooled = {t.layout.key: t for t in result.ok_trials()}
    assert len(pooled) == 2 and len(pooled[b.layout.key].step_times) == 21
    tokens = spec.search.global_batch_size * spec.search.seq_len
    pb = pooled[b.layout.key].metrics
    assert pb["tokens_per_s"] == pytest.approx(tokens / pb["step_time_s"])
    assert pb["step_time_lo_s"] <= pb["step_time_s"] <= pb["step_time_hi_s"]
    rows = build_report(result)["trials"]["top"]
    assert [r["key"] for r in rows] == [a.layout.key, b.layout.key]  # one row per layout
    assert result.changes() is None  # tie re-measures are not drift


def test_a_later_run_of_the_study_replaces_rather_than_pools():
    spec = make_spec()
    a = ok_record(spec, 0, lay(ep=1), 0.100, parts_of(10))
    b = ok_record(spec, 1, lay(ep=2), 0.300, parts_of(10))
    drift = _again(a, 2, 0.400, spec, session=1, tie=False)
    result = study(spec, [a, b, drift])
    assert result.best().layout == b.layout  # a's old measurement no longer counts
    assert result.standing()["best"]["runs"] == 1
    assert result.changes()["remeasured"][0]["layout"] == a.layout.key


def test_one_layout_has_one_interval_wherever_the_report_shows_it(tmp_path):
    """The ranking's interval column is the standing's (widened to the run-to-run spread), for
    the leaders, for a layout measured once and for one over the memory cap."""
    spec = make_spec()
    a = ok_record(spec, 0, lay(ep=1), 0.100, parts_of(10))
    b = ok_record(spec, 1, lay(ep=2), 0.104, parts_of(10))
    c = ok_record(spec, 2, lay(ep=4), 0.300, parts_of(10))
    over = ok_record(spec, 3, lay(ep=2, mb=8), 0.090, parts_of(60))  # 60 MB on a 50 MB rank
    again = [_again(a, 4, 0.110, spec), _again(b, 5, 0.095, spec)]
    result = study(spec, [a, b, c, over, *again])
    report = build_report(result)
    standing = report["standing"]
    by_key = {e["layout"]: e for e in [standing["best"], *standing["tied"]]}
    rows = {r["key"]: r for r in report["trials"]["top"]}
    assert set(by_key) == {a.layout.key, b.layout.key}
    for key, e in by_key.items():
        assert (rows[key]["step_time_lo_s"], rows[key]["step_time_hi_s"]) == (e["step_time_lo_s"], e["step_time_hi_s"])
    shown = result.shown_intervals()
    assert set(shown) == {a.layout.key, b.layout.key, c.layout.key, over.layout.key}
    for key in (c.layout.key, over.layout.key):  # measured once: its 3 steps' interval, widened
        steps_only = result.evidence().intervals.get(key)
        assert rows[key]["step_time_lo_s"] == shown[key].lo and rows[key]["step_time_hi_s"] == shown[key].hi
        assert rows[key]["step_time_lo_s"] < rows[key]["step_time_s"] < rows[key]["step_time_hi_s"]
        if steps_only is not None:
            assert shown[key].hi - shown[key].lo > steps_only.hi - steps_only.lo
    assert rows[over.layout.key]["status"] != "ok"  # ranked below the fitting ones, still with its interval
    md = write_report(result, tmp_path).markdown.read_text()
    top = md_table(md, "rank | trial")
    best_table = md_table(md, "layout | trial")
    assert top[0][10] == best_table[0][4]  # the same interval text in both tables


def test_throughput_stability_is_judged_inside_each_run():
    """Runs of the best at different levels, each steady inside: the check passes and names the
    pooled figure beside; steps that stray inside a run still fail it; one run: p90 / median."""
    spec = make_spec()

    def runs_of(levels, jitter):
        a = ok_record(spec, 0, lay(ep=1), levels[0], parts_of(10))
        a = replace(a, step_times=(levels[0], levels[0] * jitter, levels[0]))
        out = [a]
        for i, level in enumerate(levels[1:], start=1):
            r = _again(a, 10 + i, level, spec)
            out.append(replace(r, step_times=(level, level * jitter, level)))
        return out

    def stable(trials):
        result = study(spec, trials)
        return next(c for c in build_report(result)["checks"] if c["id"] == "throughput_stable")

    steady = stable(runs_of([0.080, 0.100, 0.140], 1.02))
    assert steady["passed"] is True and steady["figure"] == pytest.approx(1.016, abs=0.005)
    assert "9 steps in 3 runs" in steady["detail"] and "the runs pooled: " in steady["detail"]
    pooled = steady["detail"].split("the runs pooled: ")[1]
    assert float(pooled.split(" = ")[1].split(" ")[0]) > 1.25  # what the check used to judge
    jittery = stable(runs_of([0.100, 0.100, 0.100], 1.5))
    assert jittery["passed"] is False and jittery["figure"] > 1.25
    # A run that kept one step says nothing of its own spread: the pooled figure is judged.
    single = [replace(r, step_times=r.step_times[:1]) for r in runs_of([0.080, 0.100, 0.140], 1.0)]
    pooled_only = stable(single)
    assert pooled_only["passed"] is False and "runs" not in pooled_only["detail"]
    one = stable([ok_record(spec, 0, lay(ep=1), 0.100, parts_of(10), step_time_p90_s=0.130)])
    assert one["passed"] is False and one["figure"] == pytest.approx(1.3) and "runs" not in one["detail"]
