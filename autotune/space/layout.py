"""Layouts: the value object, the candidate set a space spans, and why each is in or out."""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Any, Iterable, NamedTuple

from trainables.moe.config import ModelConfig, ParallelDims, RunShape, layout_problems


class Layout(NamedTuple):
    """One point of the search space: parallel degrees plus the per-step knobs.

    Immutable, hashable and ordered field by field. A named tuple rather than a dataclass: a
    space of 100,000 candidates builds that many at once, and a tuple is built in C.
    """

    ep: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    precision: str
    recompute: str
    schedule: str = "1f1b"

    @property
    def world_size(self) -> int:
        return self.ep * self.tp * self.pp * self.dp

    @property
    def dims(self) -> ParallelDims:
        return _dims(self.ep, self.tp, self.pp, self.dp)

    @property
    def name(self) -> str:
        """The seed's notation, e.g. EP16_TP1_PP1_DP1."""
        return self.dims.name()

    @property
    def key(self) -> str:
        """Unique and readable: the layout name plus every knob."""
        return f"{self.name}/mb{self.micro_batch_size}/{self.precision}/{self.recompute}/{self.schedule}"

    def params(self) -> dict[str, Any]:
        return {"ep": self.ep, "tp": self.tp, "pp": self.pp, "dp": self.dp, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "precision": self.precision,
                "recompute": self.recompute, "schedule": self.schedule}

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> "Layout":
        return cls(ep=int(p["ep"]), tp=int(p["tp"]), pp=int(p["pp"]), dp=int(p["dp"]),
                   micro_batch_size=int(p["micro_batch_size"]), precision=str(p["precision"]),
                   recompute=str(p["recompute"]), schedule=str(p.get("schedule", "1f1b")))

    def shape(self, global_batch_size: int, seq_len: int) -> RunShape:
        return _shape(self.micro_batch_size, global_batch_size, seq_len, self.precision, self.recompute,
                      self.schedule)


# Frozen, so one object serves every layout with these values: screening asks for them once per
# degree set of a space of 100,000 candidates, and building a frozen dataclass costs five times more.
@lru_cache(maxsize=1 << 12)
def _dims(ep: int, tp: int, pp: int, dp: int) -> ParallelDims:
    return ParallelDims(pp=pp, dp=dp, ep=ep, tp=tp)


def clear_caches() -> None:
    """Forget the shared dims and shapes (benchmarks time screening from a cold start)."""
    _dims.cache_clear()
    _shape.cache_clear()


@lru_cache(maxsize=1 << 12)
def _shape(micro_batch_size: int, global_batch_size: int, seq_len: int, precision: str, recompute: str,
           schedule: str) -> RunShape:
    return RunShape(micro_batch_size, global_batch_size, seq_len, precision, recompute, schedule)


def product(ep: Iterable[int], tp: Iterable[int], pp: Iterable[int], dp: Iterable[int] | None,
            worlds: Iterable[int], micro_batch_size: Iterable[int], precision: Iterable[str],
            recompute: Iterable[str], schedule: Iterable[str]) -> list[Layout]:
    """Every combination; dp=None fills each allowed world size (`dp: auto`).

    The pipeline schedule only varies where there is a pipeline.
    """
    # Each list sorted and without repeats, nested in Layout's field order: the combinations
    # come out in Layout's own order with no sorting, as plain tuples made Layouts in C (a space
    # of 100,000 candidates takes a fraction of a second).
    def ordered(values: Iterable) -> list:
        return sorted(set(values))

    worlds = ordered(worlds)
    mbs, precisions, recomputes = ordered(micro_batch_size), ordered(precision), ordered(recompute)
    schedules = list(dict.fromkeys(schedule))
    first_schedule = schedules[:1]  # without a pipeline the schedule does not vary: the first one given
    schedules = ordered(schedules)
    out: list[tuple] = []
    for e, t, p in itertools.product(ordered(ep), ordered(tp), ordered(pp)):
        base = e * t * p
        dps = [w // base for w in worlds if w % base == 0] if dp is None else ordered(dp)
        out += itertools.product((e,), (t,), (p,), dps, mbs, precisions, recomputes,
                                 schedules if p > 1 else first_schedule)
    # tuple.__new__(Layout, t) is what Layout._make does, less a length check these 8-tuples
    # pass by construction, and without a Python call per layout.
    return list(map(tuple.__new__, itertools.repeat(Layout), out))


def structural_problems(model: ModelConfig, layout: Layout, global_batch_size: int, seq_len: int,
                        worlds: Iterable[int]) -> list[str]:
    """The trainable's own rules plus the cluster's: a layout must use an allowed world size."""
    problems = layout_problems(model, layout.dims, layout.shape(global_batch_size, seq_len))
    if layout.world_size not in worlds:
        problems.append(f"world size {layout.world_size} is not one of the allowed world sizes "
                        f"{sorted(set(worlds))} (cluster ranks or search.world_sizes)")
    return problems


def rule_of(problem: str) -> str:
    """A short, stable name for the rule a problem line breaks (for counts by reason)."""
    head = problem.split(" must ")[0].split(" (")[0].split(" needs ")[0]
    if problem.startswith("world size"):
        return "world size"
    return head.strip()
