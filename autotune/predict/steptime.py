"""Analytic step-time model: how long a layout's training step takes, before it is launched.

The memory model says which layouts fit; this one says which are fast. Like `memory.py` it is
pure arithmetic on the model config (no torch), split into named terms, and vectorised over
candidates (numpy arrays; per-degree-set quantities computed once), so that ranking 10^5
candidates costs a fraction of a second.

A step of one pipeline stage (the busiest: the last one, which also runs the LM head) is

    (n + pp - 1) x [dense compute + expert compute + TP collectives + EP all-to-all + stage sends]
    + exposed DP gradient reduction + optimizer step + per-call overheads

with `n` micro-batches per step: the `pp - 1` extra micro-batch slots are the pipeline bubble
(the same for 1F1B and GPipe; Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters", bubble fraction (p - 1) / m). Each term is a time at full device
speed (FLOPs over peak FLOP/s, bytes over bandwidth, from `autotune.space.devices`), multiplied by
an efficiency factor: the defaults below before any measurement, and after measurements the
factors `autotune.predict.calibrate` fits on the study's own trials.

Terms (columns of `raw_terms`, seconds per step at factor 1):

* dense_compute: attention (projections and the attention core), router, dense FFNs, LM head;
  3 passes (forward, two backward matmuls), 4 under full recompute, the attention core again
  under selective recompute; split by tp.
* expert_compute: top-k experts' SwiGLU over the rank's tokens (balanced routing; times the
  busiest EP rank's share of the load where the study measured the experts' imbalance, see
  `rank_imbalance`: nothing at EP 1, the experts' own at EP = n_experts), split by tp inside
  each expert.
* tp_comm: 4 all-reduces of the micro-batch's activations per layer (2 forward, 2 backward; 6
  under full recompute), ring volume 2 (tp - 1) / tp, inside a node when tp fits one.
* ep_a2a: dispatch and combine, forward and backward (4; 6 under full recompute), of
  tokens x top_k x hidden per MoE layer (a tp-th of it per rank where the trainable dispatches
  sequence-parallel, as Megatron-Core does; the built-in trainable's TP ranks each dispatch every
  token), (ep - 1) / ep of it leaves the rank; the share that
  leaves the node (EP groups wider than a node, as `autotune.trials.placement.plan` places them) goes
  at the network's bandwidth.
* pp_send: one activation and one gradient per micro-batch between stages.

Inside a node an all-to-all and a send go at the profile's `a2a_gb_s` and `p2p_gb_s` where it has
them (the cluster profile measures each collective), else at `intra_node_gb_s`.
* dp_grad: fp32 gradients, dense ones all-reduced over dp x ep ranks, expert ones over dp, ring
  volume 2 (g - 1) / g; through the network when a stage's ranks span nodes; the profile's
  `grad_overlap` share hides behind backward.
* optimizer: AdamW reads weights, gradients and two moments and writes three (28 bytes per
  parameter) at memory bandwidth; fp16 adds the loss scaler's unscale and overflow check, bf16
  parameters the write-back from the fp32 master copy.
* overhead: a layer's fixed cost per micro-batch and pass (kernel launches, the framework's own
  work), whatever the tokens: `LAUNCHES_PER_LAYER_PASS` x the profile's `launch_us`, which the
  cluster probe raises to the floor it measures by running one of the model's blocks, shrunk to a
  tiny width, on the device.
* latency: a fixed start-up time per step of each collective's algorithm (2 (g - 1) for a ring
  all-reduce over g ranks: TP all-reduces and the gradient reduction; g - 1 for a pairwise EP
  all-to-all; one per stage send), the alpha of the usual alpha-beta cost; a term of
  its own, so that calibration can weigh small, frequent collectives apart from kernel launches
  (on the CPU grid, splitting it from `overhead` took the leave-one-out tau from 0.67 to 0.76).

* memory_bound: the elementwise work no GEMM hides (norms, residual adds, the MoE dispatch and
  combine permutations, the SwiGLU product), and the stage's weights streamed through its GEMMs
  once per pass with the gradients accumulated once, its bytes over memory bandwidth, per
  micro-batch: what makes many small micro-batches slower than their FLOPs say.

The pipeline bubble is reported on its own (`bubble`, the share of the per-micro-batch terms
spent in the `pp - 1` extra slots), not as a separate column: it is the same work standing still.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from autotune.space.devices import DeviceProfile
from autotune.space.layout import Layout
from trainables.moe.config import ModelConfig

TERMS: tuple[str, ...] = ("dense_compute", "expert_compute", "tp_comm", "ep_a2a", "pp_send", "dp_grad",
                          "optimizer", "overhead", "latency", "memory_bound")
# Column headings of the terms where a table shows them (`autotune validate --terms`, benchmarks).
SHORT_NAMES: dict[str, str] = {"dense_compute": "dense", "expert_compute": "expert", "tp_comm": "tp",
                               "ep_a2a": "ep a2a", "pp_send": "pp send", "dp_grad": "dp grad", "optimizer": "optim",
                               "overhead": "ovh", "latency": "lat", "memory_bound": "membw"}
PER_MICRO_BATCH = (0, 1, 2, 3, 4, 9)  # columns that run once per micro-batch slot (bubble included)
# What share of each term's full-speed figure a real step reaches before any calibration:
# large-GEMM training reaches about half of peak (MFU 40-55% in Megatron-LM's published runs),
# grouped expert GEMMs less; collectives reach most of the link's bandwidth.
DEFAULT_EFFICIENCY: dict[str, float] = {"dense_compute": 0.55, "expert_compute": 0.45, "tp_comm": 0.7,
                                        "ep_a2a": 0.6, "pp_send": 0.7, "dp_grad": 0.7, "optimizer": 0.8,
                                        "overhead": 1.0, "latency": 1.0, "memory_bound": 0.7}
ADAMW_BYTES = 28  # per parameter: read weight, gradient, two moments; write weight, two moments
GRAD_BYTES = 4  # fp32 gradients (the trainable's master weights are fp32)
# Kernel launches the overhead term counts per layer, micro-batch and pass: a profile's `launch_us` is
# one of them, so that a layer's fixed cost per micro-batch and pass is this many times it (the
# cluster probe measures a floor of that cost on the device and divides by this).
LAUNCHES_PER_LAYER_PASS = 4.0


def prior_weights() -> np.ndarray:
    """Multipliers of the raw terms before calibration: 1 / default efficiency."""
    return np.array([1.0 / DEFAULT_EFFICIENCY[t] for t in TERMS])


@dataclass(frozen=True)
class Topology:
    """How ranks sit on nodes: None = all on one node (a single machine)."""

    ranks_per_node: int | None = None
    # CPU ranks share the machine's cores (a rank runs one thread): with more ranks than cores
    # every rank runs that much slower. None: each rank has its own device.
    cores: float | None = None

    def contention(self, world: np.ndarray) -> np.ndarray:
        if self.cores is None:
            return np.ones(world.shape)
        return np.maximum(world / self.cores, 1.0)

    def spans(self, ranks: np.ndarray) -> np.ndarray:
        """True where a group of consecutive ranks is wider than a node."""
        if self.ranks_per_node is None:
            return np.zeros(ranks.shape, dtype=bool)
        return ranks > self.ranks_per_node


@dataclass(frozen=True)
class StepTimes:
    """Predicted step times of many layouts: terms (N x len(TERMS), seconds, weighted) and the
    bubble share of each."""

    layouts: tuple[Layout, ...]
    terms: np.ndarray
    bubble_s: np.ndarray
    step_time_s: np.ndarray
    tokens_per_s: np.ndarray

    @property
    def bubble_frac(self) -> np.ndarray:
        return self.bubble_s / self.step_time_s

    def row(self, i: int) -> dict[str, float]:
        """One layout's prediction as plain numbers: every term, the bubble, step time, tokens/s."""
        out = dict(zip(TERMS, self.terms[i].tolist()))
        out["bubble"] = float(self.bubble_s[i])
        out["pred_step_time_s"] = float(self.step_time_s[i])
        out["pred_tokens_per_s"] = float(self.tokens_per_s[i])
        return out

    def order(self, tiebreak: np.ndarray | None = None) -> np.ndarray:
        """Indices fastest first; equal predictions by `tiebreak` (e.g. predicted memory), then in
        their given order."""
        if tiebreak is None:
            return np.argsort(self.step_time_s, kind="stable")
        return np.lexsort((np.asarray(tiebreak), self.step_time_s))


