"""The step-time model as a prior: expected improvement under the model and its measured error."""

from __future__ import annotations

import numpy as np

from autotune.search.prior import (MIN_LOG_SD, PRIOR_LOG_SD, Belief, belief, choose, error_scale, features)
from autotune.space.layout import Layout


def _lay(ep=1, tp=1, pp=1, dp=1, mb=1, precision="bf16", recompute="none", schedule="1f1b"):
    return Layout(ep, tp, pp, dp, mb, precision, recompute, schedule)


FAMILY_A = [_lay(ep=8, mb=m) for m in (1, 2, 4, 8)]
FAMILY_B = [_lay(tp=8, pp=2, mb=m) for m in (1, 2, 4, 8)]


def test_features_put_one_knob_apart_closer_than_a_different_family():
    f = features([FAMILY_A[2], FAMILY_A[3], FAMILY_B[3]])
    near, far = np.linalg.norm(f[0] - f[1]), np.linalg.norm(f[1] - f[2])
    assert near == 1.0 and far > 3 * near


def test_the_error_scale_starts_at_the_prior_and_follows_the_studys_residuals():
    assert error_scale([]) == PRIOR_LOG_SD
    assert error_scale([0.01] * 40) < error_scale([0.01] * 10) < error_scale([0.01] * 2) < PRIOR_LOG_SD
    assert error_scale([0.01] * 40) < 0.15  # a model right to 1% on 40 trials is trusted
    assert error_scale([0.0] * 10_000) == MIN_LOG_SD
    assert error_scale([1.0] * 10) > PRIOR_LOG_SD  # a model wrong by e^1 is trusted less than before


def test_without_measurements_the_pick_is_the_predicted_best():
    cands = FAMILY_A + FAMILY_B
    pred = np.log([100, 200, 300, 400, 150, 250, 350, 390])
    assert choose(pred, cands, [], [], PRIOR_LOG_SD, set()) == 3


def test_a_measurement_far_below_its_prediction_pulls_its_neighbours_down_not_the_far_family():
    cands = FAMILY_A + FAMILY_B
    pred = np.log([100, 200, 300, 400, 150, 250, 350, 390])
    measured = [(FAMILY_A[3], pred[3], np.log(40.0))]  # a tenth of the prediction
    b = belief(pred, features(cands), features([FAMILY_A[3]]), np.array([np.log(0.1)]), PRIOR_LOG_SD)
    assert b.mean[2] < pred[2] - 1.0  # the nearest twin falls with it
    assert abs(b.mean[7] - pred[7]) < 0.05  # the other family keeps its prediction
    assert b.sd[3] < 0.05 and b.sd[7] > 0.45
    assert choose(pred, cands, measured, [], PRIOR_LOG_SD, {FAMILY_A[3].key}) == 7


def test_expected_improvement_prefers_spread_over_a_sure_small_loss():
    b = Belief(mean=np.array([1.0, 0.95]), sd=np.array([0.0, 0.3]))
    ei = b.expected_improvement(best=1.0)
    assert ei[1] > 0.05 > 1e-9 > ei[0]


def test_a_running_trial_counts_as_measured_at_its_belief_so_concurrent_picks_spread():
    cands = FAMILY_A + FAMILY_B
    pred = np.log([100, 200, 300, 398, 150, 250, 350, 400])
    measured = [(FAMILY_B[0], pred[4], pred[4])]
    alone = choose(pred, cands, measured, [], PRIOR_LOG_SD, {FAMILY_B[0].key})
    assert alone == 7
    beside = choose(pred, cands, measured, [(cands[7], pred[7])], PRIOR_LOG_SD, {FAMILY_B[0].key, cands[7].key})
    assert cands[beside] in FAMILY_A  # not the running trial's micro-batch twin


def test_equal_candidates_are_broken_by_the_seed_and_nothing_left_is_none():
    cands = [_lay(ep=2, mb=2), _lay(tp=2, mb=2), _lay(pp=2, mb=2), _lay(dp=2, mb=2)]
    pred = np.log([100.0] * 4)
    picks = {choose(pred, cands, [], [], PRIOR_LOG_SD, set(), np.random.default_rng(s)) for s in range(20)}
    assert len(picks) > 1
    assert choose(pred, cands, [], [], PRIOR_LOG_SD, {c.key for c in cands}) is None


def test_a_failed_launch_pulls_its_family_down_and_a_layout_likely_over_the_cap_waits():
    from autotune.search.prior import feasible

    cands = FAMILY_A + FAMILY_B
    pred = np.log([100, 200, 300, 400, 150, 250, 350, 390])
    # the family's best ran out of memory: its twins are not tried next
    pick = choose(pred, cands, [], [], PRIOR_LOG_SD, {FAMILY_A[3].key}, failed=[(FAMILY_A[3], pred[3])])
    assert cands[pick] in FAMILY_B
    # the memory model puts family B's fastest 10% over the cap: a measured layout's neighbour
    # within the cap goes first
    fits = feasible(np.array([90.0] * 7 + [110.0]), cap=100)
    assert fits[7] < 0.05 < 0.95 < fits[6]
    measured = [(FAMILY_A[0], pred[0], pred[0])]
    pick = choose(pred, cands, measured, [], PRIOR_LOG_SD, {FAMILY_A[0].key}, fits=fits, best=pred[0])
    assert pick != 7
    assert choose(pred, cands, [], [], PRIOR_LOG_SD, set(), fits=fits) == 3  # before any measurement too


def test_layouts_the_model_cannot_tell_apart_go_by_memory_headroom_before_the_seed():
    # 1F1B and GPipe of one layout are predicted equally fast; GPipe holds every micro-batch's
    # activations. Whatever the seed, the one with the smaller predicted peak is measured first,
    # before and after a measurement elsewhere.
    cands = [_lay(pp=2, mb=4, schedule="gpipe"), _lay(pp=2, mb=4), _lay(ep=8, mb=1)]
    pred = np.log([500.0, 500.0, 300.0])
    peaks = np.array([37e9, 33e9, 20e9])
    for seed in range(8):
        rng = np.random.default_rng(seed)
        assert choose(pred, cands, [], [], PRIOR_LOG_SD, set(), rng, peaks=peaks) == 1
        measured = [(cands[2], float(pred[2]), float(np.log(310.0)))]
        assert choose(pred, cands, measured, [], PRIOR_LOG_SD, {cands[2].key}, rng, best=float(np.log(310.0)),
                      peaks=peaks) == 1
    # Without the peaks the seed decides, and some seed picks GPipe first.
    picks = {choose(pred, cands, [], [], PRIOR_LOG_SD, set(), np.random.default_rng(s)) for s in range(16)}
    assert picks == {0, 1}
