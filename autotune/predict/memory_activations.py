"""One micro-batch through one layer: what autograd keeps (part of the memory model,
`autotune/predict/memory.py`, whose docstring tells the whole story).

Counted tensor by tensor from what the trainable's code makes autograd keep: norms, q/k/v and
the CPU flash-attention output and log-sum-exp, router probabilities and top-k bookkeeping,
dispatched rows and all-to-all permutations, SwiGLU intermediates, autocast's low-precision
copies, logits and cross entropy. Every term takes ints or, for many candidates at once, int
arrays (see `autotune.predict.memory_state.pick`).

With bf16 parameters (`bf16-params`) there is no autocast and nothing is cast per weight: the
residual stream, the norms' outputs and the matmuls are bf16, while the norms and the router
still compute in fp32 from fp32 copies of their inputs.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, NamedTuple

from autotune.predict.memory_state import BOOL, FP32, INT64, LOW, pick
from trainables.moe.config import ModelConfig


class Dims(NamedTuple):
    """The sizes every term is written in, for one micro-batch on one rank (ints, or int arrays
    with one element per candidate)."""

    t: Any  # tokens of the micro-batch (micro_batch_size * seq_len)
    d: int  # model width (the residual stream is never split)
    dl: Any  # attention width held here (d / tp)
    hl: Any  # attention heads held here
    e: int  # experts in total (router width)
    el: Any  # experts held here (e / ep)
    k: int  # experts per token
    f: Any  # expert hidden size held here (ffn_hidden / tp)
    fd: Any  # dense FFN hidden size held here
    v: Any  # vocabulary rows held here (vocab / tp)
    r0: Any  # expert assignments this rank's router keeps (top_k per token, capacity-capped)
    r: Any  # rows this rank's experts process (balanced: r0, however EP shuffles them)
    a: Any  # bytes of a matmul output: 4 in fp32, 2 in bf16/fp16 (autocast) and bf16-params
    low: Any  # autocast on (bool)
    half: Any  # bf16 parameters, no autocast (bool)
    s: Any  # bytes of a residual-stream element: 2 with bf16 parameters, else 4
    tp: Any
    ep: Any


@lru_cache(maxsize=1 << 12)
def kept_assignments(model: ModelConfig, t: int) -> int:
    """Expert assignments a router keeps of a micro-batch of `t` tokens (top_k per token, less
    what the capacity drops)."""
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
    return r0


def dims_of(model: ModelConfig, tp: Any, ep: Any, t: Any, r0: Any, low: Any, half: Any = False) -> Dims:
    """The sizes of a micro-batch of `t` tokens whose router keeps `r0` assignments."""
    e = model.n_experts
    return Dims(t=t, d=model.d_model, dl=model.d_model // tp, hl=model.n_heads // tp, e=e, el=e // ep,
                k=model.top_k, f=model.ffn_hidden // tp, fd=model.dense_ffn // tp, v=model.vocab_size // tp,
                r0=r0, r=r0, a=pick(low | half, LOW, FP32), low=low, half=half, s=pick(half, LOW, FP32), tp=tp,
                ep=ep)


def _norm_saved(x: Dims, consumers_cast: int) -> Any:
    """RMSNorm in fp32: rsqrt and the normalised input are saved for the weight's gradient.

    Its output is saved by whoever consumes it: in fp32 the linears keep the output itself;
    under autocast each linear keeps its own low-precision copy (`consumers_cast` copies). With
    bf16 parameters the norm also keeps the fp32 copy of its bf16 input (and of its weight), and
    its bf16 output is kept once, by every consumer alike (by none if only a router reads it).
    """
    saved = x.t * FP32 + x.t * x.d * FP32  # rsqrt (one per token), x * rsqrt
    saved = saved + pick(x.half, x.t * x.d * FP32 + x.d * FP32, 0)
    if consumers_cast:
        return saved + pick(x.low, consumers_cast * x.t * x.d * LOW, x.t * x.d * x.s)
    return saved + pick(x.half, 0, x.t * x.d * FP32)  # a router's own fp32 copy is counted with it


def _attention_saved(x: Dims, selective: Any) -> Any:
    """Attention sub-block of a layer, up to and including its residual add."""
    saved = _norm_saved(x, consumers_cast=3)  # q, k and v each cast the normalised input
    saved += 3 * x.t * x.dl * x.a  # q, k, v: the inputs SDPA keeps
    saved += x.t * x.dl * x.a  # SDPA output: kept by wo (also when SDPA itself is recomputed)
    saved += pick(selective, 0, x.t * x.hl * FP32)  # SDPA's log-sum-exp, one per query and head (CPU flash kernel)
    # residual stream after attention: kept by the FFN norm as its input (with bf16 parameters
    # the norm keeps its fp32 copy instead)
    saved += pick(x.half, 0, x.t * x.d * FP32)
    return saved


def _router_saved(x: Dims) -> Any:
    """Softmax router in fp32 and the bookkeeping its gradient needs."""
    saved = x.t * x.e * FP32  # softmax probabilities (also feed the aux loss)
    saved += x.t * x.k * INT64  # top-k indices
    if x.k > 1:
        saved += x.t * x.k * FP32 + x.t * FP32  # top-k weights and their sum (renormalisation)
    saved += x.e * FP32  # per-expert load fraction kept by the aux loss product
    return saved


def _moe_parts(x: Dims) -> tuple[Any, Any, Any, Any]:
    """(kept through the expert backward, freed before it, expert hidden, low-precision expert
    weight copies) for one MoE FFN sub-block, its norm and router included."""
    kept = _norm_saved(x, consumers_cast=0)  # the router reads the fp32 output of the norm
    kept += pick(x.half, x.t * x.d * FP32, 0)  # ... an fp32 copy of the bf16 one
    kept += _router_saved(x)
    kept += x.r0 * INT64  # token index of every kept assignment (gather of the dispatched rows)
    # The w1 and w3 grouped GEMMs keep the dispatched rows (under autocast their one low-precision
    # copy), and the group offsets (int32).
    kept += x.r * x.d * x.a + x.el * FP32
    kept += pick(x.ep > 1, x.r * INT64, 0)  # permutation from source-rank order to expert order
    hidden = 4 * x.r * x.f * x.a  # SwiGLU: w1 out, silu out, w3 out, their product
    weights = pick(x.low, 3 * x.el * x.d * x.f * LOW, 0)  # each expert's slices, cast per call
    freed = x.r0 * INT64 + x.r0 * FP32  # assignment order and its gathered routing weights
    freed += x.r0 * x.d * x.a  # expert output back at this rank (kept by the weighting product)
    freed += x.r0 * x.d * FP32  # weighted output (kept by index_add as its source)
    freed += x.r0 * INT64  # token index of the scatter back (index_add)
    freed += pick(x.ep > 1, x.r * INT64, 0)  # inverse permutation of the return trip
    return kept, freed, hidden, weights


def _moe_forward_extra(x: Dims) -> Any:
    """Bytes an MoE layer's forward (or its recompute) holds at its worst moment, the return
    all-to-all, beyond what it keeps for backward: the forward's locals and the dispatch chain."""
    extra = x.t * x.e * FP32  # router logits
    extra += 2 * x.t * x.k * INT64  # token of each assignment (repeat) and the experts in sorted order
    if x.k > 1:
        extra += x.t * x.k * INT64 + 2 * x.t * x.k * FP32  # slot-major expert ids, renormalised weights (twice)
    else:
        extra += x.t * FP32  # top-1 weights
    # capacity: position of each assignment and the keep mask
    extra += pick(x.r0 < x.t * x.k, x.t * x.k * (INT64 + BOOL), 0)
    # the gathered rows, held by the caller while the experts run (with bf16 parameters they are
    # the GEMMs' own input unless EP moved them)
    extra += pick(x.half, pick(x.ep > 1, x.r0 * x.d * LOW, 0), pick((x.ep > 1) | x.low, x.r0 * x.d * FP32, 0))
    # concatenated expert outputs (TP sums, EP permutes a copy)
    extra += pick((x.tp > 1) | (x.ep > 1), x.r * x.d * x.a, 0)
    extra += pick((x.tp > 1) & (x.ep > 1), x.r * x.d * x.a, 0)  # the TP sum, before the permutation back
    extra += pick(x.ep > 1, x.r * x.d * x.a, 0)  # permuted back to source-rank order, input of the all-to-all
    return extra


