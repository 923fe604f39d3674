"""Step-time statistics in one place: intervals, ties between leaders, the re-measuring rule.

A trial measures a handful of steps on a machine that other work shares; two passes over the
same layouts on a 2-core machine agreed only at Kendall tau 0.76-0.79 (benchmarks/fidelity.py),
and one layout's step time moved 1.75x between back-to-back runs. So a single median says
little on its own: every measured layout gets a bootstrap interval on its median step time,
the spread between repeated runs of one layout is estimated from the study's re-measures
(`RunSpread`), and the best is named together with the layouts statistically tied with it.
The report, early stopping and the searcher all read these functions; nothing here knows
of trials, Optuna or Ray (plain numbers in, plain data out).
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
        "overlap, or when their medians differ by less than the run-to-run margin ({conf:.0%} t quantile x the "
        "run-to-run spread of log step time, pooled over the layouts measured more than once, x "
        "sqrt(1/runs + 1/runs)); the best measured in one run only, and the leaders tied with it, are measured "
        "again, interleaved, until the best is separated or the re-measuring budget is spent")


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
    clean = [np.asarray(_finite(r), dtype=float) for r in runs]
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


# The run-to-run spread (sd of log median step time) a study assumes until its own re-measures
# show it, weighted as PRIOR_RUN_DOF degrees of freedom. CPU: this shared 2-core machine, pooled
# over the six studies of `python -m benchmarks.fidelity --space benchmarks/spaces/fidelity_unseen.yaml`
# (benchmarks/results/fidelity_unseen.json, 27 degrees of freedom): 0.11. CUDA: 0.03, a dedicated
# card's few percent, an assumption not yet measured on one.
PRIOR_RUN_SD = {"cpu": 0.11, "cuda": 0.03}
PRIOR_RUN_DOF = 5


def prior_run_sd(device: str) -> float:
    """The prior run-to-run spread for a device (a device without its own figure gets the CPU's)."""
    return PRIOR_RUN_SD.get(device, PRIOR_RUN_SD["cpu"])


@dataclass(frozen=True)
class RunSpread:
    """How much one layout's runs differ from each other: the standard deviation of log median
    step time between runs, pooled over the layouts measured more than once (`dof` = runs - 1
    summed over them; 0 = nothing known yet).

    A trial's bootstrap interval comes from its own steps, which share that run's conditions;
    on a shared machine two runs of one layout differ by more than that (three long runs of the
    quick-start's fastest layout read 7,712, 8,964 and 9,881 tokens/s). Only repeated runs show
    it, so a study's own re-measures estimate it, and its ties account for it."""

    sd: float = 0.0
    dof: int = 0

    @classmethod
    def of(cls, runs: Mapping[K, Sequence[Iterable[float]]]) -> "RunSpread":
        ss, dof = 0.0, 0
        for layout_runs in runs.values():
            medians = [math.log(m) for m in (_median(r) for r in layout_runs) if m is not None and m > 0]
            if len(medians) >= 2:
                mean = sum(medians) / len(medians)
                ss += sum((m - mean) ** 2 for m in medians)
                dof += len(medians) - 1
        return cls(math.sqrt(ss / dof) if dof else 0.0, dof)

    @property
    def known(self) -> bool:
        return self.dof >= 1 and self.sd > 0

    def with_prior(self, sd: float, dof: int = PRIOR_RUN_DOF) -> "RunSpread":
        """This spread pooled with a prior one worth `dof` degrees of freedom: what to assume of
        a layout measured once, before (and while) the study's re-measures say more."""
        total = self.dof + dof
        if total <= 0:
            return self
        return RunSpread(math.sqrt((self.dof * self.sd ** 2 + dof * sd ** 2) / total), total)

    def _quantile(self, confidence: float) -> float:
        from scipy.stats import t as student_t

        return float(student_t.ppf(0.5 + confidence / 2, self.dof))

    def margin(self, runs_a: int, runs_b: int, confidence: float = CONFIDENCE) -> float:
        """The largest |log step-time ratio| of two layouts (measured in `runs_a` and `runs_b`
        runs) that the run-to-run spread explains at this confidence (Student t, `dof`)."""
        if not self.known:
            return 0.0
        return self._quantile(confidence) * self.sd * math.sqrt(1.0 / max(runs_a, 1) + 1.0 / max(runs_b, 1))

    def widen(self, iv: Interval, runs: int) -> Interval:
        """`iv` widened to at least one layout's share of the run-to-run margin each side, for
        showing: a layout measured in `runs` runs has median x exp(+-t sd / sqrt(runs))."""
        if not (self.known and iv.known) or iv.median <= 0:
            return iv
        h = self._quantile(iv.confidence) * self.sd / math.sqrt(max(runs, 1))
        return Interval(iv.median, min(iv.lo, iv.median * math.exp(-h)), max(iv.hi, iv.median * math.exp(h)), iv.n,
                        iv.confidence)


def within_runs_p90(runs: Sequence[Iterable[float | None]]) -> float | None:
    """The 90th percentile of every measured step over the median of its own run: how far a
    layout's steps stray inside a run, whatever the run-to-run spread. None unless there are
    several runs and each kept two steps or more (a run of one step says nothing of its own)."""
    clean = [_finite(r) for r in runs]
    if len(clean) < 2 or min(map(len, clean)) < 2:
        return None
    ratios = []
    for steps in clean:
        median = float(np.median(steps))
        ratios.extend(x / median for x in steps)
    return float(np.quantile(ratios, 0.9))


def _finite(steps: Iterable[float | None]) -> list[float]:
    """The steps that were measured: a step the run lost (None, nan, inf) says nothing."""
    return [t for t in steps if t is not None and math.isfinite(t)]


def _median(steps: Iterable[float | None]) -> float | None:
    clean = _finite(steps)
    return float(np.median(clean)) if clean else None


def _fastest_first(intervals: Mapping[K, Interval]) -> list[K]:
    """The keys with at least one measured step, lowest median step time first (ties by key,
    so the order never depends on the mapping's)."""
    measured = [k for k, v in intervals.items() if v.n > 0 and math.isfinite(v.median)]
    return sorted(measured, key=lambda k: (intervals[k].median, str(k)))


def separated(a: Interval, b: Interval) -> bool:
    """The two intervals do not overlap (an unknown interval separates from nothing)."""
    if not (a.known and b.known):
        return False
    return a.hi < b.lo or b.hi < a.lo


def tied_with_best(intervals: Mapping[K, Interval], spread: RunSpread | None = None,
                   runs: Mapping[K, int] | None = None) -> tuple[K | None, list[K]]:
    """The best key (lowest median step time) and the keys tied with it, fastest first: their
    intervals overlap or, given the run-to-run `spread` and each key's number of `runs`, their
    medians differ by less than the run-to-run margin.

    Keys without a measured step (n == 0) take no part."""
    order = _fastest_first(intervals)
    if not order:
        return None, []
    best = order[0]
    runs = runs or {}

    def tied(k: K) -> bool:
        if not separated(intervals[best], intervals[k]):
            return True
        if spread is None or not spread.known or intervals[best].median <= 0:
            return False
        gap = math.log(intervals[k].median / intervals[best].median)
        return gap <= spread.margin(runs.get(best, 1), runs.get(k, 1), intervals[best].confidence)

    return best, [k for k in order[1:] if tied(k)]


def leaders_to_remeasure(intervals: Mapping[K, Interval], max_leaders: int = MAX_LEADERS,
                         spread: RunSpread | None = None, runs: Mapping[K, int] | None = None) -> list[K]:
    """The layouts one more re-measuring round runs: the best and those tied with it (closest
    first), at most `max_leaders`. Given `runs`, a best measured in one run only also goes again
    with its closest rivals, tied or not: one run's figure can be off by more than its steps
    show, and the repeat is what estimates the run-to-run spread. Empty once the best is
    separated from every other (and, given `runs`, has been measured at least twice)."""
    best, tied = tied_with_best(intervals, spread, runs)
    if best is None:
        return []
    if not tied:
        if runs is None or runs.get(best, 1) >= 2 or len(intervals) < 2:
            return []
        tied = _fastest_first(intervals)[1:]
    return [best, *tied][:max(2, max_leaders)]


def rule_text(confidence: float = CONFIDENCE) -> str:
    """The tie rule in words, for reports."""
    return RULE.format(conf=confidence)
