"""One trial's record, launched or not: the plain data every stage after the space reads or writes
(the searcher's history, early stopping, the calibration, MLflow, the report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autotune.schema import Status
from autotune.space.layout import Layout


# A rank's niceness when it runs at normal priority; Ray starts its workers at 15
# (autotune.study.connect.WORKER_NICENESS).
NORMAL_PRIORITY = 0


@dataclass(frozen=True)
class TrialRecord:
    """One trial, launched or not. `metrics` uses the schema's names (autotune.schema)."""

    number: int
    layout: Layout
    status: Status
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # summary metrics of a run
    prediction: dict[str, int] = field(default_factory=dict)  # pred_mem_*_bytes and pred_peak_mem_bytes
    ranks: tuple[dict[str, Any], ...] = ()  # per rank: rank, coords, node, memory categories
    losses: tuple[float, ...] = ()  # every step, warm-up included
    step_times: tuple[float, ...] = ()  # measured steps
    duration_s: float | None = None  # wall time of the whole trial
    attempts: int = 1
    mlflow_run_id: str | None = None
    session: int = 0  # which run of the study (0 = the first) decided it
    remeasure_of: int | None = None  # the earlier trial of the same layout this one measured again
    placement_wait_s: float | None = None  # from asking for its ranks to holding them

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @property
    def searched(self) -> bool:
        """Launched by the search: neither refused before launch nor an end-of-study re-measure of a
        tied leader (those have a budget of their own)."""
        return (self.status not in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID)
                and not self.reason.startswith(TIE_REMEASURE))

    @property
    def nice(self) -> int | None:
        """The lowest priority (highest niceness) any of its ranks ran at, where they recorded it."""
        values = [r["nice"] for r in self.ranks if r.get("nice") is not None]
        return max(values) if values else None

    @property
    def tokens_per_s(self) -> float:
        return float(self.metrics.get("tokens_per_s", 0.0))

    @property
    def held_bytes(self) -> float | None:
        """The memory checked against the cap: on CUDA the device's used memory at the peak
        (what runs out), elsewhere the measured peak."""
        return self.metrics.get("peak_mem_device_bytes", self.metrics.get("peak_mem_bytes"))

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "layout": self.layout.params(), "layout_key": self.layout.key,
                "status": self.status.value, "reason": self.reason, "metrics": dict(self.metrics),
                "prediction": dict(self.prediction), "ranks": list(self.ranks), "losses": list(self.losses),
                "step_times": list(self.step_times), "duration_s": self.duration_s, "attempts": self.attempts,
                "mlflow_run_id": self.mlflow_run_id, "session": self.session, "remeasure_of": self.remeasure_of,
                "placement_wait_s": self.placement_wait_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialRecord":
        return cls(number=int(d["number"]), layout=Layout.from_params(d["layout"]), status=Status(d["status"]),
                   reason=d.get("reason", ""), metrics=dict(d.get("metrics", {})),
                   prediction=dict(d.get("prediction", {})), ranks=tuple(d.get("ranks", ())),
                   losses=tuple(d.get("losses", ())), step_times=tuple(d.get("step_times", ())),
                   duration_s=d.get("duration_s"), attempts=int(d.get("attempts", 1)),
                   mlflow_run_id=d.get("mlflow_run_id"), session=int(d.get("session", 0)),
                   remeasure_of=d.get("remeasure_of"), placement_wait_s=d.get("placement_wait_s"))


TIE_REMEASURE = "measured again to separate the leaders"
