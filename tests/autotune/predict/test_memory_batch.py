"""The memory model over many candidates at once (screening's path) gives exactly what it gives
one candidate at a time."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from autotune.predict.candidates import judge, layouts_of, screen
from autotune.predict.device_memory import overhead_for
from autotune.predict.memory import clear_caches, predict
from autotune.predict.memory_batch import predict_many
from autotune.space.layout import Layout
from autotune.space.spec import spec_from_data
from trainables.moe.config import PRESETS, layout_problems

TINY = PRESETS["tiny"]
MODELS = {
    "tiny": TINY,
    "moe-every-2": replace(TINY, moe_every=2),
    "dense-first-top1-capacity": replace(TINY, n_layers=6, first_dense_layers=1, moe_every=2, top_k=1,
                                         capacity_factor=1.25),
    "moe-64e": PRESETS["moe-64e"],
}


def _mixed(model, n: int, seed: int, gbs: int) -> list[Layout]:
    """`n` structurally valid layouts drawn from every knob (shuffled: groups interleave)."""
    grid = [Layout(*c) for c in itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2, 3, 4), (1, 2, 3), (1, 2, 3, 4),
                                                  ("fp32", "bf16", "fp16", "bf16-params"),
                                                  ("none", "selective", "full"), ("1f1b", "gpipe"))]
    valid = [lay for lay in grid if not layout_problems(model, lay.dims, lay.shape(gbs, 64))]
    return random.Random(seed).sample(valid, min(n, len(valid)))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("device,profile", [("cpu", None), ("cuda", None), ("cuda", "H200")])
@pytest.mark.parametrize("grad_sync", ["bucketed", "flat"])
def test_predictions_of_many_candidates_equal_predictions_one_by_one(name, device, profile, grad_sync):
    model, gbs = MODELS[name], 48
    layouts = _mixed(model, 300, seed=len(name), gbs=gbs)
    overhead = overhead_for(profile) if profile else None
    clear_caches()
    many = predict_many(model, layouts, gbs, 64, device, overhead, grad_sync=grad_sync)
    alone = [predict(model, lay.dims, replace(lay.shape(gbs, 64), grad_sync=grad_sync), device, overhead)
             for lay in layouts]
    assert many.predictions == alone  # every field, the worst stage and the CUDA extras included
    assert {type(v) for p in many.predictions for v in p} == {int}  # plain ints, as one by one
    assert many.device_bytes.tolist() == [p.device for p in alone]
    assert len({p.stage for p in alone}) > 1 and len({p.total for p in alone}) > 100  # a varied sample
    if device == "cuda":
        assert all(p.reserved_extra > 0 and p.device_extra > 0 for p in alone)


def test_uneven_pipeline_split_too():
    layouts = [Layout(ep, 1, 2, dp, mb, prec, rec, sched) for ep, dp, mb, prec, rec, sched in itertools.product(
        (1, 2), (1, 2), (1, 2), ("fp32", "bf16", "bf16-params"), ("none", "selective", "full"), ("1f1b", "gpipe"))]
    for split in ((1, 3), (3, 1)):
        many = predict_many(TINY, layouts, 8, 64, "cuda", split=split)
        alone = [predict(TINY, lay.dims, replace(lay.shape(8, 64), stage_layers=split), "cuda") for lay in layouts]
        assert many.predictions == alone


def test_screening_a_cuda_space_agrees_with_judging_each_layout_alone():
    spec = spec_from_data({
        "model": {"preset": "moe-64e"},
        "cluster": {"nodes": 4, "ranks_per_node": 8, "device": "cuda", "memory_gb": 40, "profile": "H200"},
        "search": {"ep": [1, 2, 8], "tp": [1, 2], "pp": [1, 2, 4], "world_sizes": [8, 16, 32],
                   "micro_batch_size": [1, 2, 4], "global_batch_size": 64, "seq_len": 2048,
                   "precision": ["fp32", "bf16"], "recompute": ["none", "full"], "schedule": ["1f1b", "gpipe"]},
        "study": {"name": "cuda"},
    })
    clear_caches()
    sc = screen(spec)
    alone = [judge(spec, layout) for layout in layouts_of(spec)]
    assert list(sc.candidates) == alone
    assert {"fits", "over memory cap"} <= set(sc.counts)
    assert any("predicted device memory" in c.reason for c in sc.candidates)
