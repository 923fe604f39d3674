"""The searcher: the memory model's frontier, every pick of `study.sampler: auto` re-ranked by the
calibrated model and its error after each measured trial, and the fixed openings of the ablations."""

from __future__ import annotations

import pytest

from autotune.predict.candidates import screen
from autotune.predict.speedmodel import SpeedModel
from autotune.schema import Status
from autotune.search.searcher import LayoutSearcher, _dominates, create_study, frontier, opening, warm_start_size
from autotune.space.layout import Layout
from autotune.space.spec import spec_from_data
from autotune.trial_record import TrialRecord

SPACE = {
    "model": {"preset": "tiny"},
    "cluster": {"ranks": 4, "device": "cpu", "memory_gb": 0.0235, "cpus_per_rank": 0.5},
    "search": {"ep": [1, 2, 4], "tp": [1, 2], "pp": [1, 2], "world_sizes": [1, 2, 4], "micro_batch_size": [2, 8],
               "global_batch_size": 16, "seq_len": 64, "precision": ["fp32", "bf16"],
               "recompute": ["none", "full"]},
    "budget": {"trials": 12},
    "study": {"name": "s", "seed": 3},
}


def _spec(**study):
    data = {**SPACE, "study": {**SPACE["study"], **study}}
    return spec_from_data(data)


def test_the_frontier_covers_every_fitting_layout_and_dominates_the_rest():
    spec = _spec()
    screening = screen(spec)
    fitting = [c.layout for c in screening.candidates if c.fits]
    front = frontier(spec, screening)
    assert front and set(front) <= set(fitting) and len(front) < len(fitting)
    assert not any(_dominates(a, b) for a in front for b in front)
    for layout in set(fitting) - set(front):
        assert any(_dominates(a, layout) for a in front), layout.key
    # Some layouts are over the cap: the frontier is not simply "everything at micro-batch 8".
    assert any(not c.fits for c in screening.candidates if c.layout.micro_batch_size == 8)
    assert any(layout.micro_batch_size == 2 and layout.recompute == "none" for layout in front)


def test_dominance_claims_nothing_across_layouts_or_for_pipelined_micro_batches():
    a = Layout(1, 1, 1, 2, 8, "fp32", "none", "1f1b")
    assert _dominates(a, Layout(1, 1, 1, 2, 2, "fp32", "full", "1f1b"))
    assert not _dominates(a, Layout(1, 1, 1, 2, 8, "bf16", "full", "1f1b"))  # another precision
    assert not _dominates(a, Layout(2, 1, 1, 1, 2, "fp32", "full", "1f1b"))  # another layout
    assert not _dominates(Layout(1, 1, 2, 1, 8, "fp32", "none", "1f1b"), Layout(1, 1, 2, 1, 2, "fp32", "none", "1f1b"))
    assert _dominates(Layout(1, 1, 2, 1, 2, "fp32", "none", "1f1b"), Layout(1, 1, 2, 1, 2, "fp32", "full", "1f1b"))


@pytest.mark.parametrize("device, first", [("cpu", "fp32"), ("cuda", "bf16")])
def test_the_frontier_starts_with_the_devices_fast_precision(device, first):
    # On a GPU the memory model adds the device's own overhead (CUDA context, NCCL): a rank of a
    # few MB would fit nothing, so the GPU case gets a GPU's memory.
    memory = SPACE["cluster"]["memory_gb"] if device == "cpu" else 80
    data = {**SPACE, "cluster": {**SPACE["cluster"], "device": device, "memory_gb": memory}}
    spec = spec_from_data(data)
    assert frontier(spec, screen(spec))[0].precision == first


def _searcher(spec, study, speed=lambda layout: 1000.0, guide=None):
    """A searcher whose trials measure `speed(layout)` tokens/s."""
    records = {}

    def make_config(number, layout, cand):
        return {"number": number, "layout_key": layout.key}

    def on_complete(trial_id, result, error):
        layout = next(c.layout for c in screening.candidates if c.layout.key == result["autotune_config"]["layout_key"])
        tps = speed(layout)
        records[trial_id] = TrialRecord(number=result["autotune_config"]["number"], layout=layout, status=Status.OK,
                                        metrics={"tokens_per_s": tps, "step_time_s": 16 * 64 / tps})
        return records[trial_id]

    screening = screen(spec)
    return LayoutSearcher(spec, screening, study, make_config, lambda r: r, on_complete, 30, guide=guide), screening


def _run(searcher, n):
    keys = []
    for i in range(n):
        cfg = searcher.suggest(f"t{i}")
        keys.append(cfg["layout_key"])
        searcher.on_trial_complete(f"t{i}", {"tokens_per_s": 1.0}, False)
    return keys


def test_a_new_study_starts_on_the_predicted_best_and_every_pick_is_an_optuna_trial():
    spec = _spec()
    study = create_study(spec, None, load_if_exists=False)
    searcher, screening = _searcher(spec, study)
    keys = _run(searcher, 6)
    fitting = [c.layout for c in screening.candidates if c.fits]
    times = SpeedModel.of(spec).predict(fitting)
    assert keys[0] == fitting[int(times.order([c.prediction.total for c in screening.candidates if c.fits])[0])].key
    assert len(set(keys)) == len(keys)
    assert len(study.trials) == 6  # every pick is enqueued: the study holds it like its own proposals


def test_a_layout_far_slower_than_predicted_moves_the_search_to_another_family():
    """The model as a prior, not an oracle: when the predicted best runs at a tenth of its
    prediction, its near twins are no longer believed, and the next pick leaves its family."""
    spec = _spec()
    fitting = [c.layout for c in screen(spec).candidates if c.fits]
    model = SpeedModel.of(spec)
    first = _searcher(spec, create_study(spec, None, load_if_exists=False))[0].suggest("t0")["layout_key"]
    bad = next(lay for lay in fitting if lay.key == first)
    family = (bad.ep, bad.tp, bad.pp)

    def speed(layout):
        tps = float(model.predict([layout]).tokens_per_s[0]) * 0.6
        return tps * (0.1 if (layout.ep, layout.tp, layout.pp) == family else 1.0)

    searcher, _ = _searcher(spec, create_study(spec, None, load_if_exists=False), speed)
    keys = _run(searcher, 3)
    picked = [next(lay for lay in fitting if lay.key == k) for k in keys]
    assert keys[0] == first
    assert all((lay.ep, lay.tp, lay.pp) != family for lay in picked[1:]), keys


def test_the_opening_ablation_opens_on_one_fast_layout_per_family_then_the_sampler_proposes():
    spec = _spec()
    study = create_study(spec, None, load_if_exists=False)
    searcher, screening = _searcher(spec, study, guide="opening")
    k = warm_start_size(spec)
    keys = _run(searcher, k + 3)
    expected = opening(spec, screening, SpeedModel.of(spec), k)
    assert keys[:k] == [layout.key for layout in expected]
    assert set(expected) <= set(frontier(spec, screening))
    assert len({(lay.ep, lay.tp, lay.pp) for lay in expected}) == k  # one per family
    assert len(set(keys)) == len(keys)


def test_continued_studies_do_not_reopen_and_an_unknown_guide_is_refused():
    assert warm_start_size(_spec(sampler="random")) == 0
    spec = _spec()
    study = create_study(spec, None, load_if_exists=False)
    first, screening = _searcher(spec, study, guide="opening")
    _run(first, 2)
    # the searcher stored a record with each measured trial: a second driver continues the study
    again, _ = _searcher(spec, study, guide="opening")
    assert again.opening == []
    with pytest.raises(ValueError, match="guide 'oracle'"):
        _searcher(spec, study, guide="oracle")
