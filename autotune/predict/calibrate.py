"""Calibration: the step-time model's term efficiencies, refit on a study's own measurements.

The model's terms (`autotune.predict.steptime.TERMS`) are times at full device speed; what a real step
reaches of each is not known in advance. After every measured trial the multipliers are
refit on all measured trials by non-negative least squares (`scipy.optimize.nnls`) on the
relative error, with a weak pull towards one common scale (the median ratio of measured to
predicted, applied to the default efficiencies): with one measurement the fit is that scale
alone, and a term no measurement exercises (no pipeline measured yet) keeps the default
proportion instead of a wild value. Leave-one-out error says how far to trust it.

Knows nothing of Optuna or Ray: plain arrays and numbers in, a frozen Calibration out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from autotune.predict.steptime import TERMS, prior_weights

PRIOR_STRENGTH = 0.02  # weight of the pull to the common scale, per term, against one measurement's relative error


@dataclass(frozen=True)
class Calibration:
    """Fitted multipliers of the raw terms, and how well they predict a trial left out."""

    weights: tuple[float, ...]
    points: int
    loo_median_rel_err: float | None = None  # |pred - measured| / measured, each trial fitted without itself
    loo_max_rel_err: float | None = None
    # log(measured / predicted) throughput of each trial fitted without itself (2 or more trials):
    # how wrong the model is on layouts it has not seen, which the search weighs (autotune.search.prior)
    loo_log_residuals: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dict(zip(TERMS, self.weights)), "points": self.points,
                "loo_median_rel_err": self.loo_median_rel_err, "loo_max_rel_err": self.loo_max_rel_err,
                "loo_log_residuals": list(self.loo_log_residuals)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        w = d["weights"]
        prior = dict(zip(TERMS, prior_weights()))  # a term newer than the stored fit keeps its prior
        return cls(tuple(float(w.get(t, prior[t])) for t in TERMS), int(d.get("points", 0)), d.get("loo_median_rel_err"),
                   d.get("loo_max_rel_err"), tuple(float(r) for r in d.get("loo_log_residuals", ())))

    @classmethod
    def default(cls) -> "Calibration":
        return cls(tuple(float(x) for x in prior_weights()), 0)


def fit_weights(raw: np.ndarray, measured: np.ndarray, prior: np.ndarray | None = None,
                strength: float = PRIOR_STRENGTH) -> np.ndarray:
    """Multipliers w >= 0 such that raw @ w matches the measured step times (relative error)."""
    from scipy.optimize import nnls  # imported here: `autotune validate` without --from never fits

    prior = prior_weights() if prior is None else prior
    raw = np.asarray(raw, dtype=float)
    y = np.asarray(measured, dtype=float)
    if not len(y):
        return prior.copy()
    x = raw * prior
    scale = float(np.median(y / np.maximum(x.sum(axis=1), 1e-30)))
    k = raw.shape[1]
    a = np.vstack([x / y[:, None], np.sqrt(strength) * np.eye(k) / scale])
    b = np.concatenate([np.ones(len(y)), np.sqrt(strength) * np.ones(k)])
    m, _ = nnls(a, b, maxiter=50 * k)
    return prior * m


def leave_one_out(raw: np.ndarray, measured: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """Each trial's step time predicted by a fit on all the others."""
    raw = np.asarray(raw, dtype=float)
    y = np.asarray(measured, dtype=float)
    out = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        out[i] = raw[i] @ fit_weights(raw[keep], y[keep], prior)
    return out


def calibrate(raw: np.ndarray, measured: np.ndarray, prior: np.ndarray | None = None,
              with_loo: bool = True) -> Calibration:
    """The fit on every measurement, with its leave-one-out residuals where there are 2 or more
    and their median and worst relative error where there are 3 or more."""
    y = np.asarray(measured, dtype=float)
    w = fit_weights(raw, y, prior)
    med = worst = None
    residuals: tuple[float, ...] = ()
    if with_loo and len(y) >= 2:
        loo = leave_one_out(raw, y, prior)
        residuals = tuple(float(r) for r in np.log(np.maximum(loo, 1e-30) / y))
        if len(y) >= 3:
            err = np.abs(loo - y) / y
            med, worst = float(np.median(err)), float(err.max())
    return Calibration(tuple(float(v) for v in w), len(y), med, worst, residuals)
