"""Gradient reduction during backward (bucketed) against one flat all-reduce after it.

The trainable's `--grad-sync bucketed` (the default) all-reduces gradient buckets while
backward still runs and copies nothing; `--grad-sync flat` (the former path, the baseline)
copies every gradient into a new flat buffer after backward and all-reduces that. This runs
both on DP2 (dense and expert gradients over 2 ranks) and EP2 (dense gradients over 2 ranks,
experts split) in one run, on real gloo ranks, and reports the median step time and the
measured peak memory of the worst rank, with the ratio bucketed / flat.

Settings, fixed before measuring: the tiny preset widened to d_model 128, expert and dense
hidden 256, vocabulary 2048 (3.8 M parameters, 15 MB of fp32 gradients per rank on DP2),
micro-batch 4 of 64 tokens, 2 micro-batches per replica, 2 warm-up and 6 measured steps,
buckets of 4 MiB (about 4 buckets; DDP's 25 MiB default would make one bucket of this model
and nothing to overlap). The two modes alternate launch by launch, over 5 rounds (a first
3-round run on the loaded shared machine was too noisy to read), so that machine drift hits
both alike; a layout's step time is the median over its rounds' medians.

At those settings the peak of a step is in backward, where the flat copy does not exist yet.
So the memory effect is measured on a second case too, the one of `tests/autotune/predict/test_memory.py`
whose peak is the flat all-reduce: DP2, the tiny model, micro-batch 1, full recompute (memory
is deterministic: one run per mode).

    python -m benchmarks.grad_overlap            # the figures (benchmarks/results/grad_overlap.*)
    python -m benchmarks.grad_overlap --quick    # a smoke test: the tiny model, one round

On a CPU the ranks' compute and gloo's communication threads share the same cores, so the
overlap buys less time than on GPUs with their own network engines; the memory saving (no flat
copy of the gradients) is the same on any device.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from benchmarks.common import RESULTS, ensure_path, machine, say, write_csv, write_json

ensure_path()

from tests.launch import launch  # noqa: E402
from trainables.moe.run_config import RunConfig  # noqa: E402

MODEL = {"d_model": 128, "ffn_hidden": 256, "dense_ffn_hidden": 256, "vocab_size": 2048}
LAYOUTS = {"DP2": dict(dp=2), "EP2": dict(ep=2)}
MODES = ("flat", "bucketed")
# Where the flat all-reduce is the peak of the step (tests/autotune/predict/test_memory.py).
MEMORY_CASE = RunConfig(model="tiny", dp=2, micro_batch_size=1, global_batch_size=4, seq_len=32,
                        recompute="full", steps=1, warmup_steps=1, device="cpu")


def _summary(cfg: RunConfig) -> dict:
    """Rank 0's summary; one retry, because on a shared machine the free port picked for the
    ranks can be taken by someone else before they bind it."""
    try:
        return launch(cfg)[0].summary
    except RuntimeError:
        return launch(cfg)[0].summary


def base(quick: bool) -> RunConfig:
    if quick:
        return RunConfig(model="tiny", micro_batch_size=2, global_batch_size=8, seq_len=32, steps=2,
                         warmup_steps=1, device="cpu", bucket_mb=0.1)
    return RunConfig(model="tiny", model_overrides=MODEL, micro_batch_size=4, global_batch_size=16, seq_len=64,
                     steps=6, warmup_steps=2, device="cpu", bucket_mb=4.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, one round: checks the script works")
    ns = ap.parse_args(argv)
    rounds = 1 if ns.quick else 5
    cfg0 = base(ns.quick)
    rows = []
    t0 = time.perf_counter()
    for r in range(rounds):
        for layout, dims in LAYOUTS.items():
            # Alternate which mode goes first, round by round.
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                cfg = replace(cfg0, grad_sync=mode, **dims)
                s = _summary(cfg)
                rows.append({"round": r, "layout": layout, "grad_sync": mode, "step_time_s": s["step_time_s"],
                             "step_time_p90_s": s["step_time_p90_s"], "peak_mem_bytes": s["peak_mem_bytes"],
                             "mem_grads_bytes": s["mem_grads_bytes"], "tokens_per_s": s["tokens_per_s"]})
                say(f"round {r} {layout:<4} {mode:<9} step {s['step_time_s'] * 1e3:8.1f} ms  "
                    f"peak {s['peak_mem_bytes'] / 1e6:7.2f} MB")
    summary = {}
    for layout in LAYOUTS:
        per = {}
        for mode in MODES:
            mine = [x for x in rows if x["layout"] == layout and x["grad_sync"] == mode]
            per[mode] = {"step_time_s": statistics.median(x["step_time_s"] for x in mine),
                         "peak_mem_bytes": max(x["peak_mem_bytes"] for x in mine),
                         "mem_grads_bytes": mine[0]["mem_grads_bytes"]}
        per["step_time_ratio"] = per["bucketed"]["step_time_s"] / per["flat"]["step_time_s"]
        per["peak_mem_ratio"] = per["bucketed"]["peak_mem_bytes"] / per["flat"]["peak_mem_bytes"]
        summary[layout] = per
        say(f"{layout}: step time flat {per['flat']['step_time_s'] * 1e3:.1f} ms -> bucketed "
            f"{per['bucketed']['step_time_s'] * 1e3:.1f} ms (x{per['step_time_ratio']:.3f}); peak "
            f"{per['flat']['peak_mem_bytes'] / 1e6:.2f} MB -> {per['bucketed']['peak_mem_bytes'] / 1e6:.2f} MB "
            f"(x{per['peak_mem_ratio']:.3f})")
    memory_case = {}
    for mode in MODES:
        s = _summary(replace(MEMORY_CASE, grad_sync=mode))
        memory_case[mode] = s["peak_mem_bytes"]
    memory_case["peak_mem_ratio"] = memory_case["bucketed"] / memory_case["flat"]
    say(f"DP2 tiny mb1 full recompute: peak {memory_case['flat'] / 1e6:.3f} MB -> "
        f"{memory_case['bucketed'] / 1e6:.3f} MB (x{memory_case['peak_mem_ratio']:.3f})")
    name = "grad_overlap_quick" if ns.quick else "grad_overlap"
    write_csv(RESULTS / f"{name}.csv", rows)
    write_json(RESULTS / f"{name}.json", {
        "command": "python -m benchmarks.grad_overlap" + (" --quick" if ns.quick else ""), "quick": ns.quick,
        "rounds": rounds, "config": {k: getattr(cfg0, k) for k in (
            "model", "model_overrides", "micro_batch_size", "global_batch_size", "seq_len", "steps",
            "warmup_steps", "bucket_mb")},
        "elapsed_s": round(time.perf_counter() - t0, 1), "machine": machine(), "layouts": summary,
        "memory_case": {"config": "DP2 tiny mb1 gbs4 seq32 fp32 full recompute", **memory_case}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