def _dense_parts(x: Dims) -> tuple[Any, Any]:
    """(norm and inputs, SwiGLU hidden) of a dense FFN sub-block."""
    kept = _norm_saved(x, consumers_cast=2)  # w1 and w3 each cast the normalised input
    hidden = 4 * x.t * x.fd * x.a
    return kept, hidden


class Unit(NamedTuple):
    """Bytes of one micro-batch through one layer of each kind and through the stage ends."""

    resid: Any  # one copy of the residual stream (a block's output, a stage's input or output)
    kept_moe: Any  # what an MoE layer keeps until its backward (under the recompute mode)
    kept_dense: Any  # ... a dense layer
    moe_cur: Any  # an MoE layer's own tensors still alive at the peak of its expert backward
    moe_bwd: Any  # gradient temporaries at that moment (residual gradient not included)
    dense_cur: Any  # the same for a dense FFN layer, at the peak of its FFN backward
    dense_bwd: Any
    moe_fwd: Any  # an MoE layer's own tensors at the worst moment of its forward (or recompute)
    moe_all: Any  # an MoE layer's own tensors as its backward starts
    moe_entry: Any  # gradient temporaries as its backward starts (residual gradient not included)
    embed: Any  # first stage: embedding bookkeeping and the sum entering layer 0
    head: Any  # last stage: final norm and cross entropy
    grad_ce: Any  # last stage: gradient temporaries at the start of the loss backward
    logits: Any
    attn_cast: Any  # autocast's low-precision copies of one layer's attention weights (0 in fp32)
    dense_cast: Any  # ... of a dense FFN's weights
    head_cast: Any  # ... of the LM head
    low: Any
    full: Any
    half: Any  # bf16 parameters (fp32 main gradients and master weights: `memory_state.state_bytes`)


