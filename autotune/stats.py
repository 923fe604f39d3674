"""Step-time statistics in one place: intervals, ties between leaders, the re-measuring rule.

A trial measures a handful of steps on a machine that other work shares; two passes over the
same layouts on a 2-core machine agreed only at Kendall tau 0.76-0.79 (benchmarks/fidelity.py),
and one layout's step time moved 1.75x between back-to-back runs. So a single median says
little on its own: every measured layout gets a bootstrap interval on its median step time,
and the best is named together with the layouts whose intervals overlap it (statistically
tied). The report, early stopping and the searcher all read these functions; nothing here
knows of trials, Optuna or Ray (plain numbers in, plain data out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)

CONFIDENCE = 0.9
N_BOOT = 2000
# How many leaders one re-measuring round takes at most: the best and its closest rivals.
MAX_LEADERS = 3
RULE = ("a layout is tied with the best when their {conf:.0%} bootstrap intervals on the median step time "
        "overlap; tied leaders are measured again, interleaved, until the best is separated or the "
        "re-measuring budget is spent")


@dataclass(frozen=True)
class Interval:
    """A median step time (s) with its bootstrap interval [lo, hi] over `n` measured steps.

    With fewer than 2 steps the interval is [0, inf): nothing can be said, so it never
    separates from anything."""

    median: float
    lo: float
    hi: float
    n: int
    confidence: float = CONFIDENCE

    @property
    def known(self) -> bool:
        return self.n >= 2 and math.isfinite(self.hi)

    @property
    def rel_halfwidth(self) -> float:
        """Half the interval's width relative to its median (inf when unknown)."""
        if not self.known or self.median <= 0:
            return math.inf
        return (self.hi - self.lo) / (2 * self.median)

    def as_metrics(self, prefix: str = "step_time") -> dict[str, float]:
        """The interval as metrics beside the median (`step_time_lo_s`, `step_time_hi_s`); an
        unknown interval has none (MLflow refuses infinities)."""
        if not self.known:
            return {}
        return {f"{prefix}_lo_s": self.lo, f"{prefix}_hi_s": self.hi}

    def throughput(self, work_per_step: float) -> tuple[float, float, float]:
        """(low, median, high) of `work_per_step / step time` (e.g. tokens/s): a slower step
        time is a lower throughput, so the bounds swap."""
        def per_s(t: float) -> float:
            return work_per_step / t if t > 0 and math.isfinite(t) else (math.inf if t <= 0 else 0.0)
        return per_s(self.hi), per_s(self.median), per_s(self.lo)


def step_time_interval(step_times: Iterable[float], confidence: float = CONFIDENCE, n_boot: int = N_BOOT,
                       seed: int = 0) -> Interval:
    """Percentile bootstrap of the median over one run's measured steps (`n_boot` resamples).

    The median, not the mean: a step that a neighbour's burst slowed by 2x moves the mean
    but hardly the median. With 3 steps the interval is close to [min, max]. Seeded, so the
    same steps always give the same interval."""
    return runs_interval([list(step_times)], confidence, n_boot, seed)


def runs_interval(runs: Sequence[Iterable[float]], confidence: float = CONFIDENCE, n_boot: int = N_BOOT,
                  seed: int = 0) -> Interval:
    """The same over several runs of one layout (re-measures), by a two-stage bootstrap:
    resample the runs, then the steps inside each chosen run, and take the median of them all.

    Steps of one run share that run's conditions (the machine's load at the time), so they
    are not independent of each other; resampling whole runs carries the run-to-run spread
    (one layout's step time moved 1.75x between back-to-back runs here) into the interval,
    where pooling every step as if independent would hide it."""
    clean = [np.asarray([t for t in r if t is not None and math.isfinite(t)], dtype=float) for r in runs]
    clean = [r for r in clean if r.size]
    n = int(sum(r.size for r in clean))
    if n == 0:
        return Interval(math.nan, 0.0, math.inf, 0, confidence)
    med = float(np.median(np.concatenate(clean)))
    if n < 2:
        return Interval(med, 0.0, math.inf, n, confidence)
    rng = np.random.default_rng(seed)
    k = len(clean)
    chosen = rng.integers(0, k, size=(n_boot, k)) if k > 1 else np.zeros((n_boot, 1), dtype=int)
    if len({r.size for r in clean}) == 1:  # the usual case: every run measured the same steps
        data = np.stack(clean)
        m = data.shape[1]
        steps = rng.integers(0, m, size=(n_boot, k, m))
        boots = np.median(data[chosen[:, :, None], steps].reshape(n_boot, k * m), axis=1)
    else:
        boots = np.empty(n_boot)
        for b in range(n_boot):
            sample = [clean[j][rng.integers(0, clean[j].size, size=clean[j].size)] for j in chosen[b]]
            boots[b] = np.median(np.concatenate(sample))
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(boots, [tail, 1.0 - tail])
    return Interval(med, float(min(lo, med)), float(max(hi, med)), n, confidence)


def separated(a: Interval, b: Interval) -> bool:
    """The two intervals do not overlap (an unknown interval separates from nothing)."""
    if not (a.known and b.known):
        return False
    return a.hi < b.lo or b.hi < a.lo


def tied_with_best(intervals: Mapping[K, Interval]) -> tuple[K | None, list[K]]:
    """The best key (lowest median step time) and the keys tied with it, fastest first.

    Keys without a measured step (n == 0) take no part."""
    measured = {k: v for k, v in intervals.items() if v.n > 0 and math.isfinite(v.median)}
    if not measured:
        return None, []
    order = sorted(measured, key=lambda k: (measured[k].median, str(k)))
    best = order[0]
    return best, [k for k in order[1:] if not separated(measured[best], measured[k])]


def leaders_to_remeasure(intervals: Mapping[K, Interval], max_leaders: int = MAX_LEADERS) -> list[K]:
    """The layouts one more re-measuring round runs: the best and those tied with it (closest
    first), at most `max_leaders`; empty once the best is separated from every other."""
    best, tied = tied_with_best(intervals)
    if best is None or not tied:
        return []
    return [best, *tied][:max(2, max_leaders)]


def rule_text(confidence: float = CONFIDENCE) -> str:
    """The tie rule in words, for reports."""
    return RULE.format(conf=confidence)
