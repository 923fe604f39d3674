"""Model shapes, parallel degrees and the rules that tie them together.

Kept free of torch so that the tuner can enumerate and screen thousands of layouts
without paying for `import torch`.
"""

from __future__ import annotations

import functools

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

# fp32; bf16 and fp16: autocast over fp32 parameters (PyTorch AMP); bf16-params: parameters held in
# bf16, fp32 main gradients and an fp32 master copy in the optimizer (Megatron-Core's bf16 mode).
Precision = Literal["fp32", "bf16", "fp16", "bf16-params"]
Recompute = Literal["none", "selective", "full"]
Schedule = Literal["1f1b", "gpipe"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "bf16-params")
RECOMPUTE_MODES: tuple[str, ...] = ("none", "selective", "full")
SCHEDULES: tuple[str, ...] = ("1f1b", "gpipe")
GRAD_SYNC_MODES: tuple[str, ...] = ("bucketed", "flat")  # gradient averaging: during backward | after it
# Row widths of the grouped expert GEMMs (d_model, ffn_hidden / tp) are multiples of this: their
# kernels take 16-byte aligned rows (8 bf16 or fp16 values, 4 fp32 ones).
GEMM_ALIGN = 8
DEFAULT_BUCKET_MB = 25.0  # bucket size of the bucketed gradient reduction (PyTorch DDP's bucket_cap_mb)


