"""A decoder-only Mixture-of-Experts transformer in plain PyTorch.

Nothing here knows about ranks or process groups. Parallelism is applied from outside
(`parallel.py`) by slicing parameters and hooking module boundaries, the way torchtitan's
`parallelize` functions do. Two properties make that possible:

* every parameter is initialised from its own seeded stream (`init_parameter`), so a rank can
  materialise just its shard and still hold exactly what a single rank would hold;
* the model tolerates pruned parts (`embed`, `norm`, `head` set to None, layers removed),
  which is how a pipeline stage is cut out of it. Layer names keep their global index.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainables.moe.config import RECOMPUTE_MODES, ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class AttentionCore(nn.Module):
    """Scaled dot-product attention alone: the part `selective` recompute re-runs."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.core = AttentionCore()
        self.recompute_core = False  # `selective` recompute: re-run the core in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # The head count is read from the weights, so a head-sharded copy just works.
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        o = (checkpoint(self.core, q, k, v, use_reentrant=False) if self.recompute_core
             else self.core(q, k, v)).transpose(1, 2).reshape(b, s, -1)
        return self.wo(o)


class DenseFFN(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    """`t`, whose gradient reaches its producer dense: the grouped GEMM's backward kernels take
    row-major operands, and a gradient can arrive broadcast (the backward of a sum) or, for a
    rank that received no token, empty with any strides."""
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous() if g.numel() else torch.zeros(g.shape, dtype=g.dtype, device=g.device))
    return t


