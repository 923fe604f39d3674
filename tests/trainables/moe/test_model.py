"""The plain model, on one process, with no parallelism."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from trainables.moe.config import PRESETS
from trainables.moe.model import (
    MoE,
    build_model,
    init_parameter,
    moe_layers,
    reset_moe_stats,
)
from trainables.moe.parallel import ShardSpec, local_init


def materialized(cfg, seed=0):
    model = build_model(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(local_init(cfg, name, ShardSpec(tuple(p.shape)), seed))
        for b in model.buffers():
            b.zero_()
    return model


def test_presets_exist_with_the_seed_scale():
    assert {"tiny", "small", "moe-64e"} <= set(PRESETS)
    assert PRESETS["moe-64e"].n_experts == 64
    for cfg in PRESETS.values():
        assert cfg.problems() == []


def test_tiny_forward_backward_is_shaped():
    # Speed is a benchmark's business (benchmarks/trial_overhead.py), not a unit test's: a timed
    # assertion here only measured how busy the shared machine was.
    cfg = PRESETS["tiny"]
    model = materialized(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    logits = model(tokens)
    F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens.reshape(-1)).backward()
    assert logits.shape == (2, 64, cfg.vocab_size)
    assert all(p.grad is not None for p in model.parameters())


def test_initialisation_depends_only_on_seed_name_and_expert():
    cfg = PRESETS["tiny"]
    a = init_parameter(cfg, "layers.0.ffn.experts.w1", (8, 64, 128), seed=3, expert=5)
    b = init_parameter(cfg, "layers.0.ffn.experts.w1", (8, 64, 128), seed=3, expert=5)
    c = init_parameter(cfg, "layers.0.ffn.experts.w1", (8, 64, 128), seed=3, expert=6)
    assert a.shape == (64, 128) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(init_parameter(cfg, "layers.1.attn_norm.weight", (64,), 0), torch.ones(64))


def test_model_is_causal():
    cfg = PRESETS["tiny"]
    model = materialized(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    # Earlier positions only move by float noise (another token in an expert's batch changes
    # the matmul blocking); a leak from the future would move them like the later ones.
    assert (a[0, :10] - b[0, :10]).abs().max() < 1e-5
    assert (a[0, 10:] - b[0, 10:]).abs().max() > 1e-2


def _moe(top_k=2, capacity_factor=None, n_experts=8):
    cfg = replace(PRESETS["tiny"], top_k=top_k, capacity_factor=capacity_factor, n_experts=n_experts)
    model = materialized(cfg)
    return cfg, moe_layers(model)[0]


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_counts_every_assignment_and_aux_loss_is_switch_style(top_k):
    cfg, moe = _moe(top_k=top_k)
    torch.manual_seed(0)  # the bound below holds for typical inputs, not every one: a fixed input
    x = torch.randn(3, 10, cfg.d_model)
    out = moe(x)
    assert out.shape == x.shape
    assert int(moe.tokens_per_expert.sum()) == 30 * top_k
    assert int(moe.dropped) == 0  # dropless by default
    # Switch loss: n_experts * sum(fraction routed * mean probability) >= 1, equality when uniform.
    assert float(moe.aux_sum) >= 1.0 - 1e-6


def test_capacity_factor_drops_and_accounts_for_tokens():
    cfg, moe = _moe(top_k=1, capacity_factor=0.5)
    x = torch.randn(4, 16, cfg.d_model)
    with torch.no_grad():
        out = moe(x)
    capacity = int(0.5 * 64 / 8)
    kept = torch.clamp(moe.tokens_per_expert, max=capacity).sum()
    assert int(moe.dropped) == int(moe.tokens_per_expert.sum() - kept) > 0
    # A dropped token gets no expert output: its row is exactly zero (the residual carries it).
    zero_rows = (out.reshape(-1, cfg.d_model).abs().sum(-1) == 0).sum()
    assert int(zero_rows) == int(moe.dropped)


def test_aux_loss_gradient_reaches_the_router_without_the_main_loss():
    cfg, moe = _moe()
    x = torch.randn(2, 8, cfg.d_model)
    out = moe(x)
    # Zero gradient from the main loss: whatever reaches the router comes from the aux loss.
    (out * 0).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    reset_moe_stats(moe)
    assert int(moe.tokens_per_expert.sum()) == 0 and int(moe.calls) == 0


def test_interleaved_dense_layers():
    cfg = replace(PRESETS["tiny"], moe_every=2, first_dense_layers=1)
    model = materialized(cfg)
    kinds = [isinstance(b.ffn, MoE) for b in model.layers.values()]
    assert kinds == [False, True, False, True]
    assert cfg.n_moe_layers == 2


def test_a_tensor_parallel_slice_is_drawn_alone_and_equals_the_slice_of_the_whole():
    """A TP rank draws only the blocks of the wide dimension that overlap its shard."""
    cfg = PRESETS["small"]
    cases = [("layers.0.attn.wq.weight", (768, 768), None, 0), ("layers.0.attn.wo.weight", (768, 768), None, 1),
             ("head.weight", (32768, 768), None, 0), ("layers.0.ffn.experts.w1", (4, 768, 1536), 2, 1),
             ("layers.0.ffn.experts.w2", (4, 1536, 768), 2, 0)]
    for name, shape, expert, dim in cases:
        whole = init_parameter(cfg, name, shape, 0, expert=expert)
        for tp in (2, 3, 4):
            n = whole.shape[dim] // tp
            for r in range(tp):
                mine = init_parameter(cfg, name, shape, 0, expert=expert, part=(dim, r * n, (r + 1) * n))
                assert torch.equal(mine, whole.narrow(dim, r * n, n)), (name, tp, r)


# -- the grouped expert GEMMs ---------------------------------------------------------------------

def _moe_layer(n_experts: int = 64, d: int = 64, hidden: int = 128, seed: int = 0) -> MoE:
    cfg = replace(PRESETS["tiny"], n_experts=n_experts, d_model=d, ffn_hidden=hidden, n_heads=4)
    torch.manual_seed(seed)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return layer


def _forward_backward(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    (y.float().pow(2).mean()).backward()
    return y.detach(), {n: p.grad.detach().clone() for n, p in layer.named_parameters()}, x.grad.detach()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grouped_experts_give_the_loop_s_outputs_and_gradients(precision):
    """The product's grouped GEMMs against the former loop over experts (tests/.../reference.py):
    the same outputs and per-parameter gradients, some experts getting no token."""
    from tests.trainables.moe.reference import looped

    layer = _moe_layer(n_experts=16)
    x = torch.randn(2, 24, 64)  # 48 tokens x top-2 over 16 experts: some experts get none
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with amp:
        grouped = _forward_backward(layer, x)
        with looped():
            loop = _forward_backward(layer, x)
    assert torch.equal(grouped[0], loop[0])
    for name, g in grouped[1].items():
        assert torch.equal(g, loop[1][name]), name
    if precision == "fp32":
        assert torch.equal(grouped[2], loop[2])
    else:  # the rows are cast once for w1 and w3, so their two gradients add up in bf16
        assert (grouped[2] - loop[2]).abs().max() <= 2 ** -7 * loop[2].abs().max()


def test_one_moe_layer_with_64_experts_issues_at_most_24_matmul_kernels():
    """Forward and backward of one MoE layer at EP 1: the router and three grouped GEMMs, each
    with its two backward GEMMs (12), where the loop issued 9 per expert plus the router's 3."""
    from tests.trainables.moe.reference import MatmulCount, looped

    layer = _moe_layer(n_experts=64)
    x = torch.randn(4, 64, 64)
    with MatmulCount() as grouped:
        _forward_backward(layer, x)
    with looped(), MatmulCount() as loop:
        _forward_backward(layer, x)
    assert grouped.total <= 24, grouped.calls
    assert loop.total == 9 * 64 + 3, loop.calls  # the check can fail: the loop's count, as before


def test_no_copy_to_the_host_in_an_moe_layer_at_ep_1():
    """Nothing in the layer's forward or backward reads a tensor's value on the host (`.tolist()`,
    `.item()`, an output whose size depends on the data): run on fake tensors, which have no values,
    any such read raises. In bf16, the grouped GEMM's precision on a GPU."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    from tests.trainables.moe.reference import looped

    with FakeTensorMode():
        layer = _moe_layer(n_experts=8)
        x = torch.randn(2, 16, 64, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().pow(2).mean().backward()
        assert x.grad.shape == x.shape and layer.experts.w1.grad.shape == layer.experts.w1.shape
        with looped(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(DataDependentOutputException):
            layer(x)  # the check can fail: the loop copied the group sizes to the host