def math_precision(precision: str) -> str:
    """The precision the matmuls run in (what a device's peak FLOP/s is quoted for)."""
    return "bf16" if precision == "bf16-params" else precision


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of the decoder-only MoE transformer."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int  # hidden size of one expert's SwiGLU
    n_experts: int
    top_k: int = 2
    dense_ffn_hidden: int = 0  # hidden size of dense FFN layers; 0 means 4 * d_model
    moe_every: int = 1  # every n-th layer (after the first dense ones) is an MoE layer
    first_dense_layers: int = 0
    capacity_factor: float | None = None  # None = dropless
    aux_loss_coef: float = 0.01
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def dense_ffn(self) -> int:
        return self.dense_ffn_hidden or 4 * self.d_model

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_dense_layers and (i - self.first_dense_layers) % self.moe_every == 0

    @functools.cached_property
    def n_moe_layers(self) -> int:  # cached: screening asks it for every candidate
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def problems(self) -> list[str]:
        """Shape errors of the model alone, one readable line each."""
        out = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "n_experts", "top_k",
                     "moe_every", "max_seq_len"):
            if getattr(self, name) < 1:
                out.append(f"model.{name} must be >= 1 (got {getattr(self, name)})")
        if self.first_dense_layers < 0:
            out.append(f"model.first_dense_layers must be >= 0 (got {self.first_dense_layers})")
        if self.d_model >= 1 and self.d_model % GEMM_ALIGN:
            out.append(f"model.d_model ({self.d_model}) must be a multiple of {GEMM_ALIGN} (the grouped expert GEMMs "
                       f"need 16-byte rows)")
        if self.n_heads >= 1 and self.d_model % self.n_heads:
            out.append(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.top_k not in (1, 2):
            out.append(f"model.top_k must be 1 or 2 (got {self.top_k})")
        elif self.n_experts >= 1 and self.top_k > self.n_experts:
            out.append(f"model.top_k ({self.top_k}) must be <= model.n_experts ({self.n_experts})")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            out.append(f"model.capacity_factor must be > 0 or null for dropless (got {self.capacity_factor})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # Runs a step in well under a second on one CPU core; every test uses it.
    "tiny": ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, ffn_hidden=128, n_experts=8,
                        top_k=2, dense_ffn_hidden=256, max_seq_len=256),
    # A real GPU workload (~0.5B parameters, ~0.1B active per token).
    "small": ModelConfig(vocab_size=32768, d_model=768, n_layers=8, n_heads=12, ffn_hidden=1536,
                         n_experts=16, top_k=2, max_seq_len=2048),
    # The deployment-report case: 64 experts, DeepSeekMoE-16B-like widths (~14B parameters).
    # Defined for estimates (`autotune validate`) and for runs on a real 16-GPU cluster.
    "moe-64e": ModelConfig(vocab_size=32768, d_model=2048, n_layers=24, n_heads=16, ffn_hidden=1408,
                           n_experts=64, top_k=2, max_seq_len=4096),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of the device mesh (pp, dp, ep, tp), outermost first."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.ep * self.tp

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp, self.ep, self.tp)

    @property
    def data_replicas(self) -> int:
        """Ranks that see different tokens: dense layers are data parallel over dp * ep."""
        return self.dp * self.ep

    def coords(self, rank: int) -> tuple[int, int, int, int]:
        """(pp, dp, ep, tp) coordinates of a global rank; tp varies fastest."""
        t = rank % self.tp
        e = (rank // self.tp) % self.ep
        d = (rank // (self.tp * self.ep)) % self.dp
        p = rank // (self.tp * self.ep * self.dp)
        return p, d, e, t

    def name(self) -> str:
        return f"EP{self.ep}_TP{self.tp}_PP{self.pp}_DP{self.dp}"


@dataclass(frozen=True)
class RunShape:
    """What one training step processes, independent of the model."""

    micro_batch_size: int
    global_batch_size: int
    seq_len: int
    precision: str = "fp32"
    recompute: str = "none"
    schedule: str = "1f1b"
    stage_layers: tuple[int, ...] | None = field(default=None)  # explicit pipeline split
    grad_sync: str = "bucketed"  # see GRAD_SYNC_MODES

    def accum_steps(self, dims: ParallelDims) -> int:
        """Micro-batches each data-parallel replica runs per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * dims.data_replicas)


def stage_layer_counts(model: ModelConfig, dims: ParallelDims, split: tuple[int, ...] | None) -> tuple[int, ...]:
    if split is not None:
        return tuple(split)
    return tuple([model.n_layers // dims.pp] * dims.pp)


def layout_problems(model: ModelConfig, dims: ParallelDims, shape: RunShape,
                    ranks_available: int | None = None) -> list[str]:
    """Every rule a layout breaks, as one line each naming the rule and the numbers.

    Checked before any process group starts: a broken layout must never reach the cluster.
    """
    out = list(model.problems())
    for name in ("pp", "dp", "ep", "tp"):
        if getattr(dims, name) < 1:
            out.append(f"{name} must be >= 1 (got {getattr(dims, name)})")
    for name in ("micro_batch_size", "global_batch_size", "seq_len"):
        if getattr(shape, name) < 1:
            out.append(f"{name} must be >= 1 (got {getattr(shape, name)})")
    if out:
        return out
    if model.n_experts % dims.ep:
        out.append(f"experts ({model.n_experts}) must be divisible by ep ({dims.ep})")
    if model.n_heads % dims.tp:
        out.append(f"heads ({model.n_heads}) must be divisible by tp ({dims.tp})")
    if model.ffn_hidden % dims.tp:
        out.append(f"ffn_hidden ({model.ffn_hidden}) must be divisible by tp ({dims.tp})")
    elif (model.ffn_hidden // dims.tp) % GEMM_ALIGN:
        out.append(f"expert width per rank ffn_hidden/tp ({model.ffn_hidden}/{dims.tp} = {model.ffn_hidden // dims.tp}) "
                   f"must be a multiple of {GEMM_ALIGN} (the grouped expert GEMMs need 16-byte rows)")
    if model.n_moe_layers < model.n_layers and model.dense_ffn % dims.tp:
        out.append(f"dense_ffn_hidden ({model.dense_ffn}) must be divisible by tp ({dims.tp})")
    if model.vocab_size % dims.tp:
        out.append(f"vocab_size ({model.vocab_size}) must be divisible by tp ({dims.tp})")
    if shape.stage_layers is not None:
        split = shape.stage_layers
        if len(split) != dims.pp or any(n < 1 for n in split) or sum(split) != model.n_layers:
            out.append(f"stage_layers {list(split)} must be {dims.pp} positive counts summing to "
                       f"layers ({model.n_layers})")
    elif model.n_layers % dims.pp:
        out.append(f"layers ({model.n_layers}) must be divisible by pp ({dims.pp}) or given as stage_layers")
    if ranks_available is not None and dims.world_size != ranks_available:
        out.append(f"world size {dims.world_size} (pp*dp*ep*tp = {dims.pp}*{dims.dp}*{dims.ep}*{dims.tp}) "
                   f"!= ranks launched {ranks_available}")
    step = shape.micro_batch_size * dims.data_replicas
    if shape.global_batch_size % step:
        out.append(f"global batch ({shape.global_batch_size}) must be divisible by micro_batch*dp*ep "
                   f"({shape.micro_batch_size}*{dims.dp}*{dims.ep} = {step})")
    elif dims.pp > 1 and shape.schedule == "1f1b" and shape.accum_steps(dims) < dims.pp:
        out.append(f"schedule 1f1b needs micro-batches per step ({shape.accum_steps(dims)} = global batch "
                   f"{shape.global_batch_size} / ({shape.micro_batch_size}*{dims.dp}*{dims.ep})) >= pp ({dims.pp})")
    if shape.seq_len > model.max_seq_len:
        out.append(f"seq_len ({shape.seq_len}) must be <= model max_seq_len ({model.max_seq_len})")
    if shape.precision not in PRECISIONS:
        out.append(f"precision {shape.precision!r} must be one of {', '.join(PRECISIONS)}")
    if shape.recompute not in RECOMPUTE_MODES:
        out.append(f"recompute {shape.recompute!r} must be one of {', '.join(RECOMPUTE_MODES)}")
    if shape.schedule not in SCHEDULES:
        out.append(f"schedule {shape.schedule!r} must be one of {', '.join(SCHEDULES)}")
    if shape.grad_sync not in GRAD_SYNC_MODES:
        out.append(f"grad_sync {shape.grad_sync!r} must be one of {', '.join(GRAD_SYNC_MODES)}")
    return out


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul parameters + causal-agnostic attention term.

    Active = what one token touches: attention, router, top_k experts (or the dense FFN), head.
    Recomputation is not counted (this is MFU, not hardware FLOPs utilisation).
    """
    d = cfg.d_model
    matmul = 0
    for i in range(cfg.n_layers):
        matmul += 4 * d * d
        if cfg.is_moe_layer(i):
            matmul += d * cfg.n_experts + cfg.top_k * 3 * d * cfg.ffn_hidden
        else:
            matmul += 3 * d * cfg.dense_ffn
    matmul += d * cfg.vocab_size
    return 6.0 * matmul + 12.0 * cfg.n_layers * d * seq_len


def with_overrides(model: ModelConfig, **overrides: Any) -> ModelConfig:
    return replace(model, **{k: v for k, v in overrides.items() if v is not None})
