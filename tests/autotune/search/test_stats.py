"""autotune.search.stats: bootstrap intervals on step time, ties with the best, the re-measuring rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autotune.search.stats import (Interval, RunSpread, leaders_to_remeasure, runs_interval, separated,
                            step_time_interval, tied_with_best)


def test_interval_covers_the_true_median_about_as_often_as_claimed():
    # Step times with a heavy right tail (a shared machine): lognormal around 0.1 s, true median 0.1.
    rng = np.random.default_rng(7)
    hits = 0
    runs = 300
    for i in range(runs):
        steps = 0.1 * np.exp(rng.normal(0.0, 0.2, size=15))
        iv = step_time_interval(steps, seed=i)
        assert iv.lo <= iv.median <= iv.hi and iv.n == 15
        hits += iv.lo <= 0.1 <= iv.hi
    assert 0.8 <= hits / runs <= 0.98, hits / runs


def test_interval_narrows_with_more_steps_and_is_reproducible():
    rng = np.random.default_rng(1)
    steps = list(0.1 * np.exp(rng.normal(0.0, 0.2, size=200)))
    few, many = step_time_interval(steps[:4]), step_time_interval(steps)
    assert many.hi - many.lo < (few.hi - few.lo) / 2
    assert step_time_interval(steps[:10]) == step_time_interval(steps[:10])
    assert many.median == pytest.approx(float(np.median(steps)))


def test_fewer_than_two_steps_never_separate():
    one, none = step_time_interval([0.5]), step_time_interval([])
    assert one.median == 0.5 and one.hi == math.inf and not one.known
    assert none.n == 0 and math.isnan(none.median)
    fast = step_time_interval([0.01, 0.011, 0.012])
    assert not separated(one, fast) and not separated(fast, one)
    assert one.as_metrics() == {}
    assert set(fast.as_metrics()) == {"step_time_lo_s", "step_time_hi_s"}


def test_separated_only_when_intervals_do_not_overlap():
    a = Interval(1.0, 0.9, 1.1, 5)
    assert separated(a, Interval(1.3, 1.2, 1.4, 5))
    assert not separated(a, Interval(1.15, 1.05, 1.3, 5))
    assert separated(Interval(0.5, 0.4, 0.6, 5), a)


def test_tied_with_best_names_the_fastest_and_its_overlapping_rivals():
    intervals = {"a": Interval(1.0, 0.9, 1.1, 5), "b": Interval(1.05, 1.0, 1.2, 5),
                 "c": Interval(1.5, 1.4, 1.6, 5), "d": Interval(1.02, 0.0, math.inf, 1),
                 "e": Interval(math.nan, 0.0, math.inf, 0)}
    best, tied = tied_with_best(intervals)
    assert best == "a" and tied == ["d", "b"]
    assert leaders_to_remeasure(intervals) == ["a", "d", "b"]
    assert leaders_to_remeasure(intervals, max_leaders=2) == ["a", "d"]
    assert tied_with_best({}) == (None, [])


def test_separated_best_needs_no_remeasuring():
    intervals = {"a": Interval(1.0, 0.9, 1.1, 5), "c": Interval(1.5, 1.4, 1.6, 5)}
    assert tied_with_best(intervals) == ("a", [])
    assert leaders_to_remeasure(intervals) == []


def test_more_runs_separate_what_single_short_runs_cannot():
    # Two layouts 10% apart with 8% step noise: 3 steps each overlap, 8 runs of 3 separate.
    rng = np.random.default_rng(3)
    runs_a = [list(1.0 * np.exp(rng.normal(0, 0.08, 3))) for _ in range(8)]
    runs_b = [list(1.1 * np.exp(rng.normal(0, 0.08, 3))) for _ in range(8)]
    assert not separated(step_time_interval(runs_a[0]), step_time_interval(runs_b[0]))
    assert separated(runs_interval(runs_a), runs_interval(runs_b))


def test_run_to_run_spread_widens_the_interval():
    # Steps inside each run agree closely, but one of three runs of the layout is 30% slower
    # (the machine's load changed): the interval reaches it, where pooled steps would not.
    rng = np.random.default_rng(5)
    runs = [list(c * (1 + 0.005 * rng.standard_normal(10))) for c in (1.0, 1.0, 1.3)]
    iv = runs_interval(runs)
    flat = step_time_interval([t for r in runs for t in r])
    assert iv.hi > 1.25 and flat.hi < 1.1
    assert runs_interval([[1.0, 1.1], [1.2, 1.3, 1.4]]).n == 5  # runs of unequal length


def test_throughput_bounds_swap():
    lo, mid, hi = Interval(0.5, 0.4, 0.8, 5).throughput(1000)
    assert (lo, mid, hi) == (1250.0, 2000.0, 2500.0)


def test_run_spread_pools_the_layouts_measured_more_than_once():
    # Two layouts measured twice, one once: the once-measured one adds nothing.
    runs = {"a": [[1.0, 1.0, 1.0], [1.2, 1.2, 1.2]], "b": [[2.0, 2.1], [2.0, 1.9]], "c": [[5.0, 5.0]]}
    spread = RunSpread.of(runs)
    da, db = math.log(1.2 / 1.0), math.log(2.05 / 1.95)  # medians' log gaps; each pair's SS is gap^2 / 2
    assert spread.dof == 2 and spread.sd == pytest.approx(math.sqrt((da * da / 2 + db * db / 2) / 2))
    assert not RunSpread.of({"c": [[5.0, 5.0]]}).known and RunSpread.of({}).margin(1, 1) == 0.0


def test_run_spread_estimate_is_near_the_truth_and_its_margin_covers_repeat_gaps():
    # Runs of one layout whose level moves 15% (lognormal) from run to run, steps inside a run
    # within 1%: the pooled estimate finds the 15%, and the margin for two single runs covers
    # the gap between two fresh runs of one layout about as often as claimed (90%).
    rng = np.random.default_rng(11)

    def run(level: float) -> list[float]:
        base = level * math.exp(rng.normal(0, 0.15))
        return list(base * (1 + 0.01 * rng.standard_normal(4)))

    spread = RunSpread.of({i: [run(1.0 + i), run(1.0 + i)] for i in range(40)})
    assert spread.dof == 40 and 0.11 < spread.sd < 0.19
    gaps = [abs(math.log(np.median(run(1.0)) / np.median(run(1.0)))) for _ in range(400)]
    covered = sum(g <= spread.margin(1, 1) for g in gaps) / len(gaps)
    assert 0.8 <= covered <= 0.97, covered
    assert spread.margin(4, 4) == pytest.approx(spread.margin(1, 1) / 2)


def test_run_spread_ties_what_the_steps_alone_call_separated():
    # Tight steps, 10% apart: the intervals do not overlap; with a 15% run-to-run spread from
    # 6 repeats they are a tie, and with a 1% spread they are not.
    a, b = step_time_interval([1.0, 1.001, 0.999]), step_time_interval([1.1, 1.101, 1.099])
    intervals, runs = {"a": a, "b": b}, {"a": 1, "b": 1}
    assert tied_with_best(intervals) == ("a", [])
    assert tied_with_best(intervals, RunSpread(0.15, 6), runs) == ("a", ["b"])
    assert tied_with_best(intervals, RunSpread(0.01, 6), runs) == ("a", [])
    wide = RunSpread(0.15, 6).widen(a, 1)
    assert wide.lo < 0.8 < 1.25 < wide.hi and RunSpread(0.15, 6).widen(a, 4).hi < wide.hi


def test_a_best_measured_once_goes_again_with_its_closest_rivals():
    intervals = {"a": Interval(1.0, 0.99, 1.01, 3), "b": Interval(1.5, 1.49, 1.51, 3),
                 "c": Interval(1.3, 1.29, 1.31, 3), "d": Interval(2.0, 1.99, 2.01, 3)}
    assert leaders_to_remeasure(intervals) == []  # separated, and no run counts given
    assert leaders_to_remeasure(intervals, runs={"a": 1, "b": 1, "c": 1, "d": 1}) == ["a", "c", "b"]
    # Measured twice and still separated under a small spread: done.
    assert leaders_to_remeasure(intervals, spread=RunSpread(0.02, 3), runs={"a": 2, "b": 2, "c": 2, "d": 1}) == []
    # ... under a large one, the tied rivals go again with it.
    assert leaders_to_remeasure(intervals, spread=RunSpread(0.3, 3), runs={"a": 2, "b": 2, "c": 2, "d": 1}) == [
        "a", "c", "b"]


def test_with_the_prior_run_spread_a_single_run_interval_covers_the_layouts_true_speed():
    """Runs of one layout move 10% (log sd) from run to run, steps inside a run 3%: the default 5
    measured steps of one run say where that run fell, not where the layout's median lies. Widened
    by the run-to-run spread the study assumes until it measures its own, the interval covers
    the layout's true median at least 85% of the time; the steps alone do not."""
    from autotune.space.sections import BudgetSpec
    from autotune.search.stats import PRIOR_RUN_SD

    steps = BudgetSpec().measure_steps
    rng = np.random.default_rng(3)
    prior = RunSpread().with_prior(PRIOR_RUN_SD["cpu"])
    hits_steps = hits_prior = 0
    n = 400
    for i in range(n):
        run = np.exp(rng.normal(0.0, 0.10)) * np.exp(rng.normal(0.0, 0.03, size=steps))  # true median 1.0
        iv = step_time_interval(run, seed=i)
        hits_steps += iv.lo <= 1.0 <= iv.hi
        wide = prior.widen(iv, 1)
        hits_prior += wide.lo <= 1.0 <= wide.hi
    assert hits_prior / n >= 0.85, hits_prior / n
    assert hits_steps / n < 0.6, hits_steps / n
    # the study's own measurements outweigh the prior as they come
    measured = RunSpread(0.02, 20).with_prior(PRIOR_RUN_SD["cpu"])
    assert 0.02 < measured.sd < 0.06 and measured.dof == 25
