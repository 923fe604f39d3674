"""Analytic per-rank memory model: what a layout needs before it is launched.

Parameters, gradients and optimizer states are closed-form counts of the shards a rank
holds (exact: the trainable's own measurement must equal them byte for byte).

Activations and the rest are counted from what the trainable's code makes autograd keep, tensor
by tensor, for one micro-batch on one pipeline stage (`memory_activations`: norms, q/k/v and
the CPU flash-attention output and log-sum-exp, router probabilities and top-k bookkeeping,
dispatched rows and all-to-all permutations, SwiGLU intermediates, autocast's low-precision
copies, logits and cross entropy), and then placed on the timeline of a training step to find
the moment of the peak (`memory_schedule`):

* the forward of a micro-batch leaves its saved tensors alive until its backward;
* the schedule decides how many micro-batches are alive when the worst backward starts (one
  without pipelining, `pp - stage` under 1F1B, all of them under GPipe), and what the pipeline
  keeps besides (receive buffers, the last stage's logits, pending sends);
* inside a micro-batch the candidates are the start of the loss backward, the forward (or,
  under full recompute, the recompute) of the last MoE layer at its return all-to-all, the
  start of that layer's backward, the middle of its expert backward (where the stacked expert
  weights' gradients are materialised per expert and summed), and the backward of the last
  dense FFN;
* after the backward comes the gradient all-reduce (the fused AdamW step allocates nothing);
  the trainable's default, bucketed reduction
  (`trainables/moe/grad_sync.py`) all-reduces the gradient buffers in place during backward:
  its buckets are the gradients themselves, allocated up front, so it adds nothing; the
  `flat` one copies the gradients into new flat buffers after backward.

The categories follow the trainable's measurement (`trainables/moe/measure.py`): whatever was
allocated outside backward and outside the optimizer step and is alive at the peak counts as
activations (that includes the step's data, autocast's weight copies, pipeline receive buffers
and the flat gradient buffers of the all-reduce); the rest of the peak beyond parameters,
gradients and optimizer states is "other" (gradient temporaries, recomputed activations,
module buffers). Two effects belong to that measurement rather than to training alone: under
the tracker (a Python dispatch mode) autograd sums gradients out of place instead of in place
(so the expert-weight gradients take three copies of one weight where two would do).

Routing is taken as balanced (every rank's experts process as many rows as its router sends
out); a skewed router makes the busiest EP rank hold more. `benchmarks/memory_model.py`
checks every term against measurements.

Everything here is plain arithmetic on the config (no torch), cached per layout and stage. The
terms are written once for ints and numpy arrays alike (`memory_state.pick`): `predict` runs
them for one candidate, `memory_batch.predict_many` for every candidate of a space at once
(screening 100,000 of them), with identical results.

Modules: `memory_state` (parameters, gradients, optimizer states; where the stages' layers lie),
`memory_activations` (one micro-batch through one layer), `memory_schedule` (the peak on the
step's timeline), this one (predictions, the device's overhead, caches) and `memory_batch`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from autotune.predict.device_memory import DeviceOverhead, overhead_for
from autotune.predict.memory_activations import Unit, kept_assignments, unit
from autotune.predict.memory_schedule import Stage, place, stage_terms, step_data, worst_stage
from autotune.predict.memory_state import (BOOL, FP32, INT64, LOW, StageParams, StateMemory, last_layer, moe_count,
                                   stage_params, stage_range, state_memory)
from trainables.moe.config import ModelConfig, ParallelDims, RunShape

__all__ = ["BOOL", "FP32", "INT64", "LOW", "MemoryPrediction", "StageParams", "StateMemory", "clear_caches",
           "predict", "predict_plain", "stage_params", "state_memory"]


class MemoryPrediction(NamedTuple):
    """Predicted bytes on the worst rank (the pipeline stage with the largest total).

    A named tuple, like Layout and Candidate: screening makes one for each of tens of thousands
    of candidates, and a tuple is built in C."""

    params: int
    grads: int
    optimizer: int
    activations: int
    other: int
    stage: int = 0
    # CUDA only (autotune/predict/device_memory.py): the allocator's slack beyond `total`, and what the
    # device holds beyond the reservation (CUDA context, NCCL buffers, library workspaces).
    reserved_extra: int = 0
    device_extra: int = 0

    @property
    def total(self) -> int:
        """The allocated peak (what `peak_mem_bytes` measures)."""
        return self.params + self.grads + self.optimizer + self.activations + self.other

    @property
    def reserved(self) -> int:
        return self.total + self.reserved_extra

    @property
    def device(self) -> int:
        """What the device has in use at the peak: the figure a memory cap is checked against."""
        return self.reserved + self.device_extra

    def as_metrics(self) -> dict[str, int]:
        out = {"pred_mem_params_bytes": self.params, "pred_mem_grads_bytes": self.grads,
               "pred_mem_optimizer_bytes": self.optimizer, "pred_mem_activations_bytes": self.activations,
               "pred_mem_other_bytes": self.other, "pred_peak_mem_bytes": self.total}
        if self.device_extra:
            out.update(pred_peak_mem_reserved_bytes=self.reserved, pred_peak_mem_device_bytes=self.device)
        return out


class _Layout:
    """The stages of one layout and micro-batch shape, and the predictions already made for it."""

    __slots__ = ("placed", "stages")

    def __init__(self, stages: tuple[Stage, ...]) -> None:
        self.stages = stages
        # (micro-batches, global batch, gpipe, dense all-reduce, expert all-reduce, peers, device
        # overhead) -> prediction
        self.placed: dict[tuple, MemoryPrediction] = {}


@lru_cache(maxsize=1 << 15)
def _layout(model: ModelConfig, tp: int, ep: int, pp: int, split: tuple[int, ...] | None, micro_batch_size: int,
            seq_len: int, precision: str, recompute: str, device: str) -> _Layout:
    """Per-stage terms of a layout, shared by every candidate that differs only in dp, global
    batch or schedule."""
    return _layout_of_unit(model, tp, ep, pp, split, unit(model, tp, ep, micro_batch_size, seq_len, precision,
                                                          recompute), device)


@lru_cache(maxsize=1 << 15)
def _layout_of_unit(model: ModelConfig, tp: int, ep: int, pp: int, split: tuple[int, ...] | None, u: Unit,
                    device: str) -> _Layout:
    """Keyed by the unit's bytes, not by what produced them: bf16 and fp16 give the same units,
    and share their stages and placements."""
    return _Layout(tuple(stage_terms(model, pp, tp, ep, u, s, split, device) for s in range(pp)))


def _stage_prediction(model: ModelConfig, dims: ParallelDims, shape: RunShape, stage: int,
                      device: str = "cpu") -> MemoryPrediction:
    """One stage's prediction (every rank of a stage holds the same shards and activations)."""
    split = shape.stage_layers if shape.stage_layers is None else tuple(shape.stage_layers)
    st = _layout(model, dims.tp, dims.ep, dims.pp, split, shape.micro_batch_size, shape.seq_len,
                 shape.precision, shape.recompute, device).stages[stage]
    n = max(shape.accum_steps(dims), 1)
    flat = shape.grad_sync == "flat"
    act, other = place(st, stage, dims.pp, n, shape.schedule == "gpipe", flat and dims.dp * dims.ep > 1,
                       flat and dims.dp > 1)
    return MemoryPrediction(params=st.params, grads=st.grads, optimizer=st.optimizer,
                            activations=act + step_data(shape.global_batch_size, shape.seq_len,
                                                        shape.micro_batch_size, n),
                            other=other, stage=stage)