_PRECISION = {"fp32": 0, "bf16": 1, "fp16": 2, "bf16-params": 3}
_RECOMPUTE = {"none": 0, "selective": 1, "full": 2}
_SCHEDULE = {"1f1b": 0, "gpipe": 1}


def _columns(layouts: Sequence[Layout]) -> tuple[np.ndarray, ...]:
    """The layouts' fields as arrays (strings as small codes), one pass per field in C."""
    n = len(layouts)
    if not n:
        return (np.zeros(0),) * 5 + (np.zeros(0, dtype=np.int64),) * 3
    ep, tp, pp, dp, mb, precision, recompute, schedule = zip(*layouts)
    nums = [np.array(c, dtype=np.float64) for c in (ep, tp, pp, dp, mb)]
    codes = [np.fromiter(map(table.__getitem__, c), dtype=np.int64, count=n)
             for table, c in ((_PRECISION, precision), (_RECOMPUTE, recompute), (_SCHEDULE, schedule))]
    return (*nums, *codes)


def _slots(ep: np.ndarray, pp: np.ndarray, dp: np.ndarray, mb: np.ndarray, global_batch_size: int) -> np.ndarray:
    micro = np.maximum(np.floor(global_batch_size / (mb * dp * ep)), 1)
    return micro + pp - 1