def _low(t: torch.Tensor) -> torch.Tensor:
    """`t` as autocast would hand it to a matmul (grouped GEMMs are not on its lists): in its low
    precision where it is on."""
    device = t.device.type
    return t.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else t


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of `x` grouped by `offs` (int32 ends of each group) times `w[g]`: one kernel for every
    group (fused on sm90+ in bf16)."""
    return _contiguous_grad(F.grouped_mm(x, w, offs=offs))


class GroupedExperts(nn.Module):
    """SwiGLU experts stored as stacked weights, dim 0 = expert, run as grouped GEMMs.

    Input rows are sorted by expert; `counts[e]` rows belong to the e-th expert held here. The
    group offsets are computed on the device: no loop over experts and no copy to the host.
    Widths must keep every row 16 bytes aligned (`d_model` and `ffn_hidden / tp` multiples of
    8, a rule of the layout), as the grouped GEMM kernels require.
    """

    def __init__(self, n_experts: int, d: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, d, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        x = _low(x)  # the rows cast once, for w1 and w3
        # Each weight cast right before its GEMM, as autocast casts a linear layer's: in backward
        # its gradient is then cast back and accumulated before the next GEMM's is made.
        h = F.silu(grouped_mm(x, _low(self.w1), offs)) * grouped_mm(x, _low(self.w3), offs)
        return grouped_mm(h, _low(self.w2), offs)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the activations whose backward also seeds the aux loss gradient.

    The load-balancing loss then needs no path to the final loss, which is what lets it
    work unchanged inside a pipeline stage that never sees the loss.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=torch.float32, device=grad.device)
        return grad, aux_grad, None


def _count(index: torch.Tensor, n: int) -> torch.Tensor:
    """How many times each of 0..n-1 occurs in `index`, on the device: bincount sizes its result
    from the largest value, which a GPU must copy to the host first."""
    return torch.zeros(n, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


def _recomputing() -> bool:
    """True while autograd runs a backward pass (activation recompute re-enters forward there)."""
    # No public query exists for this in torch 2.13; torch.autograd.graph uses the same binding.
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Top-k softmax router, Switch-style load-balancing loss, optional capacity factor."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.aux_loss_scale = cfg.aux_loss_coef
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = GroupedExperts(cfg.n_experts, cfg.d_model, cfg.ffn_hidden)
        # Statistics since the last `reset_moe_stats`, kept as buffers so they follow the device.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_experts, dtype=torch.long), persistent=False)
        self.register_buffer("dropped", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("aux_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        n, k, n_exp = xf.shape[0], self.top_k, self.n_experts
        with torch.autocast(device_type=xf.device.type, enabled=False):
            logits = F.linear(xf.float(), self.router.weight.float())
        probs = logits.softmax(-1)
        top_w, top_i = probs.topk(k, dim=-1)
        if k > 1:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        # Assignments slot-major: every token's first choice outranks any second choice.
        expert_of = top_i.t().reshape(-1)
        weight_of = top_w.t().reshape(-1)
        token_of = torch.arange(n, device=xf.device).repeat(k)
        counts = _count(expert_of, n_exp)
        aux = n_exp * torch.sum(counts.to(probs.dtype) / (n * k) * probs.mean(0))

        order = torch.argsort(expert_of, stable=True)
        sorted_expert = expert_of[order]
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * n * k / n_exp)
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(n * k, device=xf.device) - starts[sorted_expert]
            keep = position < capacity
            order, sorted_expert = order[keep], sorted_expert[keep]
            kept_counts = _count(sorted_expert, n_exp)
        else:
            kept_counts = counts

        y = self.experts(xf[token_of[order]], kept_counts)
        y = y * weight_of[order, None]
        out = torch.zeros_like(xf, dtype=torch.promote_types(xf.dtype, y.dtype)).index_add(0, token_of[order], y)
        out = out.to(x.dtype)

        if not _recomputing():
            with torch.no_grad():
                self.tokens_per_expert += counts
                self.dropped += counts.sum() - kept_counts.sum()
                self.aux_sum += aux.detach().double()
                self.calls += 1
        if torch.is_grad_enabled():
            out = _AttachAuxLoss.apply(out, aux, self.aux_loss_scale)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else DenseFFN(cfg.d_model, cfg.dense_ffn)
        self.recompute = False  # `full` recompute: the model re-runs the whole block in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos: nn.Embedding | None = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head: nn.Linear | None = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, seq] -> logits [batch, seq, vocab] (or the hidden state of a stage)."""
        if self.embed is not None:
            positions = torch.arange(x.shape[1], device=x.device)
            x = self.embed(x) + self.pos(positions)
        for layer in self.layers.values():
            x = checkpoint(layer, x, use_reentrant=False) if layer.recompute else layer(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.head is not None:
            x = self.head(x)
        return x


def build_model(cfg: ModelConfig, device: torch.device | str = "meta") -> MoETransformer:
    """Construct without initialising; `init_parameter` fills values once shapes are final."""
    with torch.device(device):
        return MoETransformer(cfg)


def expert_param(name: str) -> bool:
    return ".experts." in name


# A parameter's wide dimension (the one that grows with heads, hidden size or vocabulary) is
# drawn in up to this many blocks, each from its own stream, so that a slice of it can be drawn
# without drawing the rest.
INIT_BLOCKS = 64


def wide_dim(name: str) -> int:
    """The wide dimension of a parameter's value (of one expert's slice, for expert weights)."""
    if name.endswith(("wo.weight", "w2.weight", "experts.w1", "experts.w3")):
        return 1  # [d_model, hidden] (Linear weights are [out, in]; experts are [in, out])
    return 0  # [hidden, d_model], [vocab, d_model] and the position table


def _stream(seed: int, name: str, expert: int | None, block: int) -> torch.Generator:
    key = f"{seed}:{name}:{'' if expert is None else expert}:{block}".encode()
    return torch.Generator().manual_seed(zlib.crc32(key) * 7919 + seed)


def init_parameter(cfg: ModelConfig, name: str, full_shape: tuple[int, ...], seed: int,
                   expert: int | None = None, part: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Initial value of one parameter (or of one expert's slice of it), on CPU in fp32.

    Depends only on (seed, name, expert): any rank can recreate exactly its own piece.
    `part = (dim, start, stop)` returns only that slice; along the wide dimension only the
    blocks that overlap it are drawn.
    """
    shape = list(full_shape[1:] if expert is not None else full_shape)
    dim, lo, hi = part if part is not None else (0, 0, shape[0])
    if name.endswith("norm.weight"):
        shape[dim] = hi - lo
        return torch.ones(shape)
    std = cfg.init_std
    if name.endswith(("wo.weight", "w2.weight", "experts.w2")):
        std = std / math.sqrt(2 * cfg.n_layers)
    wide = wide_dim(name)
    n = shape[wide]
    block = -(-n // INIT_BLOCKS)
    first, last = (lo // block, -(-hi // block)) if dim == wide else (0, -(-n // block))
    pieces = []
    for b in range(first, last):
        piece = list(shape)
        piece[wide] = min(n, (b + 1) * block) - b * block
        pieces.append(torch.randn(piece, generator=_stream(seed, name, expert, b)) * std)
    value = torch.cat(pieces, wide)
    offset = first * block if dim == wide else 0
    return value.narrow(dim, lo - offset, hi - lo)


def set_recompute(model: nn.Module, mode: str) -> None:
    """Keep fewer activations and re-run part of the forward in backward: nothing (`none`), the
    attention core (`selective`) or every block (`full`), through `torch.utils.checkpoint`."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute {mode!r}: choose one of {', '.join(RECOMPUTE_MODES)}")
    for m in model.modules():
        if isinstance(m, Block):
            m.recompute = mode == "full"
        elif isinstance(m, Attention):
            m.recompute_core = mode == "selective"


def reset_moe_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, MoE):
            for buf in (m.tokens_per_expert, m.dropped, m.aux_sum, m.calls):
                buf.zero_()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Gradient seeded into each layer's aux loss: coef x loss scale / micro-batches per step."""
    for m in moe_layers(model):
        m.aux_loss_scale = scale
