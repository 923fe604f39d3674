"""Apply an EP/TP/PP/DP layout to the plain model on a (pp, dp, ep, tp) DeviceMesh.

This is Megatron-Core's "folded" layout with expert tensor parallel = TP:

* TP: attention is split by heads and every FFN (dense and expert) by its hidden size,
  column-parallel in and row-parallel out. Embedding and LM head are split by vocabulary.
  The usual pair of autograd ops stitches the shards: "copy" (identity forward, all-reduce
  of the gradient backward) where a shard starts and "reduce" (all-reduce forward, identity
  backward) where it ends.
* EP: a rank keeps `experts / ep` whole experts; tokens go to the rank that owns their expert
  and come back by all-to-all with uneven splits.
* PP: a rank keeps its stage's layers; `torch.distributed.pipelining` runs the schedule.
* DP: dense gradients are averaged over the dp * ep ranks that see different tokens, expert
  gradients over the dp ranks that hold the same experts.

All of it is done from outside the model: parameters are re-shaped on the meta device,
module boundaries get forward hooks, and only this rank's shard is ever materialised (its
initial values included: `local_init`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainables.moe.config import ModelConfig, ParallelDims, stage_layer_counts
from trainables.moe.model import (
    Attention,
    DenseFFN,
    GroupedExperts,
    MoETransformer,
    init_parameter,
)

# ---------------------------------------------------------------------------------------------
# Process groups


@dataclass
class ParallelContext:
    """This rank's place in the mesh and the groups it talks to."""

    dims: ParallelDims
    rank: int
    device: torch.device
    mesh: DeviceMesh
    tp_group: dist.ProcessGroup
    ep_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    dense_dp_group: dist.ProcessGroup  # dp * ep: every rank holding the same dense shard

    @property
    def coords(self) -> tuple[int, int, int, int]:
        return self.dims.coords(self.rank)

    @property
    def pp_rank(self) -> int:
        return self.coords[0]

    @property
    def ep_rank(self) -> int:
        return self.coords[2]

    @property
    def tp_rank(self) -> int:
        return self.coords[3]


def build_context(dims: ParallelDims, device: torch.device) -> ParallelContext:
    """Create the mesh and its groups; the default process group must already exist."""
    world = dist.get_world_size()
    if world != dims.world_size:
        raise ValueError(f"world size {dims.world_size} (pp*dp*ep*tp) != ranks launched {world}")
    mesh = init_device_mesh(device.type, dims.mesh_shape, mesh_dim_names=("pp", "dp", "ep", "tp"))
    dense = mesh["dp", "ep"]._flatten("dp_ep")
    return ParallelContext(
        dims=dims, rank=dist.get_rank(), device=device, mesh=mesh,
        tp_group=mesh.get_group("tp"), ep_group=mesh.get_group("ep"), pp_group=mesh.get_group("pp"),
        dp_group=mesh.get_group("dp"), dense_dp_group=dense.get_group(),
    )


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def default_timeout(seconds: float | None) -> timedelta:
    return timedelta(seconds=seconds) if seconds else timedelta(minutes=30)


