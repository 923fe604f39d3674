"""Parameters, gradients and optimizer states of one rank, and where each pipeline stage's
layers lie (part of the memory model, `autotune/predict/memory.py`).

Closed-form counts of the shards a rank holds: the trainable's own measurement must equal them
byte for byte.

The terms of the memory model are written once and run on two kinds of numbers: Python ints
(one candidate, `autotune.predict.memory.predict`) and numpy integer arrays (every candidate of a space
at once, `autotune.predict.memory_batch`). Branches on a per-candidate quantity therefore go through
`pick` and `larger` instead of `if` and `max`; both give exactly what `if` and `max` give on ints.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from trainables.moe.config import ModelConfig, ParallelDims, stage_layer_counts

FP32 = 4
LOW = 2  # bf16 / fp16 under autocast
INT64 = 8
BOOL = 1


def pick(cond: Any, a: Any, b: Any) -> Any:
    """`a if cond else b`, also element-wise (cond a bool array, a and b int arrays or ints)."""
    return b + (a - b) * cond


def larger(a: Any, b: Any) -> Any:
    """`max(a, b)`, also element-wise."""
    return pick(b > a, b, a)


def smaller(a: Any, b: Any) -> Any:
    """`min(a, b)`, also element-wise."""
    return pick(b < a, b, a)


@dataclass(frozen=True)
class StageParams:
    """Parameter elements and tensors held by one rank of a pipeline stage."""

    elements: int
    tensors: int


@lru_cache(maxsize=1 << 16)  # pure, and asked for again by every candidate that shares it
def moe_count(model: ModelConfig, lo: int, hi: int) -> int:
    """MoE layers among global layer indices [lo, hi) (see `ModelConfig.is_moe_layer`)."""
    start, every = max(lo, model.first_dense_layers), model.moe_every
    if start >= hi:
        return 0
    first = model.first_dense_layers + -(-(start - model.first_dense_layers) // every) * every
    return 0 if first >= hi else (hi - 1 - first) // every + 1


@lru_cache(maxsize=1 << 16)  # pure, and asked for again by every candidate that shares it
def last_layer(model: ModelConfig, lo: int, hi: int, moe: bool) -> int | None:
    """Global index of the last MoE (or dense) layer among [lo, hi), None if there is none."""
    if moe:
        if hi - 1 < model.first_dense_layers:
            return None
        i = model.first_dense_layers + (hi - 1 - model.first_dense_layers) // model.moe_every * model.moe_every
        return i if i >= lo else None
    if model.moe_every == 1:  # dense only before the first MoE layer
        i = min(hi, model.first_dense_layers) - 1
        return i if i >= lo else None
    for i in (hi - 1, hi - 2):  # of two neighbours past the dense prefix at least one is dense
        if i >= lo and not model.is_moe_layer(i):
            return i
    return None


@lru_cache(maxsize=1 << 16)  # pure, and asked for again by every candidate that shares it
def stage_range(model: ModelConfig, pp: int, stage: int, split: tuple[int, ...] | None) -> tuple[int, int]:
    """Global layer indices [lo, hi) of a pipeline stage."""
    counts = stage_layer_counts(model, ParallelDims(pp=pp), split)
    lo = sum(counts[:stage])
    return lo, lo + counts[stage]


def stage_elements(model: ModelConfig, pp: int, tp: Any, ep: Any, stage: int,
                   split: tuple[int, ...] | None = None) -> tuple[Any, int]:
    """(parameter elements, tensors) on one rank of a stage; tp and ep may be int arrays."""
    d = model.d_model
    lo, hi = stage_range(model, pp, stage, split)
    n_moe = moe_count(model, lo, hi)
    n_dense = hi - lo - n_moe
    # Every layer: two norms, q/k/v/o split by heads.
    elements = (hi - lo) * (2 * d + 4 * d * d // tp)
    tensors = (hi - lo) * 6
    # MoE layers: the router (replicated) and this rank's experts, split by hidden size.
    elements = elements + n_moe * (d * model.n_experts + 3 * (model.n_experts // ep) * d * (model.ffn_hidden // tp))
    tensors += n_moe * 4
    # Dense layers: a SwiGLU split by hidden size.
    elements = elements + n_dense * 3 * d * (model.dense_ffn // tp)
    tensors += n_dense * 3
    if stage == 0:
        elements = elements + model.vocab_size // tp * d + model.max_seq_len * d  # vocab-split embedding, positions
        tensors += 2
    if stage == pp - 1:
        elements = elements + d + model.vocab_size // tp * d  # final norm, vocab-split head
        tensors += 2
    return elements, tensors


def stage_params(model: ModelConfig, dims: ParallelDims, stage: int,
                 split: tuple[int, ...] | None = None) -> StageParams:
    return StageParams(*stage_elements(model, dims.pp, dims.tp, dims.ep, stage, split))


@dataclass(frozen=True)
class StateMemory:
    params: int
    grads: int
    optimizer: int


def state_bytes(model: ModelConfig, pp: int, tp: Any, ep: Any, stage: int, device: str,
                split: tuple[int, ...] | None, half: Any = False) -> tuple[Any, Any, Any]:
    """(params, grads, optimizer) bytes of `state_memory`; tp, ep and half may be arrays.

    With bf16 parameters (`half`) the parameters take 2 bytes, the main gradients 4 and the
    optimizer an fp32 master copy besides its moments."""
    elements, tensors = stage_elements(model, pp, tp, ep, stage, split)
    steps = tensors * FP32  # fused AdamW's step counters, on the parameters' device
    return elements * pick(half, LOW, FP32), elements * FP32, pick(half, 3, 2) * elements * FP32 + steps


@lru_cache(maxsize=1 << 16)  # pure, and asked for again by every candidate that shares it
def state_memory(model: ModelConfig, dims: ParallelDims, stage: int, device: str = "cpu",
                 split: tuple[int, ...] | None = None, precision: str = "fp32") -> StateMemory:
    """Bytes of the weights, their gradients and AdamW's two moments on one rank: all fp32, but
    with bf16 parameters (`bf16-params`), bf16 weights and an fp32 master copy in the optimizer.

    AdamW also keeps a 4-byte step counter per tensor: the trainable's fused AdamW keeps it on
    the parameters' device, GPU or CPU.
    """
    return StateMemory(*state_bytes(model, dims.pp, dims.tp, dims.ep, stage, device, split,
                                    precision == "bf16-params"))
