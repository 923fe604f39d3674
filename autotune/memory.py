"""Analytic per-rank memory model: what a layout needs before it is launched.

Parameters, gradients and optimizer states are closed-form counts of the shards a rank
holds (exact: the trainable's own measurement must equal them byte for byte).

Activations and the rest are counted from what the trainable's code makes autograd keep,
tensor by tensor, for one micro-batch on one pipeline stage (`_unit`: norms, q/k/v and the
CPU flash-attention output and log-sum-exp, router probabilities and top-k bookkeeping,
dispatched rows and all-to-all permutations, SwiGLU intermediates, autocast's low-precision
copies, logits and cross entropy), and then placed on the timeline of a training step to find
the moment of the peak (`_stage`, `_place`):

* the forward of a micro-batch leaves its saved tensors alive until its backward;
* the schedule decides how many micro-batches are alive when the worst backward starts (one
  without pipelining, `pp - stage` under 1F1B, all of them under GPipe), and what the pipeline
  keeps besides (receive buffers, the last stage's logits, pending sends);
* inside a micro-batch the candidates are the start of the loss backward, the forward (or,
  under full recompute, the recompute) of the last MoE layer at its return all-to-all, the
  start of that layer's backward, the middle of its expert backward (where the stacked expert
  weights' gradients are materialised per expert and summed), and the backward of the last
  dense FFN;
* after the backward come the gradient all-reduce and the optimizer step (AdamW
  temporaries), each a candidate of its own. The trainable's default, bucketed reduction
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
(so the expert-weight gradients take three copies of one weight where two would do), and
AdamW's step counters are counted in the optimizer bytes but never seen in the peak.

Routing is taken as balanced (every rank's experts process as many rows as its router sends
out); a skewed router makes the busiest EP rank hold more. `benchmarks/memory_model.py`
checks every term against measurements.

Everything here is plain arithmetic on the config (no torch), cached per layout and stage, so
that screening a hundred thousand candidate layouts stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

from autotune.device_memory import DeviceOverhead, overhead_for
from trainables.moe.config import ModelConfig, ParallelDims, RunShape, stage_layer_counts

FP32 = 4
LOW = 2  # bf16 / fp16 under autocast
INT64 = 8
BOOL = 1


@dataclass(frozen=True)
class StageParams:
    """Parameter elements and tensors held by one rank of a pipeline stage."""

    elements: int
    tensors: int


@lru_cache(maxsize=1 << 16)  # pure, and asked for again by every candidate that shares it
def _moe_count(model: ModelConfig, lo: int, hi: int) -> int:
    """MoE layers among global layer indices [lo, hi) (see `ModelConfig.is_moe_layer`)."""
    start, every = max(lo, model.first_dense_layers), model.moe_every
    if start >= hi:
        return 0
    first = model.first_dense_layers + -(-(start - model.first_dense_layers) // every) * every
    return 0 if first >= hi else (hi - 1 - first) // every + 1


@lru_cache(maxsize=1 << 16)  # pure, and asked for again by every candidate that shares it
def _last_layer(model: ModelConfig, lo: int, hi: int, moe: bool) -> int | None:
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
def _stage_range(model: ModelConfig, dims: ParallelDims, stage: int,
                 split: tuple[int, ...] | None) -> tuple[int, int]:
    counts = stage_layer_counts(model, dims, split)
    lo = sum(counts[:stage])
    return lo, lo + counts[stage]


def stage_params(model: ModelConfig, dims: ParallelDims, stage: int,
                 split: tuple[int, ...] | None = None) -> StageParams:
    d, tp = model.d_model, dims.tp
    lo, hi = _stage_range(model, dims, stage, split)
    n_moe = _moe_count(model, lo, hi)
    n_dense = hi - lo - n_moe
    # Every layer: two norms, q/k/v/o split by heads.
    elements = (hi - lo) * (2 * d + 4 * d * d // tp)
    tensors = (hi - lo) * 6
    # MoE layers: the router (replicated) and this rank's experts, split by hidden size.
    elements += n_moe * (d * model.n_experts + 3 * (model.n_experts // dims.ep) * d * (model.ffn_hidden // tp))
    tensors += n_moe * 4
    # Dense layers: a SwiGLU split by hidden size.
    elements += n_dense * 3 * d * (model.dense_ffn // tp)
    tensors += n_dense * 3
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


@lru_cache(maxsize=1 << 16)  # pure, and asked for again by every candidate that shares it
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
    # CUDA only (autotune/device_memory.py): the allocator's slack beyond `total`, and what the
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


# ---------------------------------------------------------------------------------------------
# One micro-batch through one layer: what autograd keeps


@dataclass(frozen=True)
class _Dims:
    """The sizes every term is written in, for one micro-batch on one rank."""

    t: int  # tokens of the micro-batch (micro_batch_size * seq_len)
    d: int  # model width (the residual stream is never split)
    dl: int  # attention width held here (d / tp)
    hl: int  # attention heads held here
    e: int  # experts in total (router width)
    el: int  # experts held here (e / ep)
    k: int  # experts per token
    f: int  # expert hidden size held here (ffn_hidden / tp)
    fd: int  # dense FFN hidden size held here
    v: int  # vocabulary rows held here (vocab / tp)
    r0: int  # expert assignments this rank's router keeps (top_k per token, capacity-capped)
    r: int  # rows this rank's experts process (balanced: r0, however EP shuffles them)
    a: int  # bytes of an autocast matmul output: 4 in fp32, 2 in bf16/fp16
    low: bool  # autocast on
    tp: int
    ep: int


def _dims(model: ModelConfig, dims: ParallelDims, shape: RunShape) -> _Dims:
    t = shape.micro_batch_size * shape.seq_len
    k, e = model.top_k, model.n_experts
    r0 = t * k
    if model.capacity_factor is not None:
        # Each expert keeps at most `capacity` rows. With each token's k experts drawn uniformly,
        # an expert's load is Binomial(t, k / e); what it drops is the expected excess over the
        # capacity (normal approximation).
        capacity = math.ceil(model.capacity_factor * t * k / e)
        mean = t * k / e
        sd = math.sqrt(t * (k / e) * (1 - k / e)) or 1e-9
        z = (capacity - mean) / sd
        excess = sd * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        excess -= (capacity - mean) * 0.5 * math.erfc(z / math.sqrt(2))
        r0 = min(r0, round(t * k - e * max(0.0, excess)), e * capacity)
    low = shape.precision in ("bf16", "fp16")
    return _Dims(t=t, d=model.d_model, dl=model.d_model // dims.tp, hl=model.n_heads // dims.tp, e=e,
                 el=e // dims.ep, k=k, f=model.ffn_hidden // dims.tp, fd=model.dense_ffn // dims.tp,
                 v=model.vocab_size // dims.tp, r0=r0, r=r0, a=LOW if low else FP32, low=low,
                 tp=dims.tp, ep=dims.ep)


def _norm_saved(x: _Dims, consumers_cast: int) -> int:
    """RMSNorm in fp32: rsqrt and the normalised input are saved for the weight's gradient.

    Its output is saved by whoever consumes it: in fp32 the linears keep the output itself;
    under autocast each linear keeps its own low-precision copy (`consumers_cast` copies).
    """
    saved = x.t * FP32 + x.t * x.d * FP32  # rsqrt (one per token), x * rsqrt
    if x.low and consumers_cast:
        saved += consumers_cast * x.t * x.d * LOW
    else:
        saved += x.t * x.d * FP32
    return saved


def _attention_saved(x: _Dims, recompute: str) -> int:
    """Attention sub-block of a layer, up to and including its residual add."""
    saved = _norm_saved(x, consumers_cast=3)  # q, k and v each cast the normalised input
    saved += 3 * x.t * x.dl * x.a  # q, k, v: the inputs SDPA keeps
    saved += x.t * x.dl * x.a  # SDPA output: kept by wo (also when SDPA itself is recomputed)
    if recompute != "selective":
        saved += x.t * x.hl * FP32  # SDPA's log-sum-exp, one per query and head (CPU flash kernel)
    saved += x.t * x.d * FP32  # residual stream after attention (input of the FFN norm)
    return saved


def _router_saved(x: _Dims) -> int:
    """Softmax router in fp32 and the bookkeeping its gradient needs."""
    saved = x.t * x.e * FP32  # softmax probabilities (also feed the aux loss)
    saved += x.t * x.k * INT64  # top-k indices
    if x.k > 1:
        saved += x.t * x.k * FP32 + x.t * FP32  # top-k weights and their sum (renormalisation)
    saved += x.e * FP32  # per-expert load fraction kept by the aux loss product
    return saved


def _moe_parts(x: _Dims) -> tuple[int, int, int, int]:
    """(kept through the expert backward, freed before it, expert hidden, low-precision expert
    weight copies) for one MoE FFN sub-block, its norm and router included."""
    kept = _norm_saved(x, consumers_cast=0)  # the router reads the fp32 output of the norm
    kept += _router_saved(x)
    kept += x.r0 * INT64  # token index of every kept assignment (gather of the dispatched rows)
    if x.low:
        kept += 2 * x.r * x.d * LOW  # w1 and w3 matmuls each keep a low-precision copy of their rows
    else:
        kept += x.r * x.d * FP32  # dispatched rows, kept by the w1 and w3 matmuls
    if x.ep > 1:
        kept += x.r * INT64  # permutation from source-rank order to expert order
    hidden = 4 * x.r * x.f * x.a  # SwiGLU: w1 out, silu out, w3 out, their product
    weights = 3 * x.el * x.d * x.f * LOW if x.low else 0  # each expert's slices, cast per call
    freed = x.r0 * INT64 + x.r0 * FP32  # assignment order and its gathered routing weights
    freed += x.r0 * x.d * x.a  # expert output back at this rank (kept by the weighting product)
    freed += x.r0 * x.d * FP32  # weighted output (kept by index_add as its source)
    freed += x.r0 * INT64  # token index of the scatter back (index_add)
    if x.ep > 1:
        freed += x.r * INT64  # inverse permutation of the return trip
    return kept, freed, hidden, weights


def _moe_forward_extra(x: _Dims) -> int:
    """Bytes an MoE layer's forward (or its recompute) holds at its worst moment, the return
    all-to-all, beyond what it keeps for backward: the forward's locals and the dispatch chain."""
    extra = x.t * x.e * FP32  # router logits
    extra += 2 * x.t * x.k * INT64  # token of each assignment (repeat) and the experts in sorted order
    if x.k > 1:
        extra += x.t * x.k * INT64 + 2 * x.t * x.k * FP32  # slot-major expert ids, renormalised weights (twice)
    else:
        extra += x.t * FP32  # top-1 weights
    if x.r0 < x.t * x.k:
        extra += x.t * x.k * (INT64 + BOOL)  # capacity: position of each assignment and the keep mask
    if x.ep > 1 or x.low:
        extra += x.r0 * x.d * FP32  # the gathered rows, held by the caller while the experts run
    chain = x.tp > 1 or x.ep > 1
    if chain:
        extra += x.r * x.d * x.a  # concatenated expert outputs (TP sums, EP permutes a copy)
    if x.tp > 1 and x.ep > 1:
        extra += x.r * x.d * x.a  # the TP sum, before the permutation back
    if x.ep > 1:
        extra += x.r * x.d * x.a  # permuted back to source-rank order, input of the all-to-all
    return extra