@lru_cache(maxsize=1 << 14)
def unit(model: ModelConfig, tp: int, ep: int, micro_batch_size: int, seq_len: int, precision: str,
         recompute: str) -> Unit:
    """`unit_terms` of one candidate (memoised: shared by every candidate with these knobs)."""
    t = micro_batch_size * seq_len
    return unit_terms(model, tp, ep, t, kept_assignments(model, t), precision in ("bf16", "fp16"), seq_len,
                      recompute == "selective", recompute == "full", precision == "bf16-params")


def unit_terms(model: ModelConfig, tp: Any, ep: Any, t: Any, r0: Any, low: Any, seq_len: int, selective: Any,
               full: Any, half: Any = False) -> Unit:
    """The per-layer terms of micro-batches of `t` tokens (`r0`: `kept_assignments`); every
    argument but the model and seq_len may be an array, one element per candidate."""
    x = dims_of(model, tp, ep, t, r0, low, half)
    resid = x.t * x.d * x.s
    attn = _attention_saved(x, selective)
    moe_kept, moe_freed, moe_hidden, moe_weights = _moe_parts(x)
    dense_kept, dense_hidden = _dense_parts(x)
    # Full recompute keeps only each block's output (the next block's input); the rest is
    # rebuilt in backward, where it counts as a backward allocation.
    # The block's output, kept by the next norm (with bf16 parameters, by nothing: the norm keeps
    # its fp32 copy).
    out = pick(half, 0, resid)
    kept_moe = pick(full, resid, attn + moe_kept + moe_freed + moe_hidden + moe_weights + out)
    kept_dense = pick(full, resid, attn + dense_kept + dense_hidden + out)

    # Inside the expert backward, the grouped GEMMs' gradients are made one weight at a time, w2's
    # first: (a) as w2's GEMM backward makes its weight gradient (in the GEMM's precision), every
    # saved tensor of the layer is alive, with the gradients of the expert output, of the
    # routing weights and of the SwiGLU product; (b) under autocast, as that gradient is cast
    # back to fp32 for the fp32 weight, w2's GEMM has freed its input (the product) and its
    # weight copy, and its low-precision weight gradient is still held.
    w = x.el * x.d * x.f
    cur_a = attn + moe_kept + moe_hidden + moe_weights
    bwd_a = w * x.a + x.r0 * x.d * x.a + x.r0 * FP32 + x.r * x.f * x.a
    cur_b = cur_a - x.r * x.f * x.a - w * LOW
    bwd_b = x.r * x.f * x.a + w * (LOW + FP32) + x.r0 * FP32
    b = x.low & (cur_b + bwd_b > cur_a + bwd_a)
    moe_cur, moe_bwd = pick(b, cur_b, cur_a), pick(b, bwd_b, bwd_a)
    # The forward (and its recompute under full recompute) peaks at the return all-to-all: every
    # saved tensor of the layer so far (all but the weighting and scatter ones), plus its locals.
    moe_fwd = attn + moe_kept + moe_hidden + moe_weights + x.r0 * INT64 + pick(x.ep > 1, x.r * INT64, 0)
    moe_fwd += x.r0 * x.d * x.a + _moe_forward_extra(x)
    # The backward of the layer starts with everything it kept alive but the scatter's source and
    # index, while the gradients of that source, of the expert output and the product for the
    # routing weights' gradient (three routed-rows x d_model fp32 tensors) are computed.
    moe_all = attn + moe_kept + moe_freed + moe_hidden + moe_weights - x.r0 * x.d * FP32 - x.r0 * INT64
    moe_entry = 3 * x.r0 * x.d * FP32 + x.r0 * FP32
    # In the dense FFN backward, at w2: its input is gone; gradients of its output, of the hidden
    # product and of the weight (through the low-precision copy under autocast).
    dense_cur = attn + dense_kept + dense_hidden - x.t * x.fd * x.a
    dense_bwd = (x.t * x.d * x.a + 2 * x.t * x.fd * x.a + x.d * x.fd * x.s
                 + pick(x.low, x.d * x.fd * LOW, 0))

    # First stage: ids shifted into this rank's vocab slice (kept by the embedding backward), the
    # out-of-slice mask, the positions, and the sum that enters layer 0.
    embed = x.t * INT64 + x.t * BOOL + seq_len * INT64 + resid
    # Last stage: the final norm (the head keeps its input) and cross entropy. Without TP the
    # log-softmax output; vocab-parallel cross entropy keeps the max-shifted logits (gather
    # needs them) and their exponentials, plus per-token index and mask bookkeeping.
    head = _norm_saved(x, consumers_cast=1) + pick(
        x.tp == 1, x.t * x.v * FP32, 2 * x.t * x.v * FP32 + x.t * (2 * INT64 + BOOL + 2 * FP32))
    # Start of the loss backward: two vocab-sized fp32 gradients at once (nll's zero-filled
    # gradient and the log-softmax one; with TP, gather's zero-filled one and its scatter).
    grad_ce = 2 * x.t * x.v * FP32
    return Unit(resid=resid, kept_moe=kept_moe, kept_dense=kept_dense, moe_cur=moe_cur, moe_bwd=moe_bwd,
                dense_cur=dense_cur, dense_bwd=dense_bwd, moe_fwd=moe_fwd, moe_all=moe_all,
                moe_entry=moe_entry, embed=embed, head=head, grad_ce=grad_ce, logits=x.t * x.v * x.a,
                attn_cast=pick(x.low, 4 * x.d * x.dl * LOW, 0), dense_cast=pick(x.low, 3 * x.d * x.fd * LOW, 0),
                head_cast=pick(x.low, x.v * x.d * LOW, 0), low=x.low, full=full, half=half)
