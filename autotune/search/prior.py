"""The step-time model as a prior, not an oracle: which fitting layout to measure next.

The calibrated model (`autotune.predict.speedmodel`) says how fast every fitting layout should
be; this module says how far to trust it. Its error on the study's own trials is a Gaussian
process over the layouts (log throughput: the model's prediction is the prior mean, the GP
learns where the model is wrong, e.g. "pipelined layouts run 30% slower than predicted"), with:

* an amplitude from the model's leave-one-out residuals on the measured trials, shrunk towards
  PRIOR_LOG_SD while there are few (before any measurement the model is trusted to within a
  factor of about e^0.5 = 1.6, what its top picks missed by on the published MoE tables);
* a length scale of a doubling or two of a parallel degree or micro-batch: a measurement says most
  about the layouts that differ from it in one knob.

The next layout is the one of highest expected improvement over the best measured throughput
(Jones et al. 1998, "Efficient Global Optimization of Expensive Black-Box Functions"). Where the
model is right, that is its fastest unmeasured layout; where it is wrong, the layouts near a
disappointing measurement fall, and the far, unmeasured families keep their spread and win the
next turn. Trials still running count as measured at their current belief ("kriging believer",
Ginsbourger et al. 2010), so concurrent picks spread out. A launch that failed counts as
measured far below its prediction, and each candidate's expected improvement is weighed by its
chance of staying within the memory cap (the memory model's prediction and error), with the best
within the cap as the bar: the search is for the fastest layout that can be deployed.

Pure numpy on plain arrays; knows nothing of Optuna or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.special import ndtr

from autotune.space.layout import Layout

PRIOR_LOG_SD = 0.5  # the model's error in log throughput before the study measured anything
PRIOR_POINTS = 3.0  # how many measurements' worth that prior is when shrinking towards the study's own residuals
MIN_LOG_SD = 0.03  # the model's error never counts as smaller than run-to-run noise
NOISE_LOG_SD = 0.03  # one measurement's run-to-run spread (a few percent, log throughput)
LENGTH_SCALE = 1.5  # in doublings of a degree or micro-batch (log2 units)
# A launch that failed (out of memory, timeout, crash) counts as measured at a tenth of its
# prediction: its near twins are believed slow too, so the search leaves a failing family.
FAILED_LOG_RESIDUAL = float(np.log(0.1))
MEMORY_LOG_SD = 0.05  # the memory model's error on a peak (its worst measured: 6.4%)
_PRECISION = {"fp32": 0, "bf16": 1, "fp16": 2, "bf16-params": 3}
_RECOMPUTE = {"none": 0.0, "selective": 0.5, "full": 1.0}


def features(layouts: Sequence[Layout]) -> np.ndarray:
    """Each layout as a point: log2 of ep, tp, pp, dp and the micro-batch; precision one-hot
    (two precisions a unit apart); recompute 0 / 0.5 / 1; the pipeline schedule 0 / 1."""
    if not layouts:
        return np.zeros((0, 5 + len(_PRECISION) + 2))
    ep, tp, pp, dp, mb, precision, recompute, schedule = zip(*layouts)
    nums = np.log2(np.array([ep, tp, pp, dp, mb], dtype=float)).T
    prec = np.zeros((len(layouts), len(_PRECISION)))
    prec[np.arange(len(layouts)), [int(_PRECISION.get(p, 0)) for p in precision]] = np.sqrt(0.5)
    rest = np.array([[_RECOMPUTE.get(r, 0.0), 1.0 if s == "gpipe" else 0.0] for r, s in zip(recompute, schedule)])
    return np.hstack([nums, prec, rest])


def _kernel(a: np.ndarray, b: np.ndarray, amplitude: float) -> np.ndarray:
    """Squared-exponential covariance; the squared distances as |a|^2 + |b|^2 - 2 a.b, so that
    100,000 candidates against a study's trials take a matrix of that size, not nine."""
    d2 = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return amplitude ** 2 * np.exp(-0.5 * np.maximum(d2, 0.0) / LENGTH_SCALE ** 2)


def error_scale(loo_log_residuals: Sequence[float]) -> float:
    """The model's error (log sd): PRIOR_LOG_SD, moved towards the root mean square of its
    leave-one-out residuals as the study measures."""
    r = np.asarray(list(loo_log_residuals), dtype=float)
    r = r[np.isfinite(r)]
    var = (PRIOR_POINTS * PRIOR_LOG_SD ** 2 + float((r ** 2).sum())) / (PRIOR_POINTS + len(r))
    return max(float(np.sqrt(var)), MIN_LOG_SD)


