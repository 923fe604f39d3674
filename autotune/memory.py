"""Analytic per-rank memory model: what a layout needs before it is launched.

Parameters, gradients and optimizer states are closed-form counts of the shards a rank
holds (exact: the trainable's own measurement must equal them byte for byte). Activations
and the rest are estimates fitted to what the trainable measures (`benchmarks/memory_model.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainables.moe.config import ModelConfig, ParallelDims, stage_layer_counts

FP32 = 4


@dataclass(frozen=True)
class StageParams:
    """Parameter elements and tensors held by one rank of a pipeline stage."""

    elements: int
    tensors: int


def stage_params(model: ModelConfig, dims: ParallelDims, stage: int,
                 split: tuple[int, ...] | None = None) -> StageParams:
    d, tp = model.d_model, dims.tp
    counts = stage_layer_counts(model, dims, split)
    first = sum(counts[:stage])
    elements = tensors = 0
    for i in range(first, first + counts[stage]):
        elements += 2 * d + 4 * d * d // tp  # two norms, q/k/v/o split by heads
        tensors += 6
        if model.is_moe_layer(i):
            elements += d * model.n_experts  # router, replicated
            elements += 3 * (model.n_experts // dims.ep) * d * (model.ffn_hidden // tp)
            tensors += 4
        else:
            elements += 3 * d * (model.dense_ffn // tp)
            tensors += 3
    if stage == 0:
        elements += model.vocab_size // tp * d + model.max_seq_len * d  # vocab-split embedding, positions
        tensors += 2
    if stage == dims.pp - 1:
        elements += d + model.vocab_size // tp * d  # final norm, vocab-split head
        tensors += 2
    return StageParams(elements, tensors)


@dataclass(frozen=True)
class StateMemory:
    params: int
    grads: int
    optimizer: int


def state_memory(model: ModelConfig, dims: ParallelDims, stage: int, device: str = "cpu",
                 split: tuple[int, ...] | None = None) -> StateMemory:
    """Bytes of fp32 master weights, their gradients and AdamW's two moments on one rank.

    AdamW also keeps a 4-byte step counter per tensor; it lives on the CPU even when the
    parameters are on a GPU, so it only counts toward device memory on CPU runs.
    """
    sp = stage_params(model, dims, stage, split)
    steps = sp.tensors * FP32 if device == "cpu" else 0
    return StateMemory(params=sp.elements * FP32, grads=sp.elements * FP32,
                       optimizer=2 * sp.elements * FP32 + steps)