def layer_slots(n_layers: int, layouts: Sequence[Layout], global_batch_size: int) -> np.ndarray:
    """Layer passes of one micro-batch that the busiest stage runs in a step: (micro-batches + pp - 1)
    slots of n_layers / pp layers. The count every per-micro-batch term is charged by, for
    benchmarks that split a measured step the same way."""
    ep, _tp, pp, dp, mb, *_ = _columns(layouts)
    return _slots(ep, pp, dp, mb, global_batch_size) * n_layers / pp


def raw_terms(model: ModelConfig, layouts: Sequence[Layout], global_batch_size: int, seq_len: int,
              profile: DeviceProfile, topology: Topology = Topology(),
              imbalance: np.ndarray | float = 1.0, sequence_parallel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(N x len(TERMS) seconds at full device speed, N bubble slots factor (pp - 1) / (n + pp - 1)).

    Pure and vectorised: every array operation covers all layouts at once.
    """
    ep, tp, pp, dp, mb, low, rc, _gpipe = _columns(layouts)
    n_layouts = len(layouts)
    imbalance = rank_imbalance(np.asarray(imbalance, dtype=float), ep, model.n_experts)
    out = np.zeros((n_layouts, len(TERMS)))
    if not n_layouts:
        return out, np.zeros(0)
    d, e, k, f, v = model.d_model, model.n_experts, model.top_k, model.ffn_hidden, model.vocab_size
    fd = model.dense_ffn
    n_moe_total = model.n_moe_layers
    layers = model.n_layers / pp
    moe = n_moe_total / pp
    dense_l = layers - moe
    tokens = mb * seq_len
    slots = _slots(ep, pp, dp, mb, global_batch_size)
    ab = np.where(low >= 1, 2.0, 4.0)  # activation bytes
    peak = np.select([low == 0, low == 1, low == 3], [profile.peak_flops("fp32"), profile.peak_flops("bf16"),
                                                     profile.peak_flops("bf16-params")], profile.peak_flops("fp16"))
    full = rc == 2
    passes = np.where(full, 4.0, 3.0)

    # -- compute, per micro-batch of the busiest (last) stage --------------------------------------
    # Forward FLOPs (2 per multiply-add) times passes: 3 in training, 4 when recomputed.
    proj = 8.0 * tokens * d * d / tp
    core = 4.0 * tokens * seq_len * d / tp
    core_passes = np.where(rc >= 1, 4.0, 3.0)
    dense_flops = layers * (proj * passes + core * core_passes)
    dense_flops += moe * 2.0 * tokens * d * e * passes  # router (replicated over tp)
    dense_flops += dense_l * 6.0 * tokens * d * fd / tp * passes  # dense SwiGLU layers
    dense_flops += 3.0 * 2.0 * tokens * d * v / tp  # LM head (last stage), never recomputed
    expert_flops = moe * 6.0 * tokens * k * d * f / tp * passes  # forward FLOPs x passes
    out[:, 0] = dense_flops / peak
    out[:, 1] = expert_flops / peak * imbalance

    # -- communication per micro-batch ---------------------------------------------------------------
    intra, inter = profile.intra_node_gb_s * 1e9, profile.inter_node_gb_s * 1e9
    act = tokens * d * ab
    tp_bw = np.where(topology.spans(tp), inter, intra)
    tp_calls = np.where(full, 6.0, 4.0)
    out[:, 2] = np.where(tp > 1, layers * tp_calls * 2.0 * (tp - 1) / tp * act / tp_bw, 0.0)
    a2a_calls = np.where(full, 6.0, 4.0)
    sent = act * k * (ep - 1) / ep * np.asarray(imbalance)
    if sequence_parallel:  # each TP rank dispatches its own 1/tp of the sequence (Megatron-Core)
        sent = sent / tp
    if topology.ranks_per_node is None:
        off_node = np.zeros(n_layouts)
    else:
        # An EP x TP group wider than a node is split over nodes (autotune.trials.placement.plan): the
        # peers on other nodes get their share through the network.
        ep_per_node = np.maximum(np.floor(topology.ranks_per_node / tp), 1)
        off_node = np.where(ep * tp > topology.ranks_per_node, (ep - np.minimum(ep_per_node, ep)) / np.maximum(ep - 1, 1), 0.0)
    a2a_bw = (profile.a2a_gb_s or profile.intra_node_gb_s) * 1e9
    out[:, 3] = np.where(ep > 1, moe * a2a_calls * sent * ((1 - off_node) / a2a_bw + off_node / inter), 0.0)
    world = ep * tp * pp * dp
    pp_bw = np.where(topology.spans(world), inter, (profile.p2p_gb_s or profile.intra_node_gb_s) * 1e9)
    out[:, 4] = np.where(pp > 1, 2.0 * act / pp_bw, 0.0)

    # -- memory-bound work per micro-batch: bytes over memory bandwidth --------------------------------
    # Per layer and forward pass: two norms (read, write) and two residual adds (two reads, a
    # write) of the activations; in an MoE layer the dispatch and combine permutations (read,
    # write, both ways) of the top-k copies and the SwiGLU product of the expert hidden states
    # (two reads, a write); in a dense layer that product over the dense FFN's hidden states.
    # Backward moves about twice as much, a recomputed forward once more.
    per_layer = 10.0 * tokens * d * ab
    moe_bytes = moe * (4.0 * tokens * k * d * ab + 3.0 * tokens * k * f / tp * ab * imbalance)
    dense_bytes = dense_l * 3.0 * tokens * fd / tp * ab
    # Every micro-batch also streams the stage's weights through its GEMMs (once per pass, at the
    # GEMMs' precision) and adds its gradients into the accumulated ones (read and write at the
    # gradients' width): a cost per micro-batch that no larger micro-batch pays more of, so that
    # small micro-batches, and expert GEMMs of few tokens each, are slower than their FLOPs say.
    dense_params, expert_params = _params_per_rank(model, ep, tp, pp)
    weight_bytes = (dense_params + expert_params) * (ab * passes + 2.0 * GRAD_BYTES)
    out[:, 9] = ((layers * per_layer + moe_bytes + dense_bytes) * passes + weight_bytes) / (profile.hbm_gb_s * 1e9)
    out[:, list(PER_MICRO_BATCH)] *= slots[:, None]

    # -- once per step -------------------------------------------------------------------------------
    stage_ranks = ep * tp * dp
    dp_bw = np.where(topology.spans(stage_ranks), inter, intra)
    g1, g2 = dp * ep, dp
    reduce = (np.where(g1 > 1, 2.0 * (g1 - 1) / g1 * dense_params, 0.0)
              + np.where(g2 > 1, 2.0 * (g2 - 1) / g2 * expert_params, 0.0)) * GRAD_BYTES / dp_bw
    out[:, 5] = reduce * (1.0 - profile.grad_overlap)
    # fp16's loss scaling also unscales and checks every gradient (read and write, 8 bytes); bf16
    # parameters are written back from the fp32 master copy (read 4 bytes, write 2).
    opt_bytes = ADAMW_BYTES + np.where(low == 2, 8.0, 0.0) + np.where(low == 3, 6.0, 0.0)
    out[:, 6] = (dense_params + expert_params) * opt_bytes / (profile.hbm_gb_s * 1e9)
    launches = slots * layers * passes * LAUNCHES_PER_LAYER_PASS
    # Start-up latencies, alpha of the alpha-beta cost, per step of each collective's algorithm: a
    # ring all-reduce over g ranks takes 2 (g - 1) steps, a pairwise all-to-all g - 1, a send one.
    collectives = (slots * (np.where(tp > 1, layers * tp_calls * 2.0 * (tp - 1), 0)
                            + np.where(ep > 1, moe * a2a_calls * (ep - 1), 0) + np.where(pp > 1, 2, 0))
                   + np.where(g1 > 1, 2.0 * (g1 - 1), 0) + np.where(g2 > 1, 2.0 * (g2 - 1), 0))
    out[:, 7] = launches * profile.launch_us * 1e-6
    out[:, 8] = collectives * profile.latency_us * 1e-6
    out *= topology.contention(world)[:, None]
    bubble = (pp - 1) / slots
    return out, bubble


def _expected_max_normal(n: np.ndarray) -> np.ndarray:
    """E[max of n standard normals] (Blom's approximation; 0 for n = 1)."""
    from scipy.special import ndtri

    n = np.maximum(np.asarray(n, dtype=float), 1.0)
    return np.where(n > 1, ndtri((n - 0.375) / (n + 0.25)), 0.0)


def rank_imbalance(expert_imbalance: np.ndarray | float, ep: np.ndarray, n_experts: int) -> np.ndarray:
    """The busiest EP rank's load over the mean from the measured max/mean load of single
    experts: a rank holds n_experts / ep of them, whose loads add (their spread grows by
    sqrt(n_experts / ep), their mean by n_experts / ep), and the busiest of ep ranks stands as
    far out as the maximum of ep normal draws. At ep = 1 one rank holds every expert: 1; at
    ep = n_experts it is the experts' own imbalance."""
    imb = np.asarray(expert_imbalance, dtype=float)
    if n_experts <= 1:
        return np.ones(np.broadcast(imb, ep).shape)
    z_e = float(_expected_max_normal(np.array(n_experts)))
    return 1.0 + (imb - 1.0) * _expected_max_normal(ep) / z_e * np.sqrt(ep / n_experts)


def _params_per_rank(model: ModelConfig, ep: np.ndarray, tp: np.ndarray,
                     pp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dense, expert) parameter elements of the last stage's rank (see memory.stage_params)."""
    d = model.d_model
    layers, moe = model.n_layers / pp, model.n_moe_layers / pp
    dense = layers * (2 * d + 4 * d * d / tp) + moe * d * model.n_experts
    dense += (layers - moe) * 3 * d * model.dense_ffn / tp + d + model.vocab_size / tp * d
    dense += np.where(pp == 1, model.vocab_size / tp * d + model.max_seq_len * d, 0.0)
    expert = moe * 3 * (model.n_experts / ep) * d * (model.ffn_hidden / tp)
    return dense, expert


def predict(model: ModelConfig, layouts: Sequence[Layout], global_batch_size: int, seq_len: int,
            profile: DeviceProfile, topology: Topology = Topology(), weights: Iterable[float] | None = None,
            imbalance: np.ndarray | float = 1.0, sequence_parallel: bool = False) -> StepTimes:
    """Every layout's predicted step, term by term (weights: the calibrated multipliers, default
    1 / DEFAULT_EFFICIENCY)."""
    raw, bubble = raw_terms(model, layouts, global_batch_size, seq_len, profile, topology, imbalance,
                            sequence_parallel)
    w = prior_weights() if weights is None else np.asarray(list(weights), dtype=float)
    terms = raw * w
    bubble_s = terms[:, list(PER_MICRO_BATCH)].sum(axis=1) * bubble if len(layouts) else np.zeros(0)
    step = terms.sum(axis=1)
    return StepTimes(tuple(layouts), terms, bubble_s, step, global_batch_size * seq_len / step)