# ---------------------------------------------------------------------------------------------
# Autograd-aware collectives


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the gradient is summed over the group (start of a TP region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Sum over the group forward (end of a TP region); gradient passes through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all along dim 0; backward sends gradients back the way tokens came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits = (in_splits, out_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        in_splits, out_splits = ctx.splits
        out = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return out, None, None, None


def copy_to_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _ReduceFromGroup.apply(x, group)


def _real(group: dist.ProcessGroup, size: int) -> dist.ProcessGroup | None:
    """Collectives over a group of one are skipped entirely."""
    return group if size > 1 else None


# ---------------------------------------------------------------------------------------------
# How a local parameter relates to the full one


@dataclass(frozen=True)
class ShardSpec:
    full_shape: tuple[int, ...]
    tp_dim: int | None = None  # dim of the full tensor split over tp
    tp_rank: int = 0
    tp_size: int = 1
    experts: tuple[int, int] | None = None  # (first, count) along dim 0
    is_expert: bool = False  # gradient averaged over dp only, not dp * ep

    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        if self.experts is not None:
            shape[0] = self.experts[1]
        if self.tp_dim is not None:
            shape[self.tp_dim] //= self.tp_size
        return tuple(shape)

    def tp_slice(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim] // self.tp_size
        return t.narrow(dim, self.tp_rank * n, n)

    def index(self) -> tuple[slice, ...]:
        """Where the local shard sits inside the full tensor."""
        idx = [slice(None)] * len(self.full_shape)
        if self.experts is not None:
            idx[0] = slice(self.experts[0], self.experts[0] + self.experts[1])
        if self.tp_dim is not None:
            n = self.full_shape[self.tp_dim] // self.tp_size
            idx[self.tp_dim] = slice(self.tp_rank * n, (self.tp_rank + 1) * n)
        return tuple(idx)


def local_init(cfg: ModelConfig, name: str, spec: ShardSpec, seed: int) -> torch.Tensor:
    """This rank's piece of a parameter's initial value, drawing only its own TP slice and its
    own experts (`init_parameter` draws the wide dimension, the one TP splits, block by block)."""

    def part(dim: int, size: int) -> tuple[int, int, int]:
        n = size // spec.tp_size
        return dim, spec.tp_rank * n, (spec.tp_rank + 1) * n

    if spec.experts is None:
        if spec.tp_dim is None:
            return init_parameter(cfg, name, spec.full_shape, seed)
        return init_parameter(cfg, name, spec.full_shape, seed,
                              part=part(spec.tp_dim, spec.full_shape[spec.tp_dim]))
    first, count = spec.experts
    sliced = part(spec.tp_dim - 1, spec.full_shape[spec.tp_dim]) if spec.tp_dim is not None else None
    return torch.stack([init_parameter(cfg, name, spec.full_shape, seed, expert=e, part=sliced)
                        for e in range(first, first + count)])


# ---------------------------------------------------------------------------------------------
# Tensor parallel


def _reshape_param(module: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty(shape, device="meta", dtype=old.dtype)))


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary; out-of-range ids contribute zeros, then a sum."""

    def __init__(self, vocab: int, dim: int, tp_rank: int, tp_size: int,
                 group: dist.ProcessGroup | None) -> None:
        super().__init__()
        per = vocab // tp_size
        self.lo, self.hi, self.group = tp_rank * per, (tp_rank + 1) * per, group
        self.weight = nn.Parameter(torch.empty(per, dim, device="meta"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.lo) | (ids >= self.hi)
        local = torch.where(outside, 0, ids - self.lo)
        out = F.embedding(local, self.weight) * (~outside).unsqueeze(-1)
        return reduce_from_group(out, self.group)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 group: dist.ProcessGroup) -> torch.Tensor:
    """Mean token cross entropy where each rank holds a vocabulary slice of the logits."""
    z = logits.float().reshape(-1, logits.shape[-1])
    t = target.reshape(-1)
    zmax = z.detach().max(-1).values
    dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
    z = z - zmax.unsqueeze(-1)
    sum_exp = reduce_from_group(z.exp().sum(-1), group)
    local_t = t - vocab_start
    inside = (local_t >= 0) & (local_t < z.shape[-1])
    picked = z.gather(1, local_t.clamp(0, z.shape[-1] - 1).unsqueeze(1)).squeeze(1) * inside
    target_logit = reduce_from_group(picked, group)
    return (sum_exp.log() - target_logit).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))


def _shard_boundary(module: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Input copied into the TP region, partial output summed out of it."""
    if group is None:
        return
    module.register_forward_pre_hook(lambda m, args: (copy_to_group(args[0], group),) + tuple(args[1:]))
    module.register_forward_hook(lambda m, args, out: reduce_from_group(out, group))


def apply_tensor_parallel(model: MoETransformer, ctx: ParallelContext, specs: dict[str, ShardSpec]) -> None:
    tp, t = ctx.dims.tp, ctx.tp_rank
    group = _real(ctx.tp_group, tp)

    def split(module: nn.Module, pname: str, fqn: str, dim: int) -> None:
        full = tuple(getattr(module, pname).shape)
        spec = ShardSpec(full, tp_dim=dim, tp_rank=t, tp_size=tp)
        specs[fqn] = spec
        _reshape_param(module, pname, spec.local_shape())

    for lname, block in model.layers.items():
        prefix = f"layers.{lname}"
        attn: Attention = block.attn
        for w in ("wq", "wk", "wv"):  # heads split: output rows
            split(getattr(attn, w), "weight", f"{prefix}.attn.{w}.weight", 0)
        split(attn.wo, "weight", f"{prefix}.attn.wo.weight", 1)
        _shard_boundary(attn, group)
        if isinstance(block.ffn, DenseFFN):
            ffn = block.ffn
            split(ffn.w1, "weight", f"{prefix}.ffn.w1.weight", 0)
            split(ffn.w3, "weight", f"{prefix}.ffn.w3.weight", 0)
            split(ffn.w2, "weight", f"{prefix}.ffn.w2.weight", 1)
            _shard_boundary(ffn, group)
        else:
            # Expert weights are [experts, in, out]: split the ffn hidden dim. EP adds the hooks.
            ex: GroupedExperts = block.ffn.experts
            for w, dim in (("w1", 2), ("w3", 2), ("w2", 1)):
                split(ex, w, f"{prefix}.ffn.experts.{w}", dim)
    if model.embed is not None:
        vocab, d = model.embed.weight.shape
        model.embed = VocabParallelEmbedding(vocab, d, t, tp, group)
        specs["embed.weight"] = ShardSpec((vocab, d), tp_dim=0, tp_rank=t, tp_size=tp)
    if model.head is not None:
        split(model.head, "weight", "head.weight", 0)
        if group is not None:
            model.head.register_forward_pre_hook(lambda m, args: (copy_to_group(args[0], group),))


# ---------------------------------------------------------------------------------------------
# Expert parallel


@dataclass(frozen=True)
class ReturnPlan:
    """How one call's expert outputs travel back: the permutation that grouped the received
    rows by expert, and the all-to-all splits of the trip out."""

    perm: torch.Tensor
    in_splits: list[int]
    out_splits: list[int]


class ExpertDispatch:
    """Moves a GroupedExperts call's tokens to their experts' owners and the outputs back.

    Input (x sorted by global expert id, counts per global expert) becomes (x sorted by local
    expert, counts per local expert) after one all-to-all of counts and one of tokens; the
    output takes the reverse path. Within each EP rank the experts are TP-sharded, so the
    tokens enter a TP region and their partial outputs are summed before the return trip.
    """

    def __init__(self, ep: int, ep_group: dist.ProcessGroup | None, tp_group: dist.ProcessGroup | None):
        self.ep, self.ep_group, self.tp_group = ep, ep_group, tp_group

    def send(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ReturnPlan | None]:
        if self.ep_group is None:
            return copy_to_group(x, self.tp_group), counts, None
        n_local = counts.numel() // self.ep
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.ep_group)
        recv = recv.view(self.ep, n_local)  # [source rank, local expert]
        # The one copy to the host of an EP layer: both sides' row counts, for the all-to-all's splits.
        in_splits, out_splits = torch.stack([counts.view(self.ep, n_local).sum(1), recv.sum(1)]).tolist()
        got = _AllToAll.apply(x, out_splits, in_splits, self.ep_group)
        # Received rows are grouped by source rank; the experts want them grouped by expert.
        segment = torch.repeat_interleave(torch.arange(recv.numel(), device=x.device), recv.flatten(),
                                          output_size=sum(out_splits))
        key = (segment % n_local) * self.ep + segment // n_local
        perm = torch.argsort(key, stable=True)
        return copy_to_group(got[perm], self.tp_group), recv.sum(0), ReturnPlan(perm, in_splits, out_splits)

    def bring_back(self, y: torch.Tensor, plan: ReturnPlan | None) -> torch.Tensor:
        y = reduce_from_group(y, self.tp_group)
        if plan is None:
            return y
        back = torch.empty_like(plan.perm)
        back[plan.perm] = torch.arange(plan.perm.numel(), device=plan.perm.device)
        return _AllToAll.apply(y[back], plan.in_splits, plan.out_splits, self.ep_group)


