"""A stand-in training program to tune through `trainables.command` (standard library only).

It takes a layout on its command line the way Megatron-LM or torchtitan would, does one rank's
share of the arithmetic of a small MoE feed-forward stack for each step, and reports its speed
through both channels of the metrics contract: text lines on stdout always, and JSON lines in
`--metrics-file` when given. Tune it with a command template such as

    ["python", "-m", "trainables.examples.toy_train", "--ep", "{ep}", "--tp", "{tp}", "--pp", "{pp}",
     "--dp", "{dp}", "--micro-batch-size", "{micro_batch_size}", "--global-batch-size",
     "{global_batch_size}", "--seq-len", "{seq_len}", "--precision", "{precision}",
     "--recompute", "{recompute}", "--metrics-file", "{metrics_file}"]

What is real and what is modelled, per step of the rank:

* real: the matrix products of `layers / pp` layers (tokens x hidden times hidden x ffn/tp,
  backward twice the forward) for each of the `global_batch / (micro_batch * dp * ep)`
  micro-batches this rank runs, plus the recomputed forward (`full`) or its smaller part
  (`selective`); a linear model fitted by SGD gives the loss. Bigger micro-batches amortise the
  per-product overhead, more tp/pp/dp/ep divides the work, exactly as on a real rank.
* modelled: communication, as a sleep of latency + bytes / bandwidth for the collectives the
  layout needs (tp all-reduces, ep all-to-alls, pp sends, the gradient all-reduce), with half
  the bytes in bf16/fp16, and the 1F1B pipeline bubble ((pp - 1) / micro-batches of the compute).
  Pure Python arithmetic does not get faster in half precision, so precision changes bytes only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import time

HIDDEN = 16
FFN = 32
LAYERS = 4
EXPERTS = 8
TOKENS_PER_ROW = 16  # one matrix row stands for this many tokens, to keep pure Python quick
LATENCY_S = 50e-6
BANDWIDTH_BPS = 200e6


def matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    cols = list(zip(*b))
    return [[sum(x * y for x, y in zip(row, col)) for col in cols] for row in a]


def comm_seconds(nbytes: float, count: int = 1) -> float:
    return count * LATENCY_S + nbytes / BANDWIDTH_BPS


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainables.examples.toy_train",
                                description="A stand-in training program for autotune's command trainable.")
    for name, default in (("ep", 1), ("tp", 1), ("pp", 1), ("dp", 1), ("micro-batch-size", 1),
                          ("global-batch-size", 8), ("seq-len", 64), ("steps", 5), ("warmup-steps", 1),
                          ("seed", 0)):
        p.add_argument("--" + name, type=int, default=default)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    p.add_argument("--metrics-file", default=None, help="also write JSON lines here (step lines, then a summary)")
    p.add_argument("--require-env", default=None, metavar="NAME",
                   help="fail unless this environment variable is set (as a program that needs a token would)")
    return p.parse_args(argv)


def check(ns: argparse.Namespace) -> str | None:
    if ns.require_env and not os.environ.get(ns.require_env):
        return f"environment variable {ns.require_env} is not set"
    for name in ("ep", "tp", "pp", "dp", "micro_batch_size", "global_batch_size", "seq_len", "steps"):
        if getattr(ns, name) < 1:
            return f"--{name.replace('_', '-')} must be 1 or more"
    if EXPERTS % ns.ep:
        return f"experts ({EXPERTS}) must be divisible by ep ({ns.ep})"
    if FFN % ns.tp or HIDDEN % ns.tp:
        return f"ffn ({FFN}) and hidden ({HIDDEN}) must be divisible by tp ({ns.tp})"
    if LAYERS % ns.pp:
        return f"layers ({LAYERS}) must be divisible by pp ({ns.pp})"
    per = ns.micro_batch_size * ns.dp * ns.ep
    if ns.global_batch_size % per:
        return (f"global batch ({ns.global_batch_size}) must be divisible by micro_batch*dp*ep "
                f"({ns.micro_batch_size}*{ns.dp}*{ns.ep} = {per})")
    return None


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    problem = check(ns)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    rng = random.Random(ns.seed)
    accum = ns.global_batch_size // (ns.micro_batch_size * ns.dp * ns.ep)
    rows = max(1, ns.micro_batch_size * ns.seq_len // TOKENS_PER_ROW)
    layers = LAYERS // ns.pp
    shard = FFN // ns.tp
    weights = [[[rng.gauss(0, 0.1) for _ in range(shard)] for _ in range(HIDDEN)] for _ in range(layers)]
    back = [[[rng.gauss(0, 0.1) for _ in range(HIDDEN)] for _ in range(shard)] for _ in range(layers)]
    attn = [[rng.gauss(0, 0.1) for _ in range(HIDDEN // ns.tp)] for _ in range(HIDDEN)]
    w_true = [rng.gauss(0, 1) for _ in range(HIDDEN)]
    w = [0.0] * HIDDEN
    lr = 0.05
    elem = 4 if ns.precision == "fp32" else 2
    act_bytes = rows * TOKENS_PER_ROW * HIDDEN * elem
    params = layers * 2 * HIDDEN * shard
    extra_forwards = 1 if ns.recompute == "full" else 0

    def forward(x: list[list[float]]) -> None:
        for layer in range(layers):
            matmul(matmul(x, weights[layer]), back[layer])

    metrics = open(ns.metrics_file, "w") if ns.metrics_file else None
    tokens_per_step = ns.global_batch_size * ns.seq_len
    print(f"toy_train: EP{ns.ep}_TP{ns.tp}_PP{ns.pp}_DP{ns.dp} mb{ns.micro_batch_size} {ns.precision} "
          f"{ns.recompute}: {accum} micro-batches of {rows} rows per step", flush=True)
    times: list[float] = []
    losses: list[float] = []
    for step in range(ns.warmup_steps + ns.steps):
        t0 = time.perf_counter()
        grad = [0.0] * HIDDEN
        loss = 0.0
        comm = 0.0
        for _ in range(accum):
            x = [[rng.gauss(0, 1) for _ in range(HIDDEN)] for _ in range(rows)]
            forward(x)
            if ns.recompute == "selective":
                matmul(x, attn)
            for _ in range(2 + extra_forwards):  # backward ~ two forwards, plus a recomputed one
                forward(x)
            for row in x:
                err = sum(a * (b - c) for a, b, c in zip(row, w, w_true))
                loss += err * err / (rows * accum)
                for i, a in enumerate(row):
                    grad[i] += 2 * err * a / (rows * accum)
            if ns.tp > 1:  # two all-reduces per layer, forward and backward
                comm += comm_seconds(4 * layers * act_bytes * 2 * (ns.tp - 1) / ns.tp, 4 * layers)
            if ns.ep > 1:  # dispatch and combine all-to-alls per layer, forward and backward
                comm += comm_seconds(4 * layers * act_bytes * (ns.ep - 1) / ns.ep, 4 * layers)
            if ns.pp > 1:  # activations forward, gradients back
                comm += comm_seconds(2 * act_bytes, 2)
        compute = time.perf_counter() - t0
        if ns.pp > 1:  # 1F1B and GPipe idle alike; they differ in memory, which is not modelled here
            comm += compute * (ns.pp - 1) / accum
        if ns.dp * ns.ep > 1:
            n = ns.dp * ns.ep
            comm += comm_seconds(params * 4 * 2 * (n - 1) / n)
        time.sleep(comm)
        w = [a - lr * g for a, g in zip(w, grad)]
        dt = time.perf_counter() - t0
        phase = "warmup" if step < ns.warmup_steps else "measure"
        losses.append(loss)
        if phase == "measure":
            times.append(dt)
        print(f"step {step} {phase} | loss {loss:.6f} | step time {dt:.6f} s | {tokens_per_step / dt:.1f} tokens/s",
              flush=True)
        if metrics:
            metrics.write(json.dumps({"type": "step", "step": step, "phase": phase, "loss": loss,
                                      "step_time_s": dt, "tokens_per_s": tokens_per_step / dt}) + "\n")
            metrics.flush()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    median = statistics.median(times)
    ordered = sorted(times)
    k = (len(ordered) - 1) * 0.9
    p90 = ordered[math.floor(k)] + (ordered[math.ceil(k)] - ordered[math.floor(k)]) * (k - math.floor(k))
    print(f"done: median step time {median:.6f} s, peak memory {peak} bytes", flush=True)
    if metrics:
        metrics.write(json.dumps({
            "type": "summary", "tokens_per_s": tokens_per_step / median, "step_time_s": median,
            "step_time_p90_s": p90, "samples_per_s": ns.global_batch_size / median,
            "loss_first": losses[0], "loss_last": losses[-1], "peak_mem_bytes": peak}) + "\n")
        metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
