"""The analytic memory model: exact state bytes, the structure of the activation terms, and a
few layouts measured on real gloo ranks (benchmarks/memory_model.py runs the whole grid)."""

from __future__ import annotations

import gc
import sys
from dataclasses import replace

import pytest

from autotune.predict.memory import (
    _layout,
    _stage_prediction,
    clear_caches,
    predict,
    stage_params,
    state_memory,
)
from trainables.moe.config import PRESETS, ParallelDims, RunShape

TINY = PRESETS["tiny"]
D, F, E, L = TINY.d_model, TINY.ffn_hidden, TINY.n_experts, TINY.n_layers


def _shape(mb: int = 2, gbs: int = 8, seq: int = 64, precision: str = "fp32", recompute: str = "none",
           schedule: str = "1f1b") -> RunShape:
    return RunShape(mb, gbs, seq, precision, recompute, schedule)


# -- closed form of the state ------------------------------------------------------------------


def test_expert_parallel_halves_expert_parameters_only():
    one = stage_params(TINY, ParallelDims(), 0).elements
    two = stage_params(TINY, ParallelDims(ep=2), 0).elements
    assert one - two == L * 3 * (E // 2) * D * F  # half of every layer's w1, w3, w2


def test_tensor_parallel_splits_attention_experts_and_vocabulary():
    one = stage_params(TINY, ParallelDims(), 0).elements
    two = stage_params(TINY, ParallelDims(tp=2), 0).elements
    split = L * (4 * D * D + 3 * E * D * F) + 2 * TINY.vocab_size * D  # q/k/v/o, experts, embedding, head
    assert one - two == split // 2


def test_only_the_first_stage_holds_the_embedding_and_only_the_last_the_head():
    dims = ParallelDims(pp=4)
    sizes = [stage_params(TINY, dims, s).elements for s in range(4)]
    layer = sizes[1]
    assert sizes[2] == layer  # middle stages: one layer each, nothing else
    assert sizes[0] - layer == TINY.vocab_size * D + TINY.max_seq_len * D  # token and position embedding
    assert sizes[3] - layer == D + TINY.vocab_size * D  # final norm and head
    assert sum(sizes) == stage_params(TINY, ParallelDims(), 0).elements


def test_uneven_stage_split_moves_layers():
    dims = ParallelDims(pp=2)
    even = [stage_params(TINY, dims, s).elements for s in range(2)]
    uneven = [stage_params(TINY, dims, s, (3, 1)).elements for s in range(2)]
    assert sum(even) == sum(uneven) and uneven[0] > even[0]


def test_state_is_fp32_weights_grads_and_two_moments_plus_step_counters_on_every_device():
    """Fused AdamW keeps its step counters with the parameters, on a GPU too."""
    dims = ParallelDims(ep=2, tp=2)
    sp = stage_params(TINY, dims, 0)
    cpu, gpu = state_memory(TINY, dims, 0, "cpu"), state_memory(TINY, dims, 0, "cuda")
    assert cpu.params == cpu.grads == 4 * sp.elements
    assert cpu.optimizer == gpu.optimizer == 8 * sp.elements + 4 * sp.tensors


# -- structure of the activation model -----------------------------------------------------------


def test_recompute_keeps_less_and_full_keeps_only_block_inputs():
    acts = {mode: predict(TINY, ParallelDims(), _shape(mb=4, recompute=mode)).activations
            for mode in ("none", "selective", "full")}
    assert acts["full"] < acts["selective"] < acts["none"]
    # Full recompute: what is left is at most the block inputs, embedding bookkeeping and data.
    assert acts["full"] < (L + 2) * 4 * 64 * D * 4


def test_kept_bytes_per_micro_batch_are_affine_in_tokens_and_shrink_with_tp():
    def per_mb(mb=1, seq=64, tp=1, ep=1, precision="fp32"):
        return _layout(TINY, tp, ep, 1, None, mb, seq, precision, "none", "cpu").stages[0].per_mb

    # Affine in tokens (a few per-micro-batch constants, e.g. the router's load fractions); in
    # particular CPU flash attention keeps no seq x seq matrix.
    assert per_mb(mb=4) - per_mb(mb=2) == 2 * (per_mb(mb=2) - per_mb(mb=1))
    assert per_mb(seq=128) - per_mb(seq=64) == 2 * (per_mb(seq=64) - per_mb(seq=32))
    assert per_mb(tp=2) < per_mb()
    # EP moves rows between ranks but, balanced, each rank processes as many as it routes; the
    # permutations of the all-to-all are extra.
    assert per_mb(ep=2) > per_mb()
    # bf16 halves matmul outputs but keeps per-call copies of every expert's weights.
    assert per_mb(precision="bf16") != per_mb()


def test_pipeline_stage_zero_holds_more_under_gpipe_than_1f1b():
    dims = ParallelDims(pp=2)
    shape = _shape(mb=2, gbs=12)  # six micro-batches
    f1b = _stage_prediction(TINY, dims, shape, 0)
    gpipe = _stage_prediction(TINY, dims, replace(shape, schedule="gpipe"), 0)
    assert gpipe.activations > f1b.activations
    # 1F1B keeps pp - stage micro-batches on stage 0, GPipe all six: four more of the same size.
    per_mb = _layout(TINY, 1, 1, 2, None, 2, 64, "fp32", "none", "cpu").stages[0].per_mb
    assert gpipe.activations - f1b.activations == 4 * per_mb


def test_predict_is_the_worst_stage():
    dims, shape = ParallelDims(pp=4), _shape(mb=1, gbs=8, precision="bf16")
    stages = [_stage_prediction(TINY, dims, shape, s) for s in range(4)]
    worst = predict(TINY, dims, shape)
    assert worst.total == max(p.total for p in stages)
    assert worst == stages[worst.stage]


def test_large_vocabulary_moves_the_peak_to_the_loss_backward():
    big = replace(TINY, vocab_size=32768)
    small_pred = predict(TINY, ParallelDims(), _shape(mb=4))
    big_pred = predict(big, ParallelDims(), _shape(mb=4))
    tokens = 4 * 64
    # Log-softmax output kept, plus two vocab-sized fp32 gradients at the start of backward.
    assert big_pred.activations - small_pred.activations >= tokens * (32768 - 256) * 4
    assert big_pred.other >= 2 * tokens * 32768 * 4


def _profiled_calls(model, layouts) -> int:
    """Python and C function calls made while predicting every layout: a count, not a time, so a
    shared machine cannot make it flaky (the screening benchmark times the same path)."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    gc.collect()
    gc.disable()  # a collection mid-count runs finalizers and callbacks that are not the model's work
    sys.setprofile(count)
    try:
        for gbs in (512, 1024, 2048, 4096):  # a new global batch: every stage is placed again
            for dims, mb, prec, rec, sched in layouts:
                predict(model, dims, RunShape(mb, gbs, 4096, prec, rec, sched), "cuda")
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls


def test_prediction_is_arithmetic_whose_cost_does_not_grow_with_the_layers():
    model = PRESETS["moe-64e"]
    deep = replace(model, n_layers=model.n_layers * 64)
    layouts = [(ParallelDims(pp=pp, dp=dp, ep=ep, tp=tp), mb, prec, rec, sched)
               for pp in (1, 2, 4, 8) for dp in (1, 2) for ep in (1, 8, 16) for tp in (1, 2) for mb in (1, 2)
               for prec in ("fp32", "bf16") for rec in ("none", "full") for sched in ("1f1b", "gpipe")]
    counts = []
    for m in (model, deep):
        clear_caches()
        _profiled_calls(m, layouts[:1])  # one-time work (device tables, the model's MoE layer count)
        clear_caches()
        counts.append(_profiled_calls(m, layouts))
    # A loop over layers would make the 1,536-layer model cost 64 times as many calls; the 1% slack
    # absorbs the interpreter's own incidental calls (CI once counted 31 more of 341,148).
    assert counts[1] <= 1.01 * counts[0], counts
    per_prediction = counts[0] / (4 * len(layouts))
    assert per_prediction < 400, f"{per_prediction:.0f} calls per prediction"


# -- against measurements ------------------------------------------------------------------------

MEASURED = [
    # (ep, tp, pp, dp, micro-batch, global batch, precision, recompute, schedule, model overrides,
    #  gradient reduction)
    (2, 1, 1, 1, 2, 8, "bf16", "full", "1f1b", {}, "bucketed"),
    (1, 2, 1, 1, 2, 4, "fp16", "selective", "1f1b", {"moe_every": 2}, "bucketed"),
    (1, 1, 2, 1, 1, 3, "bf16", "none", "gpipe", {"top_k": 1}, "bucketed"),
    (1, 1, 1, 2, 1, 4, "fp32", "full", "1f1b", {}, "flat"),  # peak in the flat gradient all-reduce
    (1, 1, 1, 2, 1, 4, "fp32", "full", "1f1b", {}, "bucketed"),  # ... which the buckets do not copy
    # bf16 parameters: bf16 weights and residual stream, fp32 main gradients and master weights
    (2, 2, 1, 1, 2, 8, "bf16-params", "none", "1f1b", {}, "bucketed"),
    (1, 1, 2, 1, 1, 3, "bf16-params", "selective", "gpipe", {"top_k": 1, "moe_every": 2}, "flat"),
]


@pytest.mark.slow
@pytest.mark.parametrize("ep,tp,pp,dp,mb,gbs,precision,recompute,schedule,overrides,grad_sync", MEASURED,
                         ids=[f"EP{c[0]}TP{c[1]}PP{c[2]}DP{c[3]}-{c[6]}-{c[7]}-{c[8]}-{c[10]}" for c in MEASURED])
def test_prediction_matches_a_measured_run(ep, tp, pp, dp, mb, gbs, precision, recompute, schedule, overrides,
                                           grad_sync):
    from tests.launch import launch
    from trainables.moe.train import RunConfig

    cfg = RunConfig(model="tiny", model_overrides=overrides, ep=ep, tp=tp, pp=pp, dp=dp, micro_batch_size=mb,
                    global_batch_size=gbs, seq_len=32, precision=precision, recompute=recompute,
                    schedule=schedule, steps=1, warmup_steps=1, device="cpu", grad_sync=grad_sync)
    summary = launch(cfg)[0].summary
    pred = predict(cfg.model_config(), cfg.dims, cfg.shape, "cpu")
    peak = summary["peak_mem_bytes"]
    assert (pred.params, pred.grads, pred.optimizer) == (
        summary["mem_params_bytes"], summary["mem_grads_bytes"], summary["mem_optimizer_bytes"])
    assert abs(pred.total / peak - 1) <= 0.10, (pred, summary)
    for cat in ("activations", "other"):
        measured = summary[f"mem_{cat}_bytes"]
        # Within 15% of the category, or 3% of the peak where the category is small.
        assert abs(getattr(pred, cat) - measured) <= max(0.15 * measured, 0.03 * peak), (cat, pred, summary)