def _dense_parts(x: _Dims) -> tuple[int, int]:
    """(norm and inputs, SwiGLU hidden) of a dense FFN sub-block."""
    kept = _norm_saved(x, consumers_cast=2)  # w1 and w3 each cast the normalised input
    hidden = 4 * x.t * x.fd * x.a
    return kept, hidden


class _Unit(NamedTuple):
    """Bytes of one micro-batch through one layer of each kind and through the stage ends."""

    resid: int  # one copy of the residual stream (a block's output, a stage's input or output)
    kept_moe: int  # what an MoE layer keeps until its backward (under the recompute mode)
    kept_dense: int  # ... a dense layer
    moe_cur: int  # an MoE layer's own tensors still alive at the peak of its expert backward
    moe_bwd: int  # gradient temporaries at that moment (residual gradient not included)
    dense_cur: int  # the same for a dense FFN layer, at the peak of its FFN backward
    dense_bwd: int
    moe_fwd: int  # an MoE layer's own tensors at the worst moment of its forward (or recompute)
    moe_all: int  # an MoE layer's own tensors as its backward starts
    moe_entry: int  # gradient temporaries as its backward starts (residual gradient not included)
    embed: int  # first stage: embedding bookkeeping and the sum entering layer 0
    head: int  # last stage: final norm and cross entropy
    grad_ce: int  # last stage: gradient temporaries at the start of the loss backward
    logits: int
    attn_cast: int  # autocast's low-precision copies of one layer's attention weights
    dense_cast: int  # ... of a dense FFN's weights
    head_cast: int  # ... of the LM head
    low: bool
    full: bool


