"""Analytic per-rank memory model: what a layout needs before it is launched.

Parameters, gradients and optimizer states are closed-form counts of the shards a rank
holds (exact: the trainable's own measurement must equal them byte for byte). Activations
and the rest are estimates fitted to what the trainable measures (`benchmarks/memory_model.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainables.moe.config import ModelConfig, ParallelDims, RunShape, stage_layer_counts

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


@dataclass(frozen=True)
class MemoryPrediction:
    """Predicted bytes on the worst rank (the pipeline stage with the largest total)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    other: int
    stage: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.other

    def as_metrics(self) -> dict[str, int]:
        return {"pred_mem_params_bytes": self.params, "pred_mem_grads_bytes": self.grads,
                "pred_mem_optimizer_bytes": self.optimizer, "pred_mem_activations_bytes": self.activations,
                "pred_mem_other_bytes": self.other, "pred_peak_mem_bytes": self.total}


def _in_flight(dims: ParallelDims, shape: RunShape, stage: int) -> int:
    """Micro-batches whose activations a stage holds at once under the schedule."""
    if dims.pp == 1:
        return 1
    n = shape.accum_steps(dims)
    return n if shape.schedule == "gpipe" else min(n, dims.pp - stage)


def _activation_bytes_per_microbatch(model: ModelConfig, dims: ParallelDims, shape: RunShape, stage: int,
                                     split: tuple[int, ...] | None) -> tuple[int, int]:
    """(bytes kept for backward by one micro-batch on this stage, transient bytes at the peak).

    A first-order count of what autograd saves per layer; the coefficients are checked
    against measurements by benchmarks/memory_model.py.
    """
    d, tp, s, b = model.d_model, dims.tp, shape.seq_len, shape.micro_batch_size
    tokens = b * s
    act = 2 if shape.precision in ("bf16", "fp16") else 4
    counts = stage_layer_counts(model, dims, split)
    first = sum(counts[:stage])
    kept = 0
    for i in range(first, first + counts[stage]):
        attn_core = b * (model.n_heads // tp) * s * s * FP32 + 3 * tokens * d // tp * act
        if shape.recompute == "full":
            kept += tokens * d * FP32  # only the block input survives
            continue
        layer = 6 * tokens * d * FP32 + 2 * tokens * d // tp * act  # norms, residuals, attention in/out
        if shape.recompute != "selective":
            layer += attn_core
        if model.is_moe_layer(i):
            routed = tokens * model.top_k
            layer += 3 * tokens * model.n_experts * FP32  # router logits and probabilities
            layer += 3 * routed * d * FP32  # dispatched tokens, expert outputs, weighted outputs
            layer += 4 * routed * model.ffn_hidden // tp * act  # SwiGLU intermediates
        else:
            layer += 4 * tokens * model.dense_ffn // tp * act
        kept += layer
    transient = 0
    if stage == dims.pp - 1:
        logits = tokens * model.vocab_size // tp
        kept += 2 * logits * FP32
        transient += 2 * logits * FP32  # gradient of the logits at the start of backward
    return kept, transient


def predict(model: ModelConfig, dims: ParallelDims, shape: RunShape, device: str = "cpu") -> MemoryPrediction:
    """Per-category bytes of the worst rank of a layout, before anything runs."""
    best: MemoryPrediction | None = None
    for stage in range(dims.pp):
        st = state_memory(model, dims, stage, device, shape.stage_layers)
        kept, transient = _activation_bytes_per_microbatch(model, dims, shape, stage, shape.stage_layers)
        pred = MemoryPrediction(params=st.params, grads=st.grads, optimizer=st.optimizer,
                                activations=kept * _in_flight(dims, shape, stage), other=transient, stage=stage)
        if best is None or pred.total > best.total:
            best = pred
    return best