def clear_caches() -> None:
    """Forget every memoised term (benchmarks time screening from a cold start)."""
    for fn in (moe_count, last_layer, stage_range, state_memory, kept_assignments, unit, _layout, _layout_of_unit):
        fn.cache_clear()


def predict(model: ModelConfig, dims: ParallelDims, shape: RunShape, device: str = "cpu",
            overhead: DeviceOverhead | None = None) -> MemoryPrediction:
    """Per-category bytes of the worst rank of a layout, before anything runs; on CUDA with the
    device's own overhead (`overhead`: a profile's terms, default the default CUDA profile's)."""
    split = shape.stage_layers if shape.stage_layers is None else tuple(shape.stage_layers)
    return predict_plain(model, dims.ep, dims.tp, dims.pp, dims.dp, shape.micro_batch_size, shape.global_batch_size,
                         shape.seq_len, shape.precision, shape.recompute, shape.schedule, device, split,
                         shape.grad_sync, overhead)


def predict_plain(model: ModelConfig, ep: int, tp: int, pp: int, dp: int, micro_batch_size: int,
                  global_batch_size: int, seq_len: int, precision: str, recompute: str, schedule: str,
                  device: str = "cpu", split: tuple[int, ...] | None = None,
                  grad_sync: str = "bucketed", overhead: DeviceOverhead | None = None) -> MemoryPrediction:
    """`predict` from plain values, without building the dims and shape objects first."""
    layout = _layout(model, tp, ep, pp, split, micro_batch_size, seq_len, precision, recompute, device)
    n = max(global_batch_size // (micro_batch_size * dp * ep), 1)
    flat = grad_sync == "flat"  # the bucketed reduction copies nothing (see the module docstring)
    key = (n, global_batch_size, schedule == "gpipe", flat and dp * ep > 1, flat and dp > 1, tp * pp * dp * ep > 1,
           overhead)
    pred = layout.placed.get(key)
    if pred is None:
        stages = layout.stages
        stage, act, other = worst_stage(stages, pp, n, key[2], key[3], key[4])
        st = stages[stage]
        pred = MemoryPrediction(params=st.params, grads=st.grads, optimizer=st.optimizer,
                                activations=act + step_data(global_batch_size, seq_len, micro_batch_size, n),
                                other=other, stage=stage)
        if device == "cuda":
            pred = _with_device_overhead(pred, key[5], overhead or overhead_for())
        layout.placed[key] = pred
    return pred


def _with_device_overhead(pred: MemoryPrediction, has_peers: bool, o: DeviceOverhead) -> MemoryPrediction:
    """Add a device profile's slack, context and NCCL terms to an allocated-peak prediction."""
    total = pred.total
    reserved = o.reserved(total)
    return pred._replace(reserved_extra=reserved - total,
                         device_extra=o.device(total, 2 if has_peers else 1) - reserved)
