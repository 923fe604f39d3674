"""The memory model over many candidates at once: what screening a space asks.

The same terms as `autotune.predict.memory.predict` (they are written once, for ints and int arrays
alike), run on numpy arrays with one element per candidate; quantities that only depend on a
candidate's degrees, micro-batch, precision and recompute mode (its `Unit` and its stages) are
computed once per distinct set and gathered. Integer arithmetic throughout, and the one float
step, the allocator's slack, rounds as `DeviceOverhead.reserved` does: every prediction equals
the one-candidate prediction exactly (tests/autotune/predict/test_candidates.py).
"""

from __future__ import annotations

from itertools import repeat
from typing import Any, NamedTuple, Sequence

import numpy as np

from autotune.predict.device_memory import DeviceOverhead, overhead_for
from autotune.predict.memory import MemoryPrediction
from autotune.predict.memory_activations import kept_assignments, unit_terms
from autotune.predict.memory_schedule import Stage, stage_terms, step_data, worst_stage
from autotune.space.layout import Layout
from trainables.moe.config import ModelConfig


class Predictions(NamedTuple):
    """One prediction per candidate, and what the device holds at each one's peak (an array)."""

    predictions: list[MemoryPrediction]
    device_bytes: np.ndarray


def _take(columns: NamedTuple, index: np.ndarray) -> Any:
    """The rows `index` of a tuple of per-row arrays (a field that is one int for all stays one)."""
    return type(columns)(*(c[index] if isinstance(c, np.ndarray) else c for c in columns))


def _distinct(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each distinct combination of the keys, each row's combination number)."""
    code = np.zeros(len(keys[0]), dtype=np.int64)
    for k in keys:  # mixed radix: exact, and one sort instead of a sort of tuples
        code = code * (int(k.max()) + 1) + k
    _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def predict_many(model: ModelConfig, layouts: Sequence[Layout], global_batch_size: int, seq_len: int,
                 device: str = "cpu", overhead: DeviceOverhead | None = None, split: tuple[int, ...] | None = None,
                 grad_sync: str = "bucketed") -> Predictions:
    """`autotune.predict.memory.predict` of every layout (structurally valid ones: no zero degree)."""
    if not layouts:
        return Predictions([], np.zeros(0, dtype=np.int64))
    ep_, tp_, pp_, dp_, mb_, precision, recompute, schedule = zip(*layouts)
    ep, tp, pp, dp, mb = (np.array(c, dtype=np.int64) for c in (ep_, tp_, pp_, dp_, mb_))
    low = np.array([p in ("bf16", "fp16") for p in precision])
    half = np.array([p == "bf16-params" for p in precision])
    rc = np.fromiter(map({"none": 0, "selective": 1, "full": 2}.__getitem__, recompute), dtype=np.int64,
                     count=len(layouts))
    gpipe = np.array([s == "gpipe" for s in schedule])

    # Units: one per distinct (tp, ep, micro-batch, autocast, recompute), as `memory.unit` shares them.
    first, unit_of = _distinct(tp, ep, mb, low.astype(np.int64), half.astype(np.int64), rc)
    t = mb[first] * seq_len
    r0 = np.array([kept_assignments(model, int(x)) for x in t], dtype=np.int64)
    units = unit_terms(model, tp[first], ep[first], t, r0, low[first], seq_len, rc[first] == 1, rc[first] == 2,
                       half[first])
    # Stages: one set per distinct (unit, pp).
    group_first, group_of = _distinct(unit_of, pp)

    n = np.maximum(global_batch_size // (mb * dp * ep), 1)
    flat = grad_sync == "flat"
    sync_dense, sync_expert = (dp * ep > 1) & flat, (dp > 1) & flat
    stage, act, other = (np.zeros(len(layouts), dtype=np.int64) for _ in range(3))
    params, grads, optimizer = (np.zeros(len(layouts), dtype=np.int64) for _ in range(3))
    for depth in np.unique(pp).tolist():
        groups = group_first[pp[group_first] == depth]  # first candidate of each group of this depth
        u = _take(units, unit_of[groups])
        stages = [stage_terms(model, depth, tp[groups], ep[groups], u, s, split, device) for s in range(depth)]
        rows = np.flatnonzero(pp == depth)
        local = np.empty(len(group_first), dtype=np.int64)
        local[group_of[groups]] = np.arange(len(groups))
        at = local[group_of[rows]]  # each candidate's row among this depth's groups
        mine: list[Stage] = [_take(st, at) for st in stages]
        s, a, o = worst_stage(mine, depth, n[rows], gpipe[rows], sync_dense[rows], sync_expert[rows])
        stage[rows], act[rows], other[rows] = s, a, o
        for out, field in ((params, "params"), (grads, "grads"), (optimizer, "optimizer")):
            # The worst stage's state bytes: pick among the stages' columns.
            cols = np.stack([np.broadcast_to(getattr(st, field), len(rows)) for st in mine])
            out[rows] = cols[s, np.arange(len(rows))]
    activations = act + step_data(global_batch_size, seq_len, mb, n)
    total = params + grads + optimizer + activations + other
    reserved_extra = device_extra = np.zeros(len(layouts), dtype=np.int64)
    if device == "cuda":
        o = overhead or overhead_for()
        # `DeviceOverhead.reserved`: the int becomes a double, the product rounds up to an int.
        reserved_extra = np.ceil(total.astype(np.float64) * o.fragmentation).astype(np.int64)
        peers = tp * pp * dp * ep > 1
        device_extra = o.context_bytes + np.where(peers, o.nccl_bytes, 0)
    rows = zip(params.tolist(), grads.tolist(), optimizer.tolist(), activations.tolist(), other.tolist(),
               stage.tolist(), reserved_extra.tolist(), device_extra.tolist())
    preds = list(map(tuple.__new__, repeat(MemoryPrediction), rows))  # MemoryPrediction._make, in C
    return Predictions(preds, total + reserved_extra + device_extra)
