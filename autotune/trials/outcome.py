"""What a trial's coordinator hands back, whatever ran its ranks (the built-in trainable or a user's
command), and the wait for the ranks' placement that both kinds of trial share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from autotune.schema import Status


@dataclass
class TrialOutcome:
    status: Status
    reason: str = ""
    summary: dict[str, Any] | None = None  # rank 0's summary when the run finished
    ranks: list[dict[str, Any]] = field(default_factory=list)  # rank, node, ip, pid, memory
    steps: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0
    placement_wait_s: float | None = None  # from asking for the placement group to holding it


def wait_for_placement(pg: Any, timeout_s: float, placement_wait_s: float | None,
                       outcome: "TrialOutcome | None" = None) -> float | None:
    """Wait for a trial's placement group; None once placed, else the seconds waited in vain.

    Waiting for another trial to free the resources is queueing, not the trial's cost: it may
    last `placement_wait_s` (default: the trial's own budget). The wait is kept in `outcome`."""
    wait = placement_wait_s if placement_wait_s is not None else timeout_s
    if pg is None:  # the study released this trial before it was placed
        return 0.0
    start = time.monotonic()
    placed = pg.wait(timeout_seconds=wait)
    if outcome is not None:
        outcome.placement_wait_s = time.monotonic() - start
    return None if placed else wait
