"""Screening: every layout a space spans, and whether it may be launched.

Needs no Ray, no GPU and no torch: `autotune validate` runs this alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from autotune.layout import Layout, product, rule_of, structural_problems
from autotune.memory import MemoryPrediction, predict
from autotune.spec import Spec

FITS = "fits"
INVALID = "invalid"
OVER_MEMORY = "over memory cap"


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    verdict: str  # FITS, INVALID or OVER_MEMORY
    reason: str = ""  # the first broken rule, or the memory excess
    prediction: MemoryPrediction | None = None

    @property
    def fits(self) -> bool:
        return self.verdict == FITS


@dataclass(frozen=True)
class Screening:
    candidates: tuple[Candidate, ...]
    cap_bytes: int
    counts: dict[str, int] = field(default_factory=dict)  # by verdict
    reasons: dict[str, int] = field(default_factory=dict)  # exclusions by rule

    def fitting(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fits]

    def by_key(self) -> dict[str, Candidate]:
        return {c.layout.key: c for c in self.candidates}


def layouts_of(spec: Spec) -> list[Layout]:
    s = spec.search
    return product(s.ep, s.tp, s.pp, None if s.dp == "auto" else s.dp, spec.world_sizes, s.micro_batch_size,
                   s.precision, s.recompute, s.schedule)


def judge(spec: Spec, layout: Layout) -> Candidate:
    model = spec.model.config()
    problems = structural_problems(model, layout, spec.search.global_batch_size, spec.search.seq_len,
                                   spec.world_sizes)
    if problems:
        return Candidate(layout, INVALID, problems[0])
    pred = predict(model, layout.dims, layout.shape(spec.search.global_batch_size, spec.search.seq_len),
                   spec.cluster.device)
    cap = int(spec.objective.memory_cap * spec.cluster.memory_bytes)
    if pred.total > cap and spec.objective.prune_over_cap:
        return Candidate(layout, OVER_MEMORY, f"predicted peak {pred.total / 1e9:.3f} GB > cap {cap / 1e9:.3f} GB "
                         f"({spec.objective.memory_cap:.0%} of {spec.cluster.memory_gb:g} GB)", pred)
    return Candidate(layout, FITS, "", pred)


def screen(spec: Spec) -> Screening:
    candidates = tuple(judge(spec, layout) for layout in layouts_of(spec))
    counts = Counter(c.verdict for c in candidates)
    reasons = Counter(rule_of(c.reason) if c.verdict == INVALID else OVER_MEMORY
                      for c in candidates if not c.fits)
    return Screening(candidates, int(spec.objective.memory_cap * spec.cluster.memory_bytes),
                     dict(counts), dict(reasons))