@lru_cache(maxsize=1 << 14)
def _unit(model: ModelConfig, tp: int, ep: int, micro_batch_size: int, seq_len: int, precision: str,
          recompute: str) -> _Unit:
    x = _dims(model, ParallelDims(ep=ep, tp=tp), RunShape(micro_batch_size, micro_batch_size, seq_len, precision))
    full = recompute == "full"
    resid = x.t * x.d * FP32
    attn = _attention_saved(x, recompute)
    moe_kept, moe_freed, moe_hidden, moe_weights = _moe_parts(x)
    dense_kept, dense_hidden = _dense_parts(x)
    # Full recompute keeps only each block's output (the next block's input); the rest is
    # rebuilt in backward, where it counts as a backward allocation.
    kept_moe = resid if full else attn + moe_kept + moe_freed + moe_hidden + moe_weights + resid
    kept_dense = resid if full else attn + dense_kept + dense_hidden + resid

    # Inside the expert backward, at the second expert: the first expert's tensors are gone (and
    # the second's hidden product), and so are the layer's output, routing weights and scatter
    # indices. The attention part and the router wait for the end of the layer's backward.
    if x.el > 1:
        cur_hidden = max(0, moe_hidden - 5 * (x.r // x.el) * x.f * x.a)
        cur_weights = max(0, moe_weights - 4 * x.d * x.f * LOW) if x.low else 0
    else:
        cur_hidden, cur_weights = moe_hidden - x.r * x.f * x.a, 0
    moe_cur = attn + moe_kept + cur_hidden + cur_weights
    # Gradient of a stacked expert weight: `w[e]`'s backward materialises a zero-filled full-size
    # tensor per expert, and the engine sums them (out of place under the memory tracker) while
    # the previous sum is alive: three copies of one weight, one of each of the other two.
    w = x.el * x.d * x.f * FP32
    moe_bwd = (5 if x.el > 1 else 3) * w
    moe_bwd += x.r0 * x.d * x.a + x.r0 * FP32  # gradients of the expert output and routing weights
    moe_bwd += (x.r // x.el) * (x.f * x.a + x.d * FP32)  # current expert's hidden and input gradients
    # The forward (and its recompute under full recompute) peaks at the return all-to-all: every
    # saved tensor of the layer so far (all but the weighting and scatter ones), plus its locals.
    moe_fwd = attn + moe_kept + moe_hidden + moe_weights + x.r0 * INT64 + (x.r * INT64 if x.ep > 1 else 0)
    moe_fwd += x.r0 * x.d * x.a + _moe_forward_extra(x)
    # The backward of the layer starts with everything it kept alive but the scatter's source and
    # index, while the gradients of that source, of the expert output and the product for the
    # routing weights' gradient (three routed-rows x d_model fp32 tensors) are computed.
    moe_all = attn + moe_kept + moe_freed + moe_hidden + moe_weights - x.r0 * x.d * FP32 - x.r0 * INT64
    moe_entry = 3 * x.r0 * x.d * FP32 + x.r0 * FP32
    # In the dense FFN backward, at w2: its input is gone; gradients of its output, of the hidden
    # product and of the weight (through the low-precision copy under autocast).
    dense_cur = attn + dense_kept + dense_hidden - x.t * x.fd * x.a
    dense_bwd = x.t * x.d * x.a + 2 * x.t * x.fd * x.a + x.d * x.fd * FP32 + (x.d * x.fd * LOW if x.low else 0)

    # First stage: ids shifted into this rank's vocab slice (kept by the embedding backward), the
    # out-of-slice mask, the positions, and the sum that enters layer 0.
    embed = x.t * INT64 + x.t * BOOL + seq_len * INT64 + resid
    # Last stage: the final norm (the head keeps its input) and cross entropy.
    head = _norm_saved(x, consumers_cast=1)
    if tp == 1:
        head += x.t * x.v * FP32  # log-softmax output
    else:
        # Vocab-parallel cross entropy keeps the max-shifted logits (gather needs them) and their
        # exponentials, plus per-token index and mask bookkeeping.
        head += 2 * x.t * x.v * FP32 + x.t * (2 * INT64 + BOOL + 2 * FP32)
    # Start of the loss backward: two vocab-sized fp32 gradients at once (nll's zero-filled
    # gradient and the log-softmax one; with TP, gather's zero-filled one and its scatter).
    grad_ce = 2 * x.t * x.v * FP32
    return _Unit(resid=resid, kept_moe=kept_moe, kept_dense=kept_dense, moe_cur=moe_cur, moe_bwd=moe_bwd,
                 dense_cur=dense_cur, dense_bwd=dense_bwd, moe_fwd=moe_fwd,
                 moe_all=moe_all, moe_entry=moe_entry, embed=embed, head=head, grad_ce=grad_ce,
                 logits=x.t * x.v * x.a, attn_cast=4 * x.d * x.dl * LOW if x.low else 0,
                 dense_cast=3 * x.d * x.fd * LOW if x.low else 0, head_cast=x.v * x.d * LOW if x.low else 0,
                 low=x.low, full=full)


class _Stage(NamedTuple):
    """Everything about one stage and one micro-batch shape that the schedule does not change."""

    params: int
    grads: int
    optimizer: int
    per_mb: int  # forward bytes a micro-batch keeps alive until its backward
    step_fixed: int  # forward bytes alive for the whole step (autocast's weight copies)
    peak_fwd: int  # at the worst moment of the first micro-batch's backward: its forward bytes alive
    peak_bwd: int  # ... and the backward's own bytes (gradient temporaries, recomputed tensors)
    later_fwd: int  # the same for a later micro-batch of the step (see `held` in `_stage`)
    later_bwd: int
    drain_fwd: int  # the same for GPipe's last backward (no forward runs any more)
    drain_bwd: int
    resid: int  # one micro-batch of the residual stream (a stage's input, output, input gradient)
    logits: int  # logits of a micro-batch (the last pipeline stage keeps every one)
    fixed_other: int  # module buffers, less AdamW's step counters (see `_stage`)
    flat_dense: int  # gradient bytes averaged over dp * ep (one flat copy for the all-reduce)
    flat_expert: int  # expert gradient bytes averaged over dp
    adam_temps: int  # AdamW's temporaries at the optimizer step


def _stage(model: ModelConfig, dims: ParallelDims, u: _Unit, stage: int, split: tuple[int, ...] | None,
           device: str) -> _Stage:
    """The schedule-independent terms of one stage, from layer counts (no loop over layers)."""
    pp, tp = dims.pp, dims.tp
    lo, hi = _stage_range(model, dims, stage, split)
    n_layers = hi - lo
    n_moe = _moe_count(model, lo, hi)
    n_dense = n_layers - n_moe
    is_first, is_last = stage == 0, stage == pp - 1
    resid = u.resid
    embed = u.embed if is_first else 0
    per_mb = embed + (u.head if is_last else 0) + n_moe * u.kept_moe + n_dense * u.kept_dense
    # Autocast keeps one low-precision copy of every leaf weight it casts, for the whole step.
    step_fixed = n_layers * u.attn_cast + n_dense * u.dense_cast + (u.head_cast if is_last else 0)

    # -- the worst moment of the micro-batch that peaks ------------------------------------------
    # Each candidate: (its forward bytes alive, backward bytes, bytes held only in a later
    # micro-batch's backward, whether it is a backward moment).
    peaks = []
    if is_last:
        # Start of the loss backward: everything of the micro-batch is alive.
        peaks.append((per_mb, u.grad_ce, 0, True))
    stage_out = 0 if is_last else resid  # the pipeline holds it until this micro-batch's backward ends
    # Only the last layer of each kind can be the peak: an earlier one has freed more by then.
    for moe in (True, False):
        last = _last_layer(model, lo, hi, moe)
        if last is None:
            continue
        pos = last - lo
        moe_before = _moe_count(model, lo, last)
        if u.full:
            # Every block input up to this layer (stage > 0 receives layer 0's input into a
            # pipeline buffer, counted there; the embedding term holds stage 0's).
            before = embed + pos * resid
        else:
            before = embed + moe_before * u.kept_moe + (pos - moe_before) * u.kept_dense
        # Gradient of the residual stream, held for the skip connection; into the last layer of a
        # non-last stage it is the pipeline's gradient receive buffer, counted with the buffers.
        resid_grad = 0 if (not is_last and last == hi - 1) else resid
        # Under autocast every micro-batch after the first reuses the cached weight copies, whose
        # cast nodes are older than anything in its graph: the engine runs them last, so the
        # low-precision weight gradients of the layers behind (and of the head) wait until the
        # end of the backward.
        held = 0
        if u.low:
            after = hi - 1 - last
            held = after * u.attn_cast + (after - _moe_count(model, last + 1, hi)) * u.dense_cast
            held += u.head_cast if is_last else 0
        if moe:
            # The layer's forward at its return all-to-all (under full recompute, the same moment of
            # its recompute in backward), and the start of its backward.
            if u.full:
                peaks.append((before + stage_out, resid_grad + u.moe_fwd, held, True))
                peaks.append((before + stage_out, resid_grad + u.moe_all + u.moe_entry, held, True))
            else:
                peaks.append((before + u.moe_fwd, 0, 0, False))
                peaks.append((before + stage_out + u.moe_all, resid_grad + u.moe_entry, held, True))
        fwd = before + stage_out
        cur, bwd = (u.moe_cur, u.moe_bwd) if moe else (u.dense_cur, u.dense_bwd)
        bwd += resid_grad
        if u.full:
            bwd += cur  # the recomputed block's tensors are backward allocations
        else:
            fwd += cur
        peaks.append((fwd, bwd, held, True))
    # The worst moment of the micro-batch alone; with what a later micro-batch's backward still
    # holds; and of GPipe's last backward (no forward runs then). One pass: this runs for every
    # stage of every candidate a space screens. Ties keep the first, as max() would.
    peak = later = drain = None
    peak_sum = later_sum = drain_sum = -1
    for p in peaks:
        s2 = p[0] + p[1]
        s3 = s2 + p[2]
        if s2 > peak_sum:
            peak, peak_sum = p, s2
        if s3 > later_sum:
            later, later_sum = p, s3
        if p[3] and s3 > drain_sum:
            drain, drain_sum = p, s3
    peak_fwd, peak_bwd = peak[0], peak[1]
    later_fwd, later_bwd = later[0], later[1] + later[2]
    drain_fwd, drain_bwd = drain[0], drain[1] + drain[2]

    # -- after the backward: gradient all-reduce and AdamW ------------------------------------
    d, e = model.d_model, model.n_experts
    attn_w, dense_w = d * (d // tp), d * (model.dense_ffn // tp)
    expert_w = (e // dims.ep) * d * (model.ffn_hidden // tp)
    vocab_w = model.vocab_size // tp * d
    dense_elems = n_layers * (2 * d + 4 * attn_w) + n_moe * d * e + n_dense * 3 * dense_w
    largest = max(attn_w if n_layers else 0, expert_w if n_moe else 0, dense_w if n_dense else 0)
    if is_first:
        dense_elems += vocab_w + model.max_seq_len * d
        largest = max(largest, vocab_w, model.max_seq_len * d)
    if is_last:
        dense_elems += d + vocab_w
        largest = max(largest, vocab_w)

    st = state_memory(model, dims, stage, device, split)
    # AdamW on CPU runs tensor by tensor: the square root of the second moment and its scaled
    # copy, for the largest tensor. On CUDA it defaults to the multi-tensor path, whose square
    # root covers every parameter of the rank at once.
    adam_temps = 2 * largest * FP32 if device == "cpu" else st.params
    # Module buffers (MoE statistics: tokens per expert, dropped, aux sum, calls) are resident
    # and not parameters. AdamW's step counters are part of the optimizer bytes, but the CPU
    # tracker never sees them allocated (a factory it cannot observe), so the measured peak
    # lacks them and "other" comes out that much lower.
    buffers = n_moe * (e * INT64 + 3 * 8)
    steps = st.optimizer - 2 * st.params
    return _Stage(params=st.params, grads=st.grads, optimizer=st.optimizer, per_mb=per_mb, step_fixed=step_fixed,
                  peak_fwd=peak_fwd, peak_bwd=peak_bwd, later_fwd=later_fwd, later_bwd=later_bwd,
                  drain_fwd=drain_fwd, drain_bwd=drain_bwd,
                  resid=resid, logits=u.logits if is_last else 0, fixed_other=buffers - steps,
                  flat_dense=dense_elems * FP32, flat_expert=n_moe * 3 * expert_w * FP32,
                  adam_temps=adam_temps)


class _Layout:
    """The stages of one layout and micro-batch shape, and the predictions already made for it."""

    __slots__ = ("placed", "stages")

    def __init__(self, stages: tuple[_Stage, ...]) -> None:
        self.stages = stages
        # (micro-batches, global batch, gpipe, dense all-reduce, expert all-reduce, peers, device
    # overhead) -> prediction
        self.placed: dict[tuple[int, int, bool, bool, bool], MemoryPrediction] = {}


@lru_cache(maxsize=1 << 15)
def _layout(model: ModelConfig, tp: int, ep: int, pp: int, split: tuple[int, ...] | None, micro_batch_size: int,
            seq_len: int, precision: str, recompute: str, device: str) -> _Layout:
    """Per-stage terms of a layout, shared by every candidate that differs only in dp, global
    batch or schedule."""
    return _layout_of_unit(model, tp, ep, pp, split, _unit(model, tp, ep, micro_batch_size, seq_len, precision,
                                                           recompute), device)


@lru_cache(maxsize=1 << 15)
def _layout_of_unit(model: ModelConfig, tp: int, ep: int, pp: int, split: tuple[int, ...] | None, unit: _Unit,
                    device: str) -> _Layout:
    """Keyed by the unit's bytes, not by what produced them: bf16 and fp16 give the same units,
    and share their stages and placements."""
    dims = ParallelDims(pp=pp, ep=ep, tp=tp)
    return _Layout(tuple(_stage(model, dims, unit, s, split, device) for s in range(pp)))


def _place(st: _Stage, stage: int, pp: int, n: int, gpipe: bool, sync_dense: bool,
           sync_expert: bool) -> tuple[int, int]:
    """(activations less the step's data, other) at the peak of one stage's step: the worst of
    the backward of a micro-batch, the gradient all-reduce, the last stage's output merge and
    the optimizer step."""
    (_, _, _, per_mb, step_fixed, peak_fwd, peak_bwd, later_fwd, later_bwd, drain_fwd, drain_bwd, resid, logits,
     fixed_other, flat_dense, flat_expert, adam_temps) = st
    if pp == 1:
        if n > 1:
            act, other = step_fixed + later_fwd, fixed_other + later_bwd
        else:
            act, other = step_fixed + peak_fwd, fixed_other + peak_bwd
        end_act = 0
    else:
        is_first, is_last = stage == 0, stage == pp - 1
        # Receive buffers, one per micro-batch and kept across steps (activations into stage > 0,
        # gradients into stage < pp - 1), and on the last stage every micro-batch's logits (the
        # schedule's outputs, kept until the next step).
        end_act = n * (resid * ((not is_first) + (not is_last)) + logits)
        if not gpipe:
            # 1F1B: the worst backward is the first one that no further forward follows, holding
            # `pp - stage` micro-batches (it holds no more before, and from there on each
            # backward frees one); unless it is the first of the step, a stage > 0 also still
            # holds the previous micro-batch's input gradient in its pending send.
            live = min(n, pp - stage)
            if n > live:
                act = end_act + step_fixed + (live - 1) * per_mb + later_fwd
                other = fixed_other + later_bwd + (0 if is_first else resid)
            else:
                act = end_act + step_fixed + (live - 1) * per_mb + peak_fwd
                other = fixed_other + peak_bwd
        else:
            # GPipe: every micro-batch is alive at the first backward, but the pending sends keep
            # every stage output and every input gradient until the schedule ends, so where
            # recompute leaves little per micro-batch the last backward is worse.
            act = end_act + step_fixed + (n - 1) * per_mb + peak_fwd
            other = fixed_other + peak_bwd
            if n > 1:
                a = end_act + step_fixed + drain_fwd + (0 if is_last else (n - 1) * resid)
                o = fixed_other + drain_bwd + (0 if is_first else (n - 1) * resid)
                if a + o > act + other:
                    act, other = a, o
        if is_last and end_act + n * logits > act + other - fixed_other:
            # The schedule concatenates every micro-batch's logits into the step's output.
            act, other = end_act + n * logits, fixed_other
    # Flat gradient all-reduce: one flat copy of the dense gradients (over dp * ep) and one of the
    # expert gradients (over dp); the first is still referenced while the second is built. The
    # tracker files these copies under activations (allocated outside backward and optimizer).
    flat = (flat_dense if sync_dense else 0) + (flat_expert if sync_expert else 0)
    if end_act + flat > act + other - fixed_other:
        act, other = end_act + flat, fixed_other
    # AdamW's temporaries (see `_stage`).
    if end_act + adam_temps > act + other - fixed_other:
        act, other = end_act, fixed_other + adam_temps
    return act, other


def _step_data(global_batch_size: int, seq_len: int, micro_batch_size: int, n: int) -> int:
    """The step's tokens: the whole global batch is generated on every rank, then this
    replica's inputs and targets are copied out of it (int64)."""
    return (global_batch_size * (seq_len + 1) + 2 * n * micro_batch_size * seq_len) * INT64


def _stage_prediction(model: ModelConfig, dims: ParallelDims, shape: RunShape, stage: int,
                      device: str = "cpu") -> MemoryPrediction:
    """One stage's prediction (every rank of a stage holds the same shards and activations)."""
    split = shape.stage_layers if shape.stage_layers is None else tuple(shape.stage_layers)
    st = _layout(model, dims.tp, dims.ep, dims.pp, split, shape.micro_batch_size, shape.seq_len,
                 shape.precision, shape.recompute, device).stages[stage]
    n = max(shape.accum_steps(dims), 1)
    flat = shape.grad_sync == "flat"
    act, other = _place(st, stage, dims.pp, n, shape.schedule == "gpipe", flat and dims.dp * dims.ep > 1,
                        flat and dims.dp > 1)
    return MemoryPrediction(params=st.params, grads=st.grads, optimizer=st.optimizer,
                            activations=act + _step_data(shape.global_batch_size, shape.seq_len,
                                                         shape.micro_batch_size, n),
                            other=other, stage=stage)


def clear_caches() -> None:
    """Forget every memoised term (benchmarks time screening from a cold start)."""
    for fn in (_moe_count, _last_layer, _stage_range, state_memory, _unit, _layout, _layout_of_unit):
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
    """`predict` from plain values: screening calls it for every candidate without building the
    dims and shape objects first."""
    layout = _layout(model, tp, ep, pp, split, micro_batch_size, seq_len, precision, recompute, device)
    n = max(global_batch_size // (micro_batch_size * dp * ep), 1)
    flat = grad_sync == "flat"  # the bucketed reduction copies nothing (see the module docstring)
    key = (n, global_batch_size, schedule == "gpipe", flat and dp * ep > 1, flat and dp > 1, tp * pp * dp * ep > 1,
           overhead)
    pred = layout.placed.get(key)
    if pred is None:
        best, worst = -1, (0, 0, 0)
        stages = layout.stages
        for stage, st in enumerate(stages):
            act, other = _place(st, stage, pp, n, key[2], key[3], key[4])
            total = st[0] + st[1] + st[2] + act + other
            if total > best:
                best, worst = total, (stage, act, other)
        stage, act, other = worst
        st = stages[stage]
        pred = MemoryPrediction(params=st.params, grads=st.grads, optimizer=st.optimizer,
                                activations=act + _step_data(global_batch_size, seq_len, micro_batch_size, n),
                                other=other, stage=stage)
        if device == "cuda":
            pred = _with_device_overhead(pred, key[5], overhead or overhead_for())
        layout.placed[key] = pred
    return pred


def _with_device_overhead(pred: MemoryPrediction, has_peers: bool, o: DeviceOverhead) -> MemoryPrediction:
    """Add a device profile's slack, context and NCCL terms to an allocated-peak prediction."""
    total = pred.total
    reserved = o.reserved(total)
    return replace(pred, reserved_extra=reserved - total,
                   device_extra=o.device(total, 2 if has_peers else 1) - reserved)
