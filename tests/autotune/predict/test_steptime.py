"""The step-time model's terms, its calibration, and the opening it gives the searcher."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from autotune.space import devices
from autotune.predict.calibrate import Calibration, calibrate, fit_weights, leave_one_out
from autotune.predict.candidates import screen
from autotune.predict.speedmodel import SpeedModel
from autotune.predict.steptime import (PER_MICRO_BATCH, TERMS, Topology, _params_per_rank, layer_slots, predict,
                                       prior_weights, raw_terms)
from autotune.search.searcher import MAX_OPENING_BUBBLE, opening, warm_start_size
from autotune.space.layout import Layout
from autotune.space.spec import load_spec
from trainables.moe.config import PRESETS

MODEL = PRESETS["moe-64e"]
H100 = devices.get("H100-SXM")
NODE = Topology(8)


def _one(layout: Layout, topology: Topology = NODE, profile=H100) -> dict[str, float]:
    return predict(MODEL, [layout], 64, 1024, profile, topology).row(0)


def L(ep=1, tp=1, pp=1, dp=1, mb=1, precision="bf16", recompute="none", schedule="1f1b") -> Layout:
    return Layout(ep, tp, pp, dp, mb, precision, recompute, schedule)


def test_a_term_appears_only_with_its_parallelism():
    plain = _one(L(dp=16))
    assert plain["tp_comm"] == plain["ep_a2a"] == plain["pp_send"] == plain["bubble"] == 0
    assert _one(L(tp=2, dp=8))["tp_comm"] > 0 and _one(L(ep=2, dp=8))["ep_a2a"] > 0
    piped = _one(L(pp=2, dp=8))
    assert piped["pp_send"] > 0 and piped["bubble"] > 0


def test_bubble_is_the_pipeline_share_of_the_micro_batch_terms():
    # pp 4, global batch 64 / (mb 8 x dp 4) = 2 micro-batches: 3 idle slots of 5.
    t = predict(MODEL, [L(pp=4, dp=4, mb=8)], 64, 1024, H100, NODE)
    per_mb = t.terms[0, list(PER_MICRO_BATCH)].sum()
    assert t.bubble_s[0] == pytest.approx(per_mb * 3 / 5)
    # More micro-batches (smaller ones) shrink it.
    assert _one(L(pp=4, dp=4, mb=1))["bubble"] / _one(L(pp=4, dp=4, mb=1))["pred_step_time_s"] < t.bubble_frac[0]


def test_layer_slots_count_micro_batches_bubble_and_layers_per_stage():
    # 64 / (mb 8 x dp 4) = 2 micro-batches + 3 bubble slots, of n_layers / 4 layers; a micro-batch
    # larger than the batch still runs once.
    got = layer_slots(MODEL.n_layers, [L(pp=4, dp=4, mb=8), L(ep=2, dp=2, mb=2), L(dp=16, mb=8)], 64)
    assert got.tolist() == pytest.approx([5 * MODEL.n_layers / 4, 8 * MODEL.n_layers, MODEL.n_layers])


def test_leaving_the_node_costs_network_bandwidth():
    # EP16 over 2 nodes of 8 sends part of every all-to-all through the network; EP8 does not.
    cross, inside = _one(L(ep=16)), _one(L(ep=8, dp=2))
    per_token_cross = cross["ep_a2a"] / (15 / 16)
    per_token_inside = inside["ep_a2a"] / (7 / 8)
    assert per_token_cross > 3 * per_token_inside
    # The same layout on one big node (no network) is faster in communication.
    assert _one(L(ep=16), Topology(16))["ep_a2a"] < cross["ep_a2a"]
    # Expert gradients all-reduced across nodes (dp 2 of ep 8) cost more than none (ep 16, dp 1).
    assert _one(L(ep=8, dp=2))["dp_grad"] > _one(L(ep=16))["dp_grad"]


def test_recompute_and_precision_cost_what_they_should():
    none, full = _one(L(ep=8, dp=2)), _one(L(ep=8, dp=2, recompute="full"))
    assert full["dense_compute"] == pytest.approx(none["dense_compute"] * 4 / 3, rel=0.1)
    assert full["expert_compute"] == pytest.approx(none["expert_compute"] * 4 / 3)
    fp32 = _one(L(ep=8, dp=2, precision="fp32"))
    assert fp32["expert_compute"] == pytest.approx(none["expert_compute"] * 989 / 67)
    assert _one(L(ep=8, dp=2, precision="fp16"))["optimizer"] > none["optimizer"]  # loss scaling
    # bf16 parameters: bf16 matmuls and activations like autocast's; the optimizer also writes the
    # bf16 copy back from the fp32 master (6 of autocast's 28 bytes per parameter more).
    params = _one(L(ep=8, dp=2, precision="bf16-params"))
    for term in ("dense_compute", "expert_compute", "ep_a2a", "memory_bound", "dp_grad"):
        assert params[term] == pytest.approx(none[term]), term
    assert params["optimizer"] == pytest.approx(none["optimizer"] * 34 / 28)


def test_all_to_all_and_sends_go_at_their_own_measured_bandwidth_inside_a_node():
    layout = L(ep=2, pp=2, dp=2)  # 8 ranks: one node
    plain = _one(layout)
    measured = _one(layout, profile=replace(H100, a2a_gb_s=H100.intra_node_gb_s / 2, p2p_gb_s=H100.intra_node_gb_s * 2))
    assert measured["ep_a2a"] == pytest.approx(2 * plain["ep_a2a"])
    assert measured["pp_send"] == pytest.approx(plain["pp_send"] / 2)
    for term in ("tp_comm", "dp_grad", "dense_compute", "latency"):
        assert measured[term] == pytest.approx(plain[term]), term


def test_newer_devices_are_predicted_faster():
    lay = L(ep=8, pp=2)
    times = [_one(lay, profile=devices.get(n))["pred_step_time_s"] for n in ("A100-80GB", "H100-SXM", "B200")]
    assert times == sorted(times, reverse=True)


def test_a_hundred_thousand_candidates_at_once():
    layouts = [L(ep, tp, pp, dp, mb, prec, rc, sch) for ep in (1, 2, 4, 8, 16) for tp in (1, 2, 4, 8)
               for pp in (1, 2, 4, 8) for dp in (1, 2, 4, 8, 16) for mb in (1, 2, 4, 8, 16, 32, 64)
               for prec in ("fp32", "bf16", "fp16") for rc in ("none", "selective", "full")
               for sch in ("1f1b", "gpipe")] * 2
    assert len(layouts) > 100_000
    # Its speed is measured by benchmarks/screening.py; here: the vectorised rows equal one-by-one ones.
    t = predict(MODEL, layouts, 64, 1024, H100, NODE)
    assert np.isfinite(t.step_time_s).all() and (t.step_time_s > 0).all()
    for i in (0, 777, 54321, len(layouts) - 1):
        assert predict(MODEL, [layouts[i]], 64, 1024, H100, NODE).row(0) == pytest.approx(t.row(i))


def test_calibration_recovers_known_efficiencies_and_says_how_well():
    rng = np.random.default_rng(0)
    layouts = [L(ep, tp, pp, dp, mb) for ep in (1, 2, 4, 8) for tp in (1, 2) for pp in (1, 2) for mb in (1, 2, 4)
               for dp in (16 // (ep * tp * pp),) if dp]
    raw, _ = raw_terms(MODEL, layouts, 64, 1024, H100, NODE)
    truth = prior_weights() * rng.uniform(0.5, 2.0, len(TERMS))
    measured = raw @ truth
    cal = calibrate(raw, measured)
    assert cal.points == len(layouts)
    # The weak pull to a common scale costs a little bias, never more than a few percent.
    assert (np.abs(raw @ np.array(cal.weights) - measured) / measured).max() < 0.03
    assert cal.loo_median_rel_err < 0.02
    # Noise shows in the leave-one-out error, not as a perfect fit.
    noisy = measured * rng.uniform(0.8, 1.2, len(measured))
    assert calibrate(raw, noisy).loo_median_rel_err > 0.03
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_one_measurement_sets_the_common_scale_only():
    layouts = [L(ep=8, pp=2), L(ep=4, tp=2, pp=2)]
    raw, _ = raw_terms(MODEL, layouts, 64, 1024, H100, NODE)
    w = fit_weights(raw[:1], np.array([2 * (raw[0] @ prior_weights())]))
    assert w == pytest.approx(2 * prior_weights(), rel=1e-3)
    assert leave_one_out(raw, raw @ prior_weights()) == pytest.approx(raw @ prior_weights(), rel=1e-3)


def test_seed_space_opening_is_fast_spread_and_never_idles_needlessly():
    spec = load_spec("search_spaces/seed-16x80gb.yaml")
    sc = screen(spec)
    speed = SpeedModel.of(spec)
    first = opening(spec, sc, speed, 10)
    assert len(first) == 10
    assert len({(x.ep, x.tp, x.pp) for x in first}) == 10
    assert any(x.ep > 1 for x in first)
    fitting = [c.layout for c in sc.candidates if c.fits]
    every = speed.predict(fitting)
    mine = speed.predict(first)
    for i, lay in enumerate(first):
        if mine.bubble_frac[i] > MAX_OPENING_BUBBLE:
            faster = every.step_time_s < mine.step_time_s[i]
            assert not (faster & (every.bubble_frac < mine.bubble_frac[i])).any(), lay.key
    # The opening's first layout is the model's fastest fitting layout.
    assert mine.step_time_s[0] == pytest.approx(every.step_time_s.min())
    assert warm_start_size(spec) >= 10


def test_the_busiest_ranks_load_grows_with_ep_from_none_to_the_experts_own():
    from autotune.predict.steptime import rank_imbalance

    ep = np.array([1, 2, 4, 8, 16, 32, 64])
    r = rank_imbalance(1.5, ep, 64)
    assert r[0] == 1.0 and r[-1] == pytest.approx(1.5) and np.all(np.diff(r) > 0)
    assert np.all(rank_imbalance(1.0, ep, 64) == 1.0)  # balanced experts: balanced ranks
    # the expert compute term follows it: measured imbalance costs nothing at EP 1
    plain = predict(MODEL, [L(dp=16), L(ep=16)], 64, 1024, H100, NODE)
    skewed = predict(MODEL, [L(dp=16), L(ep=16)], 64, 1024, H100, NODE, imbalance=1.5)
    assert skewed.terms[0, 1] == plain.terms[0, 1] and skewed.terms[1, 1] > plain.terms[1, 1]


def test_latency_grows_with_the_group_and_sequence_parallel_dispatch_sends_a_tp_th():
    i = TERMS.index("latency")
    small, wide = _one(L(tp=2, dp=8)), _one(L(tp=8, dp=2))
    assert wide["latency"] > small["latency"] * 3  # 2 (tp - 1) ring steps per call: 14 against 2
    assert predict(MODEL, [L(ep=16)], 64, 1024, H100, NODE).terms[0, i] > \
        predict(MODEL, [L(ep=2, dp=8)], 64, 1024, H100, NODE).terms[0, i]
    lay = [L(ep=4, tp=2, dp=2)]
    full = predict(MODEL, lay, 64, 1024, H100, NODE).row(0)["ep_a2a"]
    split = predict(MODEL, lay, 64, 1024, H100, NODE, sequence_parallel=True).row(0)["ep_a2a"]
    assert split == pytest.approx(full / 2)


def test_memory_bound_work_is_bytes_over_bandwidth_and_smaller_in_bf16():
    bf16, fp32 = _one(L(dp=16)), _one(L(dp=16, precision="fp32"))
    # Activations' bytes halve in bf16; the gradients' accumulation stays fp32.
    assert 0 < bf16["memory_bound"] < fp32["memory_bound"] < 2 * bf16["memory_bound"]
    slower = replace(H100, hbm_gb_s=H100.hbm_gb_s / 2)
    assert _one(L(dp=16), profile=slower)["memory_bound"] == pytest.approx(2 * bf16["memory_bound"])


def test_every_micro_batch_streams_the_stages_weights():
    # The same global batch in micro-batches of 1 or 4: the activations' bytes are the same in all,
    # the weights go through the GEMMs (and the gradients are accumulated) 4 times as often.
    one, four = predict(MODEL, [L(dp=16, mb=1), L(dp=16, mb=4)], 64, 1024, H100, NODE).terms[:, TERMS.index("memory_bound")]
    micro_one, micro_four = 64 / 16, 64 / 64
    weights = (one - four) / (micro_one - micro_four)  # seconds per micro-batch's weight traffic
    assert weights > 0
    dense, expert = _params_per_rank(MODEL, np.array([1.0]), np.array([1.0]), np.array([1.0]))
    expected = float((dense + expert)[0]) * (2 * 3 + 2 * 4) / (H100.hbm_gb_s * 1e9) * prior_weights()[TERMS.index("memory_bound")]
    assert weights == pytest.approx(expected, rel=1e-6)
