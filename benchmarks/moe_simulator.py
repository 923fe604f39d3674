"""A held-out MoE training simulator: tables of layouts the search was not designed on.

The search (`autotune.search`) and the step-time model (`autotune.predict.steptime`) were shaped on
this machine's CPU grid and a few published tables. To show that a rule does not only win there,
this simulator writes whole tables of a space's valid layouts from a *different* cost model,
fixed before the search was replayed on them, and imports nothing of autotune's step-time model:

* GEMM efficiency from the shape (rows and output width, saturating curves), grouped expert
  GEMMs by tokens per local expert; peak figures from the data sheets;
* sequence-parallel tensor parallelism (reduce-scatter and all-gather of 1/tp of the activations),
  with a latency per call that grows with log2(tp);
* hierarchical expert all-to-all: each TP rank sends its 1/tp share; the part that leaves the node
  goes through the network, whose effective bandwidth falls with the number of nodes in the
  group; a latency per peer;
* load imbalance growing with log2(ep); memory-bound ops (norms, residuals, permutes) by bytes
  over bandwidth; kernel launches and a per-micro-batch host cost;
* 1F1B hides half of its stage sends behind compute, GPipe none; the gradient reduction hides
  behind the last micro-batch's backward; fp16 pays for loss scaling; fp32 runs at fp32 peak;
* measured peak memory: the memory model's prediction times a seeded +-5% error, so that some
  layouts predicted to fit run out of memory; throughput times a seeded 2% log-normal noise.

Families (each a space under benchmarks/spaces and a device here):

* `sim_h100`: the seed space (search_spaces/seed-16x80gb.yaml), 2 nodes of 8 H100s, 400 Gb/s
  per GPU;
* `sim_a100_64`: benchmarks/spaces/sim_64x80gb.yaml, 8 nodes of 8 A100s on a 100 Gb/s network.

    python -m benchmarks.moe_simulator          # write benchmarks/results/sim_<family>.csv
    python -m benchmarks.search_efficiency --family sim_h100    # replay a family

Results: benchmarks/results/sim_<family>.csv (the tables `search_efficiency.py` replays).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from autotune.predict.candidates import INVALID, screen  # noqa: E402
from autotune.space.layout import Layout  # noqa: E402
from autotune.space.spec import load_spec  # noqa: E402
from benchmarks.common import RESULTS, SPACES, say  # noqa: E402
from trainables.moe.config import ModelConfig  # noqa: E402


@dataclass(frozen=True)
class Cluster:
    peak_tflops: dict[str, float]
    hbm_gb_s: float
    nvlink_gb_s: float
    net_gb_s: float
    gpus_per_node: int = 8


H100 = Cluster({"fp32": 67, "bf16": 989, "fp16": 989}, 3350, 450, 50)
A100_100G = Cluster({"fp32": 19.5, "bf16": 312, "fp16": 312}, 2039, 300, 12.5)
FAMILIES = {"sim_h100": (ROOT / "search_spaces" / "seed-16x80gb.yaml", H100, 11),
            "sim_a100_64": (SPACES / "sim_64x80gb.yaml", A100_100G, 12)}


def _gemm_eff(rows: float, width: float, top: float = 0.8) -> float:
    return top * rows / (rows + 384.0) * width / (width + 256.0)


def _noise(seed: int, key: str, sd: float) -> float:
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return float(rng.normal(0.0, sd))


def step_time(m: ModelConfig, lay: Layout, gbs: int, seq: int, c: Cluster) -> float:
    """Seconds per optimizer step of the busiest (last) pipeline stage."""
    ep, tp, pp, dp, mb = lay.ep, lay.tp, lay.pp, lay.dp, lay.micro_batch_size
    b = 4 if lay.precision == "fp32" else 2
    peak = c.peak_tflops[lay.precision] * 1e12
    n_micro = max(gbs // (mb * dp * ep), 1)
    tokens = mb * seq
    layers = m.n_layers / pp
    moe = m.n_moe_layers / pp
    dense_layers = layers - moe
    d, f, k, e, v = m.d_model, m.ffn_hidden, m.top_k, m.n_experts, m.vocab_size
    fwd_mult = {"none": 3.0, "selective": 3.0, "full": 4.0}[lay.recompute]

    # compute of one micro-batch (forward + backward, recompute included)
    proj = 8 * tokens * d * d / tp / (peak * _gemm_eff(tokens, d / tp))
    core = 2 * tokens * seq * d / tp / (peak * 0.45)  # causal flash attention: half the square
    core_mult = fwd_mult + (1.0 if lay.recompute == "selective" else 0.0)
    dense_ffn = 6 * tokens * d * m.dense_ffn / tp / (peak * _gemm_eff(tokens, m.dense_ffn / tp))
    rows_per_expert = tokens * k * ep / e
    imbalance = 1.0 + 0.12 * math.log2(ep)
    experts = 6 * tokens * k * d * f / tp * imbalance / (peak * _gemm_eff(rows_per_expert, f / tp, 0.7))
    router = 2 * tokens * d * e / (peak * _gemm_eff(tokens, e))
    head = 6 * tokens * d * v / tp / (peak * _gemm_eff(tokens, v / tp))
    membound = (24 * tokens * d * b / tp + 4 * tokens * k * d * b) / (c.hbm_gb_s * 1e9 * 0.7)
    compute = (layers * (proj * fwd_mult + core * core_mult) + dense_layers * dense_ffn * fwd_mult / 3
               + moe * (experts * fwd_mult / 3 + router * fwd_mult / 3) + head
               + layers * membound * fwd_mult / 3 * 3)
    launches = layers * 40 * fwd_mult * 4e-6 + 3e-4

    # tensor parallel, sequence-parallel: per layer 2 reduce-scatter + 2 all-gather forward, as many backward
    tp_calls = 8 if lay.recompute != "full" else 12
    tp_bw = (c.nvlink_gb_s if tp <= c.gpus_per_node else c.net_gb_s) * 1e9 * 0.8
    tp_t = layers * tp_calls * ((tp - 1) / tp * tokens * d * b / tp_bw + 6e-6 * math.log2(tp)) if tp > 1 else 0.0

    # expert all-to-all, hierarchical
    a2a_calls = 4 if lay.recompute != "full" else 6
    if ep > 1:
        share = tokens * k * d * b / tp * imbalance  # each TP rank sends its slice
        group = ep * tp
        per_node_ep = max(c.gpus_per_node // tp, 1)
        off = 0.0 if group <= c.gpus_per_node else (ep - per_node_ep) / ep
        nodes = max(group / c.gpus_per_node, 1.0)
        net = c.net_gb_s * 1e9 * 0.85 / (1 + 0.15 * math.log2(nodes))
        sent = share * (ep - 1) / ep
        a2a = max(sent * (1 - off) / (c.nvlink_gb_s * 1e9 * 0.75), sent * off / net) + 3e-6 * (ep - 1)
        a2a_t = moe * a2a_calls * a2a
    else:
        a2a_t = 0.0

    per_micro = compute + launches + tp_t + a2a_t
    # stage sends
    stage_ranks = ep * tp * dp
    send_bw = (c.net_gb_s if stage_ranks >= c.gpus_per_node else c.nvlink_gb_s) * 1e9 * 0.8
    send = 2 * tokens * d * b / tp / send_bw + 2e-5 if pp > 1 else 0.0
    exposed_send = send * (0.5 if lay.schedule == "1f1b" else 1.0)
    pipeline = (n_micro + pp - 1) * (per_micro + exposed_send)

    # gradient reduction (fp32) over the data-parallel replicas, behind the last backward
    dense_params = layers * 4 * d * d / tp + dense_layers * 3 * d * m.dense_ffn / tp + v * d / tp
    expert_params = moe * 3 * (e / ep) * d * f / tp
    g_dense, g_exp = dp * ep, dp
    spans = stage_ranks > c.gpus_per_node
    bw = (c.net_gb_s * 0.8 if spans else c.nvlink_gb_s * 0.8) * 1e9
    reduce = ((2 * (g_dense - 1) / g_dense * dense_params if g_dense > 1 else 0.0)
              + (2 * (g_exp - 1) / g_exp * expert_params if g_exp > 1 else 0.0)) * 4 / bw
    exposed_reduce = max(0.0, reduce - 0.8 * per_micro * 2 / 3)
    optimizer = (dense_params + expert_params) * 16 / (c.hbm_gb_s * 1e9 * 0.8) + 2e-3
    scaler = 1.01 if lay.precision == "fp16" else 1.0
    return (pipeline + exposed_reduce + optimizer) * scaler


def write_family(name: str, out: Path = RESULTS) -> Path:
    space, cluster, seed = FAMILIES[name]
    spec = load_spec(space)
    sc = screen(spec)
    m = spec.model.config()
    gbs, seq = spec.search.global_batch_size, spec.search.seq_len
    path = out / f"{name}.csv"
    rows = []
    for cand in sc.candidates:
        if cand.verdict == INVALID:
            continue
        lay = cand.layout
        t = step_time(m, lay, gbs, seq, cluster) * math.exp(_noise(seed, lay.key, 0.02))
        peak = int(cand.prediction.total * (1 + 0.05 * math.tanh(_noise(seed + 1, lay.key, 1.0))))
        rows.append({"ep": lay.ep, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "micro_batch_size": lay.micro_batch_size,
                     "precision": lay.precision, "recompute": lay.recompute, "schedule": lay.schedule, "status": "ok",
                     "tokens_per_s": round(gbs * seq / t, 1), "step_time_s": round(t, 6), "peak_mem_bytes": peak})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    best = max(rows, key=lambda r: r["tokens_per_s"] if r["peak_mem_bytes"] <= sc.cap_bytes else 0)
    say(f"{name}: {len(rows)} layouts of {space.name}, best fitting "
        f"EP{best['ep']}_TP{best['tp']}_PP{best['pp']}_DP{best['dp']} mb{best['micro_batch_size']} "
        f"{best['precision']} {best['recompute']} {best['schedule']} at {best['tokens_per_s']:,.0f} tokens/s -> {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe_simulator", description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), action="append", help="default: every family")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the tables (default benchmarks/results)")
    args = p.parse_args(argv)
    for name in args.family or sorted(FAMILIES):
        write_family(name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
