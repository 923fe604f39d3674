"""Layout rules: each broken rule is named with its numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from trainables.moe.config import PRESETS, ParallelDims, RunShape, flops_per_token, layout_problems

TINY = PRESETS["tiny"]
SHAPE = RunShape(micro_batch_size=2, global_batch_size=8, seq_len=64)


@pytest.mark.parametrize("dims,shape,model,ranks,message", [
    (ParallelDims(ep=3), SHAPE, replace(TINY, n_experts=8), None, "experts (8) must be divisible by ep (3)"),
    (ParallelDims(tp=3), SHAPE, replace(TINY, n_heads=4, d_model=64), None, "heads (4) must be divisible by tp (3)"),
    (ParallelDims(tp=2), SHAPE, replace(TINY, ffn_hidden=129), None, "ffn_hidden (129) must be divisible by tp (2)"),
    (ParallelDims(pp=3), SHAPE, TINY, None, "layers (4) must be divisible by pp (3)"),
    (ParallelDims(ep=2, tp=2, dp=1, pp=1), SHAPE, TINY, 6, "world size 4 (pp*dp*ep*tp = 1*1*2*2) != ranks launched 6"),
    (ParallelDims(dp=2, ep=2), RunShape(2, 12, 64), TINY, None,
     "global batch (12) must be divisible by micro_batch*dp*ep (2*2*2 = 8)"),
    (ParallelDims(pp=4), RunShape(2, 4, 64), TINY, None, "schedule 1f1b needs micro-batches per step (2"),
    (ParallelDims(), RunShape(2, 8, 999), TINY, None, "seq_len (999) must be <= model max_seq_len (256)"),
    (ParallelDims(), RunShape(2, 8, 64, precision="fp8"), TINY, None, "precision 'fp8' must be one of"),
    (ParallelDims(), RunShape(2, 8, 64, recompute="some"), TINY, None, "recompute 'some' must be one of"),
    (ParallelDims(pp=2), RunShape(2, 8, 64, stage_layers=(3, 2)), TINY, None, "stage_layers [3, 2] must be 2"),
    (ParallelDims(tp=0), SHAPE, TINY, None, "tp must be >= 1 (got 0)"),
])
def test_each_rule_names_itself_and_its_numbers(dims, shape, model, ranks, message):
    problems = layout_problems(model, dims, shape, ranks)
    assert any(message in p for p in problems), problems


def test_a_valid_layout_has_no_problems():
    assert layout_problems(TINY, ParallelDims(ep=2, tp=2), SHAPE, 4) == []
    assert layout_problems(TINY, ParallelDims(pp=2), RunShape(2, 8, 64, stage_layers=(3, 1)), 2) == []


def test_coordinates_follow_the_mesh_order():
    dims = ParallelDims(pp=2, dp=2, ep=2, tp=2)
    assert dims.world_size == 16
    assert dims.coords(0) == (0, 0, 0, 0)
    assert dims.coords(1) == (0, 0, 0, 1)  # tp fastest
    assert dims.coords(2) == (0, 0, 1, 0)
    assert dims.coords(4) == (0, 1, 0, 0)
    assert dims.coords(15) == (1, 1, 1, 1)
    assert dims.name() == "EP2_TP2_PP2_DP2"


def test_flops_count_active_experts_only():
    dense_equiv = replace(TINY, top_k=1)
    assert flops_per_token(TINY, 64) > flops_per_token(dense_equiv, 64)
    more_experts = replace(TINY, n_experts=64)
    # More experts add router FLOPs only, not expert FLOPs: top-k is what a token touches.
    delta = flops_per_token(more_experts, 64) - flops_per_token(TINY, 64)
    assert delta == 6 * TINY.n_layers * TINY.d_model * (64 - 8)
