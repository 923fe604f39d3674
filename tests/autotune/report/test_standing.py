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
