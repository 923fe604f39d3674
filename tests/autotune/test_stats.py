"""autotune.stats: bootstrap intervals on step time, ties with the best, the re-measuring rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autotune.stats import (Interval, leaders_to_remeasure, runs_interval, separated, step_time_interval,
                            tied_with_best)


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