class DistributedExperts(GroupedExperts):
    """This rank's experts (same parameter names as the plain module, local shapes), called
    with every token routed on this rank. The return plan is a local of the call, so it stays
    paired with its dispatch even when activation recompute re-enters (or stops) mid-layer."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dispatch: ExpertDispatch) -> None:
        nn.Module.__init__(self)
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, device="meta")))
        self.dispatch = dispatch

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        local_x, local_counts, plan = self.dispatch.send(x, counts)
        return self.dispatch.bring_back(super().forward(local_x, local_counts), plan)


def apply_expert_parallel(model: MoETransformer, ctx: ParallelContext, specs: dict[str, ShardSpec]) -> None:
    ep, e = ctx.dims.ep, ctx.ep_rank
    dispatch = ExpertDispatch(ep, _real(ctx.ep_group, ep), _real(ctx.tp_group, ctx.dims.tp))
    for lname, block in model.layers.items():
        if isinstance(block.ffn, DenseFFN):
            continue
        ex = block.ffn.experts
        n_local = ex.w1.shape[0] // ep
        shapes = {}
        for w in ("w1", "w3", "w2"):
            fqn = f"layers.{lname}.ffn.experts.{w}"
            base = specs.get(fqn) or ShardSpec(tuple(getattr(ex, w).shape))
            spec = ShardSpec(base.full_shape, base.tp_dim, base.tp_rank, base.tp_size,
                             experts=(e * n_local, n_local), is_expert=True)
            specs[fqn] = spec
            shapes[w] = spec.local_shape()
        block.ffn.experts = DistributedExperts(shapes, dispatch)


# ---------------------------------------------------------------------------------------------
# Pipeline stage cut


def keep_stage(model: MoETransformer, ctx: ParallelContext, split: tuple[int, ...] | None) -> range:
    """Drop every layer outside this rank's stage; returns the global layer indices kept."""
    counts = stage_layer_counts(model.cfg, ctx.dims, split)
    p = ctx.pp_rank
    start = sum(counts[:p])
    kept = range(start, start + counts[p])
    for name in list(model.layers.keys()):
        if int(name) not in kept:
            del model.layers[name]
    if p > 0:
        model.embed = None
        model.pos = None
    if p < ctx.dims.pp - 1:
        model.norm = None
        model.head = None
    return kept


