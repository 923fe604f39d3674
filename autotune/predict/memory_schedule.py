"""A stage's micro-batches on the timeline of a training step: the moment of the peak (part of
the memory model, `autotune/predict/memory.py`, whose docstring tells the whole story).

`stage_terms` gathers what one stage holds for one micro-batch shape whatever the schedule;
`place` finds the peak of a step given the micro-batches, the schedule and the gradient
reduction; `worst_stage` the stage whose peak is largest. Like every term of the model they take
ints or int arrays, one element per candidate (see `autotune.predict.memory_state.pick`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from autotune.predict.memory_activations import Unit
from autotune.predict.memory_state import INT64, FP32, last_layer, moe_count, pick, smaller, stage_range, state_bytes
from trainables.moe.config import ModelConfig


class Stage(NamedTuple):
    """Everything about one stage and one micro-batch shape that the schedule does not change."""

    params: Any
    grads: Any
    optimizer: Any
    per_mb: Any  # forward bytes a micro-batch keeps alive until its backward
    step_fixed: Any  # forward bytes alive for the whole step (autocast's weight copies)
    peak_fwd: Any  # at the worst moment of the first micro-batch's backward: its forward bytes alive
    peak_bwd: Any  # ... and the backward's own bytes (gradient temporaries, recomputed tensors)
    later_fwd: Any  # the same for a later micro-batch of the step (see `held` in `stage_terms`)
    later_bwd: Any
    drain_fwd: Any  # the same for GPipe's last backward (no forward runs any more)
    drain_bwd: Any
    resid: Any  # one micro-batch of the residual stream (a stage's input, output, input gradient)
    logits: Any  # logits of a micro-batch (the last pipeline stage keeps every one)
    fixed_other: Any  # module buffers (see `stage_terms`)
    flat_dense: Any  # gradient bytes averaged over dp * ep (one flat copy for the all-reduce)
    flat_expert: Any  # expert gradient bytes averaged over dp


def stage_terms(model: ModelConfig, pp: int, tp: Any, ep: Any, u: Unit, stage: int,
                split: tuple[int, ...] | None, device: str) -> Stage:
    """The schedule-independent terms of one stage, from layer counts (no loop over layers)."""
    lo, hi = stage_range(model, pp, stage, split)
    n_layers = hi - lo
    n_moe = moe_count(model, lo, hi)
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
    peaks: list[tuple[Any, Any, Any, Any]] = []
    if is_last:
        # Start of the loss backward: everything of the micro-batch is alive.
        peaks.append((per_mb, u.grad_ce, 0, True))
    stage_out = 0 if is_last else resid  # the pipeline holds it until this micro-batch's backward ends
    full = u.full
    # Only the last layer of each kind can be the peak: an earlier one has freed more by then.
    for moe in (True, False):
        last = last_layer(model, lo, hi, moe)
        if last is None:
            continue
        pos = last - lo
        moe_before = moe_count(model, lo, last)
        # Under full recompute every block input up to this layer (stage > 0 receives layer 0's
        # input into a pipeline buffer, counted there; the embedding term holds stage 0's).
        before = embed + pick(full, pos * resid, moe_before * u.kept_moe + (pos - moe_before) * u.kept_dense)
        # Gradient of the residual stream, held for the skip connection; into the last layer of a
        # non-last stage it is the pipeline's gradient receive buffer, counted with the buffers.
        resid_grad = 0 if (not is_last and last == hi - 1) else resid
        # Under autocast every micro-batch after the first reuses the cached weight copies, whose
        # cast nodes are older than anything in its graph: the engine runs them last, so the
        # low-precision weight gradients of the layers behind (and of the head) wait until the
        # end of the backward. (In fp32 the copies are zero bytes.)
        after = hi - 1 - last
        held = after * u.attn_cast + (after - moe_count(model, last + 1, hi)) * u.dense_cast
        held = held + (u.head_cast if is_last else 0)
        if moe:
            # The layer's forward at its return all-to-all (under full recompute, the same moment of
            # its recompute in backward, a backward moment), and the start of its backward.
            peaks.append((pick(full, before + stage_out, before + u.moe_fwd), pick(full, resid_grad + u.moe_fwd, 0),
                          pick(full, held, 0), full))
            peaks.append((before + stage_out + pick(full, 0, u.moe_all),
                          resid_grad + pick(full, u.moe_all, 0) + u.moe_entry, held, True))
        cur, bwd = (u.moe_cur, u.moe_bwd) if moe else (u.dense_cur, u.dense_bwd)
        # Under full recompute the recomputed block's tensors are backward allocations.
        peaks.append((before + stage_out + pick(full, 0, cur), bwd + resid_grad + pick(full, cur, 0), held, True))
    # The worst moment of the micro-batch alone; with what a later micro-batch's backward still
    # holds; and of GPipe's last backward (no forward runs then). Ties keep the first, as max()
    # would.
    peak_fwd = peak_bwd = later_fwd = later_bwd = drain_fwd = drain_bwd = 0
    peak_sum = later_sum = drain_sum = -1
    for fwd, bwd, held, backward in peaks:
        s2 = fwd + bwd
        s3 = s2 + held
        b = s2 > peak_sum
        peak_fwd, peak_bwd, peak_sum = pick(b, fwd, peak_fwd), pick(b, bwd, peak_bwd), pick(b, s2, peak_sum)
        b = s3 > later_sum
        later_fwd, later_bwd = pick(b, fwd, later_fwd), pick(b, bwd + held, later_bwd)
        later_sum = pick(b, s3, later_sum)
        b = backward & (s3 > drain_sum)
        drain_fwd, drain_bwd = pick(b, fwd, drain_fwd), pick(b, bwd + held, drain_bwd)
        drain_sum = pick(b, s3, drain_sum)

    # -- after the backward: the gradient all-reduce -------------------------------------------
    d, e = model.d_model, model.n_experts
    attn_w, dense_w = d * (d // tp), d * (model.dense_ffn // tp)
    expert_w = (e // ep) * d * (model.ffn_hidden // tp)
    vocab_w = model.vocab_size // tp * d
    dense_elems = n_layers * (2 * d + 4 * attn_w) + n_moe * d * e + n_dense * 3 * dense_w
    if is_first:
        dense_elems = dense_elems + vocab_w + model.max_seq_len * d
    if is_last:
        dense_elems = dense_elems + d + vocab_w

    params, grads, optimizer = state_bytes(model, pp, tp, ep, stage, device, split, u.half)
    # Module buffers (MoE statistics: tokens per expert, dropped, aux sum, calls) are resident
    # and not parameters. The optimizer step (fused AdamW) allocates nothing of its own.
    buffers = n_moe * (e * INT64 + 3 * 8)
    return Stage(params=params, grads=grads, optimizer=optimizer, per_mb=per_mb, step_fixed=step_fixed,
                 peak_fwd=peak_fwd, peak_bwd=peak_bwd, later_fwd=later_fwd, later_bwd=later_bwd,
                 drain_fwd=drain_fwd, drain_bwd=drain_bwd, resid=resid, logits=u.logits if is_last else 0,
                 fixed_other=buffers, flat_dense=dense_elems * FP32, flat_expert=n_moe * 3 * expert_w * FP32)


def place(st: Stage, stage: int, pp: int, n: Any, gpipe: Any, sync_dense: Any, sync_expert: Any) -> tuple[Any, Any]:
    """(activations less the step's data, other) at the peak of one stage's step: the worst of
    the backward of a micro-batch, the gradient all-reduce and the last stage's output merge (the
    fused optimizer step adds nothing)."""
    (_, _, _, per_mb, step_fixed, peak_fwd, peak_bwd, later_fwd, later_bwd, drain_fwd, drain_bwd, resid, logits,
     fixed_other, flat_dense, flat_expert) = st
    if pp == 1:
        later = n > 1
        act = step_fixed + pick(later, later_fwd, peak_fwd)
        other = fixed_other + pick(later, later_bwd, peak_bwd)
        end_act = 0
    else:
        is_first, is_last = stage == 0, stage == pp - 1
        # Receive buffers, one per micro-batch and kept across steps (activations into stage > 0,
        # gradients into stage < pp - 1), and on the last stage every micro-batch's logits (the
        # schedule's outputs, kept until the next step).
        end_act = n * (resid * ((not is_first) + (not is_last)) + logits)
        # 1F1B: the worst backward is the first one that no further forward follows, holding
        # `pp - stage` micro-batches (it holds no more before, and from there on each backward
        # frees one); unless it is the first of the step, a stage > 0 also still holds the
        # previous micro-batch's input gradient in its pending send.
        live = smaller(n, pp - stage)
        later = n > live
        act = end_act + step_fixed + (live - 1) * per_mb + pick(later, later_fwd, peak_fwd)
        other = fixed_other + pick(later, later_bwd + (0 if is_first else resid), peak_bwd)
        # GPipe: every micro-batch is alive at the first backward, but the pending sends keep
        # every stage output and every input gradient until the schedule ends, so where
        # recompute leaves little per micro-batch the last backward is worse.
        g_act = end_act + step_fixed + (n - 1) * per_mb + peak_fwd
        g_other = fixed_other + peak_bwd
        a = end_act + step_fixed + drain_fwd + (0 if is_last else (n - 1) * resid)
        o = fixed_other + drain_bwd + (0 if is_first else (n - 1) * resid)
        drain = (n > 1) & (a + o > g_act + g_other)
        act, other = pick(gpipe, pick(drain, a, g_act), act), pick(gpipe, pick(drain, o, g_other), other)
        if is_last:
            # The schedule concatenates every micro-batch's logits into the step's output.
            merge = end_act + n * logits > act + other - fixed_other
            act, other = pick(merge, end_act + n * logits, act), pick(merge, fixed_other, other)
    # Flat gradient all-reduce: one flat copy of the dense gradients (over dp * ep) and one of the
    # expert gradients (over dp); the first is still referenced while the second is built. The
    # tracker files these copies under activations (allocated outside backward and optimizer).
    flat = pick(sync_dense, flat_dense, 0) + pick(sync_expert, flat_expert, 0)
    b = end_act + flat > act + other - fixed_other
    return pick(b, end_act + flat, act), pick(b, fixed_other, other)


def worst_stage(stages: Sequence[Stage], pp: int, n: Any, gpipe: Any, sync_dense: Any,
                sync_expert: Any) -> tuple[Any, Any, Any]:
    """(stage, activations less the step's data, other) of the stage whose peak total is the
    largest (ties: the first such stage)."""
    best, worst, act_w, other_w = -1, 0, 0, 0
    for stage, st in enumerate(stages):
        act, other = place(st, stage, pp, n, gpipe, sync_dense, sync_expert)
        total = st.params + st.grads + st.optimizer + act + other
        b = total > best
        best, worst = pick(b, total, best), pick(b, stage, worst)
        act_w, other_w = pick(b, act, act_w), pick(b, other, other_w)
    return worst, act_w, other_w


def step_data(global_batch_size: int, seq_len: int, micro_batch_size: Any, n: Any) -> Any:
    """The step's tokens: the whole global batch is generated on every rank, then this
    replica's inputs and targets are copied out of it (int64)."""
    return (global_batch_size * (seq_len + 1) + 2 * n * micro_batch_size * seq_len) * INT64
