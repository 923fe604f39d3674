"""What a running study prints: a best that is the study's answer (runs pooled, within the cap,
earlier rounds included), and every trial number accounted for."""

from __future__ import annotations

import io
from dataclasses import replace

from autotune.study.progress import Progress, numbers_text
from tests.autotune.report.test_report import lay, make_spec, ok_record, parts_of, study


def _progress(spec, known=()):
    return Progress("unit", 4, None, live=False, stream=io.StringIO(), spec=spec, known=known)


def test_the_best_shown_is_the_study_s_answer_with_runs_pooled():
    spec = make_spec()
    a = ok_record(spec, 0, lay(ep=1), 0.100, parts_of(10))
    b = ok_record(spec, 1, lay(ep=2, dp=1), 0.105, parts_of(10))
    # A re-measure of `a` runs much slower: pooled, `a` falls behind `b`, although its first run
    # alone is the fastest single run the study has seen.
    again = replace(ok_record(spec, 2, a.layout, 0.300, parts_of(10)), remeasure_of=0)
    p = _progress(spec, known=[a, b])
    assert p.best.layout == a.layout
    p.finished(again)
    final = study(spec, [a, b, again]).best()
    assert p.best.layout == final.layout == b.layout and p.best.tokens_per_s == final.tokens_per_s
    assert f"best {b.layout.key} at {b.tokens_per_s:,.0f} tok/s" in p.summary_line()


def test_a_run_over_the_memory_cap_is_never_the_best_shown():
    spec = make_spec()  # 50 MB ranks, cap 90%
    fast_but_over = ok_record(spec, 0, lay(ep=1), 0.050, parts_of(48))
    within = ok_record(spec, 1, lay(ep=2, dp=1), 0.100, parts_of(10))
    p = _progress(spec)
    p.finished(fast_but_over)
    assert p.best is None and "no successful trial yet" in p.summary_line()
    p.finished(within)
    assert p.best.layout == within.layout


def test_proposals_answered_without_a_run_are_listed_once_the_round_ends():
    out = io.StringIO()
    with Progress("unit", 4, None, live=False, stream=out, spec=make_spec()) as p:
        for number, kind in ((7, "repeat"), (9, "repeat"), (10, "repeat"), (11, "repeat"), (12, "twin")):
            p.answered_without_run(number, kind)
    lines = out.getvalue().splitlines()
    assert lines[-2] == ("proposals answered without a run: 4 repeats of a measured layout (trials 7, 9-11); "
                         "1 twin of a running trial (trial 12)")
    assert lines[-1].startswith("[0:00] done 0")


def test_ranks_below_normal_priority_are_said_once_at_the_first_such_trial():
    spec = make_spec()
    out = io.StringIO()
    p = Progress("unit", 4, None, live=False, stream=out, spec=spec)

    def at(number, *nice):
        record = ok_record(spec, number, lay(ep=2, mb=2 + number), 0.1, parts_of(10))
        return replace(record, ranks=tuple({"rank": i, "nice": v} for i, v in enumerate(nice)))

    p.finished(at(0, 0, 0))
    assert "warning" not in out.getvalue()
    p.finished(at(1, 0, 15))
    p.finished(at(2, 15, 15))
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: trial 1's ranks ran at nice 15, below normal")
    assert "RAY_worker_niceness=0" in warnings[0]


def test_numbers_as_ranges():
    assert numbers_text([14, 7, 9, 15, 16]) == "7, 9, 14-16"
    assert numbers_text([3]) == "3" and numbers_text([]) == ""
