"""Screening: every layout a space spans, and whether it may be launched.

Needs no Ray, no GPU and no torch: `autotune validate` runs this alone.
"""

from __future__ import annotations

import gc
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from operator import itemgetter
from typing import NamedTuple

from autotune.predict.device_memory import DeviceOverhead, overhead_of
from autotune.predict.memory import MemoryPrediction, predict
from autotune.predict.memory_batch import predict_many
from autotune.space.layout import Layout, product, rule_of, structural_problems
from autotune.space.spec import Spec
from trainables.moe.config import ModelConfig

FITS = "fits"
INVALID = "invalid"
OVER_MEMORY = "over memory cap"


class Candidate(NamedTuple):
    """A layout and its verdict (a named tuple, like Layout: screening builds 100,000 of them)."""

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


def judge(spec: Spec, layout: Layout, model: ModelConfig | None = None) -> Candidate:
    model = model or spec.model.config()
    problems = structural_problems(model, layout, spec.search.global_batch_size, spec.search.seq_len,
                                   spec.world_sizes)
    if problems:
        return Candidate(layout, INVALID, problems[0])
    pred = predict(model, layout.dims, layout.shape(spec.search.global_batch_size, spec.search.seq_len),
                   spec.cluster.device, device_overhead(spec))
    return _by_memory(spec, layout, pred, _cap(spec))


def _cap(spec: Spec) -> int:
    return int(spec.objective.memory_cap * spec.cluster.memory_bytes)


def device_overhead(spec: Spec) -> DeviceOverhead | None:
    """The overhead terms of the space's device profile (CUDA only; `cluster.profile`)."""
    return overhead_of(spec.cluster.device_profile()) if spec.cluster.device == "cuda" else None


def _by_memory(spec: Spec, layout: Layout, pred: MemoryPrediction, cap: int) -> Candidate:
    """The verdict on a structurally valid layout: over the memory cap (pruned) or fits."""
    # On CUDA the device-level prediction (allocator slack, CUDA context, NCCL buffers) is what
    # runs out; on CPU the extras are zero and `device` is the allocated peak.
    if pred.device > cap and spec.objective.prune_over_cap:
        return Candidate(layout, OVER_MEMORY, _over_cap(pred.device, pred.device_extra, _cap_text(spec, cap)), pred)
    return Candidate(layout, FITS, "", pred)


def _cap_text(spec: Spec, cap: int) -> str:
    return f"> cap {cap / 1e9:.3f} GB ({spec.objective.memory_cap:.0%} of {spec.cluster.memory_gb:g} GB)"


def _over_cap(device_bytes: int, device_extra: int, cap_text: str) -> str:
    """Why a layout is pruned: its predicted memory against the cap (`_cap_text`)."""
    what = "predicted device memory" if device_extra else "predicted peak"
    return f"{what} {device_bytes / 1e9:.3f} GB {cap_text}"


def screen(spec: Spec) -> Screening:
    """Judge every layout of the space (the same verdicts as `judge`, one by one).

    Fast enough for spaces of 100,000 candidates (benchmarks/screening.py): the model is built
    once, the structural rules, which do not look at precision or recompute (both already
    validated by the spec), are checked once per (ep, tp, pp, dp, micro-batch, schedule), and the
    memory of every valid layout is predicted at once (`autotune.predict.memory_batch`).
    """
    # Screening allocates hundreds of thousands of small tuples and no reference cycles: the cycle
    # collector would only rescan them, over and over (a third of the time of a large space).
    paused = gc.isenabled()
    gc.disable()
    try:
        return _screen(spec)
    finally:
        if paused:
            gc.enable()


def _screen(spec: Spec) -> Screening:
    model = spec.model.config()
    gbs, seq, worlds = spec.search.global_batch_size, spec.search.seq_len, spec.world_sizes
    device, cap, overhead = spec.cluster.device, _cap(spec), device_overhead(spec)
    problems_of: dict[tuple, list[str]] = {}
    out: list = []
    valid: list[int] = []  # where the structurally valid layouts sit in `out`
    for layout in layouts_of(spec):
        ep, tp, pp, dp, mb, precision, recompute, schedule = layout
        key = (ep, tp, pp, dp, mb, schedule)
        problems = problems_of.get(key)
        if problems is None:
            problems = problems_of[key] = structural_problems(model, layout, gbs, seq, worlds)
        if problems:
            out.append(Candidate(layout, INVALID, problems[0]))
        else:
            valid.append(len(out))
            out.append(layout)
    # Every valid layout's memory at once (numpy over candidates; the same figures as `predict`).
    preds, device_bytes = predict_many(model, [out[i] for i in valid], gbs, seq, device, overhead)
    over = (device_bytes > cap).tolist() if spec.objective.prune_over_cap else [False] * len(valid)
    cap_text = _cap_text(spec, cap)
    for i, pred, used, pruned in zip(valid, preds, device_bytes.tolist(), over):
        if pruned:
            out[i] = Candidate(out[i], OVER_MEMORY, _over_cap(used, pred.device_extra, cap_text), pred)
        else:
            out[i] = Candidate(out[i], FITS, "", pred)
    candidates = tuple(out)
    rule = lru_cache(maxsize=None)(rule_of)
    counts = Counter(map(itemgetter(1), candidates))  # by verdict
    reasons = Counter(rule(c[2]) if c[1] == INVALID else OVER_MEMORY for c in candidates if c[1] != FITS)
    return Screening(candidates, cap, dict(counts), dict(reasons))