@dataclass(frozen=True)
class Belief:
    """What the study believes of each candidate's log throughput: mean and sd."""

    mean: np.ndarray
    sd: np.ndarray

    def expected_improvement(self, best: float) -> np.ndarray:
        """E[max(0, f - best)] under the belief (log throughput)."""
        sd = np.maximum(self.sd, 1e-12)
        z = (self.mean - best) / sd
        return (self.mean - best) * ndtr(z) + sd * np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


def belief(prior_mean: np.ndarray, candidates: np.ndarray, observed: np.ndarray, residuals: np.ndarray,
           amplitude: float, noise: float = NOISE_LOG_SD) -> Belief:
    """The GP posterior of log throughput at `candidates` (features), the model's prediction as
    the prior mean, conditioned on the residuals (measured - predicted, log) at `observed`."""
    prior_mean = np.asarray(prior_mean, dtype=float)
    if not len(observed):
        return Belief(prior_mean, np.full(len(prior_mean), amplitude))
    k_oo = _kernel(observed, observed, amplitude) + noise ** 2 * np.eye(len(observed))
    k_co = _kernel(candidates, observed, amplitude)
    chol = np.linalg.cholesky(k_oo)
    alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, residuals))
    v = np.linalg.solve(chol, k_co.T)
    var = np.maximum(amplitude ** 2 - (v * v).sum(axis=0), 0.0)
    return Belief(prior_mean + k_co @ alpha, np.sqrt(var))


def feasible(predicted_peak: np.ndarray, cap: float) -> np.ndarray:
    """Probability that a layout's measured peak stays within the cap, from the memory model's
    prediction and its error (1 for a prediction well under, 0.5 at the cap)."""
    peak = np.maximum(np.asarray(predicted_peak, dtype=float), 1.0)
    return ndtr((np.log(cap) - np.log(peak)) / MEMORY_LOG_SD)


def choose(predicted_log: np.ndarray, candidates: Sequence[Layout], measured: Sequence[tuple[Layout, float, float]],
           pending: Sequence[tuple[Layout, float]], amplitude: float, exclude: set[str],
           rng: np.random.Generator | None = None, failed: Sequence[tuple[Layout, float]] = (),
           best: float | None = None, fits: np.ndarray | None = None,
           peaks: np.ndarray | None = None) -> int | None:
    """Index of the candidate to measure next, or None when every one is excluded.

    predicted_log: the calibrated model's log throughput of each candidate; measured: (layout,
    predicted log, measured log) of the trials that ran; failed: (layout, predicted log) of the
    launches that failed; pending: (layout, predicted log) of the trials still running; exclude:
    keys measured, running, failed or decided; best: the log throughput to improve on (default the
    best measured; the caller passes the best within the memory cap); fits: each candidate's
    probability of staying within the cap (`feasible`), which weighs its expected improvement;
    peaks: each candidate's predicted peak memory. Equal scores go to the higher mean, then to the
    smaller predicted peak (where the model cannot tell two layouts apart, e.g. 1F1B and GPipe, the
    one with more headroom goes first, as in the model's own order), then (with `rng`) at random.
    """
    open_ = np.array([lay.key not in exclude for lay in candidates], dtype=bool)
    if not open_.any():
        return None
    cand_f = features(candidates)
    obs = [(features([lay])[0], m - p) for lay, p, m in measured]
    obs += [(features([lay])[0], FAILED_LOG_RESIDUAL) for lay, _ in failed]
    observed = np.array([o[0] for o in obs]) if obs else np.zeros((0, cand_f.shape[1]))
    residuals = np.array([o[1] for o in obs], dtype=float)
    if pending:  # kriging believer: a running trial will measure what the study believes of it now
        pend_f = features([lay for lay, _ in pending])
        now = belief(np.array([p for _, p in pending]), pend_f, observed, residuals, amplitude)
        observed = np.vstack([observed, pend_f])
        residuals = np.concatenate([residuals, now.mean - np.array([p for _, p in pending])])
    b = belief(predicted_log, cand_f, observed, residuals, amplitude)
    if best is None:
        best = max((m for _, _, m in measured), default=None)
    score = b.mean.copy() if best is None else b.expected_improvement(best)
    if fits is not None:
        score = score * np.asarray(fits, dtype=float) if best is not None else np.where(
            np.asarray(fits) >= 0.5, score, score - 1e3)  # before any measurement: the fastest likely to fit
    idx = np.flatnonzero(open_)
    top = score[idx].max()
    ties = idx[np.isclose(score[idx], top, rtol=1e-9, atol=1e-15)]
    if len(ties) > 1:
        ties = ties[b.mean[ties] >= b.mean[ties].max() - 1e-12]
    if len(ties) > 1 and peaks is not None:
        tie_peaks = np.asarray(peaks, dtype=float)[ties]
        ties = ties[tie_peaks <= tie_peaks.min()]
    if len(ties) > 1 and rng is not None:
        return int(rng.choice(ties))
    return int(ties[0])