# ---------------------------------------------------------------------------------------------
# Putting it together


@dataclass
class ParallelModel:
    module: MoETransformer
    ctx: ParallelContext
    specs: dict[str, ShardSpec]
    layers: range
    loss_fn: object = field(repr=False)

    @property
    def is_first_stage(self) -> bool:
        return self.ctx.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.ctx.pp_rank == self.ctx.dims.pp - 1


def parallelize(model: MoETransformer, ctx: ParallelContext, seed: int,
                stage_split: tuple[int, ...] | None = None) -> ParallelModel:
    """Cut, shard and materialise a meta-device model for this rank."""
    cfg = model.cfg
    layers = keep_stage(model, ctx, stage_split)
    specs: dict[str, ShardSpec] = {}
    apply_tensor_parallel(model, ctx, specs)
    apply_expert_parallel(model, ctx, specs)
    full_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    model.to_empty(device=ctx.device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            spec = specs.setdefault(name, ShardSpec(full_shapes[name]))
            value = local_init(cfg, name, spec, seed)
            if tuple(value.shape) != tuple(p.shape):
                raise AssertionError(f"{name}: local init {tuple(value.shape)} != parameter {tuple(p.shape)}")
            p.copy_(value)
        for buf in model.buffers():
            buf.zero_()
    tp_group = _real(ctx.tp_group, ctx.dims.tp)
    if tp_group is None:
        loss_fn = cross_entropy
    else:
        vocab_start = ctx.tp_rank * (cfg.vocab_size // ctx.dims.tp)

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return vocab_parallel_cross_entropy(logits, target, vocab_start, tp_group)
    return ParallelModel(model, ctx, specs, layers, loss_fn)
