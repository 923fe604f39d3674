"""The step-time model of one space, calibrated on what a study measured: what the searcher,
`autotune validate` and the benchmarks ask "how fast would this layout be?".

Ties `autotune.predict.steptime` (terms), `autotune.space.devices` (the space's profile and node size) and
`autotune.predict.calibrate` (the fit) to a Spec and a list of trial records.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

from autotune.predict.calibrate import Calibration, calibrate
from autotune.predict.steptime import StepTimes, Topology, predict, raw_terms
from autotune.schema import PREDICTED_SPEED, Status
from autotune.space.devices import DeviceProfile
from autotune.space.layout import Layout
from autotune.space.spec import Spec
from autotune.trial_record import TrialRecord
from trainables.moe.config import ModelConfig



@dataclass(frozen=True)
class SpeedModel:
    model: ModelConfig
    global_batch_size: int
    seq_len: int
    profile: DeviceProfile
    topology: Topology
    calibration: Calibration = Calibration.default()
    imbalance: float = 1.0  # median measured expert load imbalance (1 = balanced, nothing measured)
    sequence_parallel: bool = False  # the trainable dispatches a tp-th of the tokens per TP rank

    @classmethod
    def of(cls, spec: Spec, profile: DeviceProfile | None = None) -> "SpeedModel":
        profile = profile or spec.cluster.device_profile()
        per_node = spec.cluster.ranks_per_node
        if per_node is None and spec.cluster.device == "cuda":
            per_node = profile.ranks_per_node  # a GPU cluster given as `ranks` alone: the profile's node
        cores = spec.cluster.total_ranks * spec.cluster.cpus_per_rank if spec.cluster.device == "cpu" else None
        # Megatron-Core requires sequence parallelism with TP and expert parallelism together.
        megatron = spec.trainable is not None and spec.trainable.metrics_preset == "megatron"
        return cls(spec.model.config(), spec.search.global_batch_size, spec.search.seq_len, profile,
                   Topology(per_node, cores), sequence_parallel=megatron)

    def predict(self, layouts: Sequence[Layout]) -> StepTimes:
        return predict(self.model, layouts, self.global_batch_size, self.seq_len, self.profile, self.topology,
                       self.calibration.weights, self.imbalance, self.sequence_parallel)

    def prediction_metrics(self, layout: Layout) -> dict[str, float]:
        row = self.predict([layout]).row(0)
        return {k: row[k] for k in PREDICTED_SPEED}

    def fit(self, layouts: Sequence[Layout], step_time_s: Iterable[float],
            imbalance: Iterable[float] | None = None, with_loo: bool = True) -> "SpeedModel":
        """This model with its efficiencies refit on measured step times."""
        y = np.asarray(list(step_time_s), dtype=float)
        imb = np.ones(len(y)) if imbalance is None else np.asarray(list(imbalance), dtype=float)
        if not len(y):
            return self
        raw, _ = raw_terms(self.model, layouts, self.global_batch_size, self.seq_len, self.profile, self.topology,
                           imb, self.sequence_parallel)
        cal = calibrate(raw, y, with_loo=with_loo)
        return replace(self, calibration=cal, imbalance=float(np.median(imb)))

    def fit_records(self, records: Iterable[TrialRecord], with_loo: bool = True) -> "SpeedModel":
        """Refit on every successfully measured trial (the latest measurement of each layout)."""
        rs = _measured(records)
        return self.fit([r.layout for r in rs], [r.metrics["step_time_s"] for r in rs],
                        [float(r.metrics.get("expert_load_imbalance") or 1.0) for r in rs], with_loo)


def _measured(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The latest successful measurement of each layout that has a step time."""
    latest: dict[str, TrialRecord] = {}
    for r in records:
        step = r.metrics.get("step_time_s")
        if r.status == Status.OK and step and np.isfinite(step) and step > 0:
            latest[r.layout.key] = r
    return list(latest.values())
