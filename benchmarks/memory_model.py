"""How well the analytic memory model (`autotune/predict/memory.py`) predicts measured per-rank memory.

The grid: every layout of the tiny model with a world size up to 4 (the 15 valid EP/TP/PP/DP
combinations) runs on real gloo ranks for each precision (fp32; bf16 and fp16 under autocast;
bf16-params, bf16 parameters with fp32 main gradients), each activation
recompute mode (none, selective, full) and two micro-batch sizes (1 and 4), at seq_len 64, with
steps=1 and warmup_steps=1 (the trainable then tracks a third, probe step for the peak). Each
replica runs 2 micro-batches without pipelining and pp with it; the pipelined layouts also run
both schedules with pp + 1 micro-batches on a slice of the knobs (380 runs in all).

`--variants` runs model variants instead, on five layouts each: top-1 routing, dense layers
interleaved with MoE ones, a capacity factor of 1, and a 4096-token vocabulary that moves the
peak to the loss (40 runs). `--quick` runs 5 layouts: it checks that the script works, not the
figures.

For every run the worst rank's measured categories are compared with the prediction:

* parameters, gradients and optimizer states must match byte for byte on every rank;
* the total peak should be within 5% (median) and 10% (worst) of the measurement;
* activations and "other" are reported as errors relative to the measured peak.

Results go to benchmarks/results/memory_model.csv and memory_model.json (memory_model_variants.*
and memory_model_quick.* for the other modes). The exact commands, from the repository root
with the virtualenv active:

    python -m benchmarks.memory_model              # the grid
    python -m benchmarks.memory_model --variants   # the model variants
    python -m benchmarks.memory_model --quick      # a smoke test

Exit status 1 when a parameter/gradient/optimizer byte count differs or (grid and variants) the
total-peak goals are missed.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import preload_launch  # noqa: E402

preload_launch()

from autotune.predict.memory import predict, state_memory
from tests.launch import launch
from trainables.moe.config import PRECISIONS, RECOMPUTE_MODES, SCHEDULES, preset
from trainables.moe.run_config import RunConfig

RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN = 64
MICRO_BATCHES = (1, 4)
GOAL_MEDIAN, GOAL_WORST = 0.05, 0.10
CATEGORIES = ("params", "grads", "optimizer", "activations", "other")
VARIANTS: dict[str, dict[str, Any]] = {
    "top1": {"top_k": 1},
    "moe_every2": {"moe_every": 2},
    "capacity1": {"capacity_factor": 1.0},
    "vocab4k": {"vocab_size": 4096},
}


def layouts(max_world: int = 4) -> list[tuple[int, int, int, int]]:
    """(ep, tp, pp, dp) of every layout of the tiny model with world size <= max_world."""
    m = preset("tiny")
    out = []
    for ep, tp, pp, dp in itertools.product((1, 2, 4), repeat=4):
        if ep * tp * pp * dp > max_world:
            continue
        if m.n_experts % ep or m.n_heads % tp or m.ffn_hidden % tp or m.vocab_size % tp or m.n_layers % pp:
            continue
        out.append((ep, tp, pp, dp))
    return out


def config(ep: int, tp: int, pp: int, dp: int, mb: int, precision: str, recompute: str,
           schedule: str = "1f1b", overrides: dict[str, Any] | None = None, extra: int = 0) -> RunConfig:
    # Two micro-batches per replica without pipelining (gradient accumulation, and the effects
    # that only later micro-batches of a step show); with pipelining the pp that 1F1B needs,
    # plus `extra` so that 1F1B and GPipe keep different numbers in flight.
    accum = 2 if pp == 1 else pp + extra
    return RunConfig(model="tiny", model_overrides=dict(overrides or {}), ep=ep, tp=tp, pp=pp, dp=dp,
                     micro_batch_size=mb, global_batch_size=mb * dp * ep * accum, seq_len=SEQ_LEN,
                     precision=precision, recompute=recompute, schedule=schedule, steps=1, warmup_steps=1,
                     device="cpu")


def grid(mode: str = "grid") -> list[tuple[str, RunConfig]]:
    """The runs of a mode: "grid" (the layout grid), "variants" (model variants) or "quick"."""
    runs: list[tuple[str, RunConfig]] = []
    if mode == "quick":
        picks = [((1, 1, 1, 1), 4, "fp32", "none"), ((2, 2, 1, 1), 1, "bf16", "full"),
                 ((1, 1, 2, 2), 4, "fp16", "selective"), ((4, 1, 1, 1), 1, "bf16-params", "none")]
        for (ep, tp, pp, dp), mb, prec, rec in picks:
            runs.append(("tiny", config(ep, tp, pp, dp, mb, prec, rec)))
        runs.append(("moe_every2", config(1, 1, 4, 1, 1, "fp32", "none", "gpipe", VARIANTS["moe_every2"], 1)))
    elif mode == "variants":
        variant_layouts = [(1, 1, 1, 1), (2, 2, 1, 1), (4, 1, 1, 1), (1, 1, 2, 2), (1, 2, 2, 1)]
        for name, over in VARIANTS.items():
            for (ep, tp, pp, dp), (prec, rec) in itertools.product(variant_layouts,
                                                                  (("fp32", "none"), ("bf16", "full"))):
                runs.append((name, config(ep, tp, pp, dp, 2, prec, rec, overrides=over)))
    else:
        for (ep, tp, pp, dp), prec, rec, mb in itertools.product(layouts(), PRECISIONS, RECOMPUTE_MODES,
                                                                 MICRO_BATCHES):
            runs.append(("tiny", config(ep, tp, pp, dp, mb, prec, rec)))
        for (ep, tp, pp, dp) in layouts():
            if pp > 1:  # both schedules with one micro-batch more than stages, on a slice of the knobs
                for (prec, rec), schedule in itertools.product((("fp32", "none"), ("bf16", "full")), SCHEDULES):
                    runs.append(("tiny", config(ep, tp, pp, dp, 2, prec, rec, schedule, extra=1)))
    return runs


@dataclass
class Row:
    model: str
    layout: str
    ep: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    global_batch_size: int
    precision: str
    recompute: str
    schedule: str
    worst_rank: int
    pred_stage: int
    measured: dict[str, int] = field(default_factory=dict)
    predicted: dict[str, int] = field(default_factory=dict)
    state_mismatches: int = 0  # ranks whose params/grads/optimizer bytes differ from the closed form
    seconds: float = 0.0

    @property
    def total_error(self) -> float:
        return self.predicted["peak"] / self.measured["peak"] - 1

    def category_error(self, cat: str) -> float:
        """Signed error of one category as a fraction of the measured peak."""
        return (self.predicted[cat] - self.measured[cat]) / self.measured["peak"]

    def flat(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("measured", "predicted")}
        for cat in (*CATEGORIES, "peak"):
            d[f"meas_{cat}"] = self.measured[cat]
            d[f"pred_{cat}"] = self.predicted[cat]
        d["total_error"] = round(self.total_error, 5)
        for cat in ("activations", "other"):
            d[f"{cat}_error_of_peak"] = round(self.category_error(cat), 5)
        return d


def measure(name: str, cfg: RunConfig, tries: int = 3) -> Row:
    t0 = time.perf_counter()
    for attempt in range(tries):
        try:
            summary = launch(cfg, timeout=300)[0].summary
            break
        except RuntimeError:  # e.g. a port taken between picking it and binding it: run again
            if attempt == tries - 1:
                raise
    seconds = time.perf_counter() - t0
    model, dims, shape = cfg.model_config(), cfg.dims, cfg.shape
    mismatches = 0
    for r in summary["ranks"]:
        want = state_memory(model, dims, r["coords"][0], "cpu", shape.stage_layers, shape.precision)
        got = (r["mem_params_bytes"], r["mem_grads_bytes"], r["mem_optimizer_bytes"])
        mismatches += got != (want.params, want.grads, want.optimizer)
    worst = max(summary["ranks"], key=lambda r: r["peak_mem_bytes"])
    pred = predict(model, dims, shape, "cpu")
    measured = {c: worst[f"mem_{c}_bytes"] for c in CATEGORIES}
    measured["peak"] = worst["peak_mem_bytes"]
    predicted = {c: getattr(pred, c) for c in CATEGORIES}
    predicted["peak"] = pred.total
    return Row(model=name, layout=dims.name(), ep=cfg.ep, tp=cfg.tp, pp=cfg.pp, dp=cfg.dp,
               micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.global_batch_size,
               precision=cfg.precision, recompute=cfg.recompute, schedule=cfg.schedule,
               worst_rank=worst["rank"], pred_stage=pred.stage, measured=measured, predicted=predicted,
               state_mismatches=mismatches, seconds=round(seconds, 2))


def _rank_cpu_seconds() -> float | None:
    """CPU seconds of every rank launched so far (Linux: the fork server reaps them, so they add
    up in its children's times); None where that cannot be read."""
    try:
        from multiprocessing import forkserver

        pid = forkserver._forkserver._forkserver_pid
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[13:15]) / os.sysconf("SC_CLK_TCK")  # children's user + system
    except (AttributeError, OSError, ValueError, TypeError):
        return None


def _kb(n: int) -> str:
    return f"{n / 1024:8.0f}"


def print_row(i: int, n: int, r: Row) -> None:
    m, p = r.measured, r.predicted
    print(f"{i:>4}/{n} {r.model:<10} {r.layout:<16} mb{r.micro_batch_size} {r.precision:<4} {r.recompute:<9} "
          f"{r.schedule:<5} | peak {_kb(m['peak'])} {_kb(p['peak'])} {r.total_error * 100:+6.1f}% | "
          f"act {_kb(m['activations'])} {_kb(p['activations'])} | other {_kb(m['other'])} {_kb(p['other'])} "
          f"| {'exact' if not r.state_mismatches else 'MISMATCH'} {r.seconds:5.1f}s", flush=True)


def summarize(rows: list[Row]) -> dict[str, Any]:
    errs = [abs(r.total_error) for r in rows]
    out: dict[str, Any] = {
        "runs": len(rows),
        "state_mismatching_runs": sum(1 for r in rows if r.state_mismatches),
        "total_error_median": statistics.median(errs),
        "total_error_worst": max(errs),
        "total_error_mean_signed": statistics.fmean(r.total_error for r in rows),
        "worst_run": max(rows, key=lambda r: abs(r.total_error)).flat(),
    }
    for cat in ("activations", "other"):
        ce = [abs(r.category_error(cat)) for r in rows]
        out[f"{cat}_error_of_peak_median"] = statistics.median(ce)
        out[f"{cat}_error_of_peak_worst"] = max(ce)
        rel = [abs(r.predicted[cat] / r.measured[cat] - 1) for r in rows if r.measured[cat] > 0]
        out[f"{cat}_error_relative_median"] = statistics.median(rel) if rel else 0.0
    by: dict[str, list[float]] = {}
    for r in rows:
        for key in (f"model={r.model}", f"precision={r.precision}", f"recompute={r.recompute}",
                    f"pp={r.pp}", f"schedule={r.schedule}"):
            by.setdefault(key, []).append(abs(r.total_error))
    out["total_error_by"] = {k: {"median": statistics.median(v), "worst": max(v), "runs": len(v)}
                             for k, v in sorted(by.items())}
    out["goals"] = {"total_error_median": GOAL_MEDIAN, "total_error_worst": GOAL_WORST}
    out["goals_met"] = (out["total_error_median"] <= GOAL_MEDIAN and out["total_error_worst"] <= GOAL_WORST
                        and out["state_mismatching_runs"] == 0)
    return out


def write(rows: list[Row], summary: dict[str, Any], out_dir: Path, stem: str, meta: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = [r.flat() for r in rows]
    with open(out_dir / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    with open(out_dir / f"{stem}.json", "w") as fh:
        json.dump({**meta, "summary": summary, "rows": flat}, fh, indent=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_model", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a handful of layouts (< 2 minutes): checks the script")
    mode.add_argument("--variants", action="store_true",
                      help="model variants (top-1, interleaved dense layers, capacity factor, large vocabulary)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--jobs", type=int, default=2,
                    help="runs launched at once (each is a few processes that mostly wait on each other)")
    args = ap.parse_args(argv)

    mode = "quick" if args.quick else "variants" if args.variants else "grid"
    runs = grid(mode)
    stem = {"quick": "memory_model_quick", "variants": "memory_model_variants", "grid": "memory_model"}[mode]
    print(f"{len(runs)} runs, seq_len {SEQ_LEN}; columns: measured KiB, predicted KiB", flush=True)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    done = 0

    def one(run: tuple[str, RunConfig]) -> Row:
        nonlocal done
        row = measure(*run)
        done += 1
        print_row(done, len(runs), row)
        return row

    # Measurements do not depend on timing (the tracker counts bytes), so runs may overlap.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(one, runs))
    elapsed = time.perf_counter() - t0
    cpu = _rank_cpu_seconds()
    summary = summarize(rows)
    summary["elapsed_s"] = round(elapsed, 1)
    summary["rank_cpu_s"] = None if cpu is None else round(cpu, 1)
    summary["load_average_start_end"] = [round(load_start, 1), round(os.getloadavg()[0], 1)]
    meta = {"command": "python -m benchmarks.memory_model" + {"quick": " --quick", "variants": " --variants",
                                                              "grid": ""}[mode],
            "jobs": args.jobs, "elapsed_s": round(elapsed, 1), "seq_len": SEQ_LEN,
            "micro_batch_sizes": list(MICRO_BATCHES), "device": "cpu"}
    write(rows, summary, args.out_dir, stem, meta)

    print()
    print(f"runs: {summary['runs']} in {elapsed:.0f} s (load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end" + ("" if cpu is None else
          f"; the ranks used {cpu:.0f} CPU seconds, {cpu / max(1, os.cpu_count() or 1):.0f} s of this "
          f"machine's {os.cpu_count()} cores") + ")")
    print(f"params/grads/optimizer: {summary['state_mismatching_runs']} runs with a byte mismatch "
          f"(every rank compared)")
    print(f"total peak error: median {summary['total_error_median'] * 100:.2f}%, "
          f"worst {summary['total_error_worst'] * 100:.2f}% "
          f"(goal {GOAL_MEDIAN * 100:.0f}% / {GOAL_WORST * 100:.0f}%)")
    for cat in ("activations", "other"):
        print(f"{cat}: error as a share of the peak median {summary[f'{cat}_error_of_peak_median'] * 100:.2f}%, "
              f"worst {summary[f'{cat}_error_of_peak_worst'] * 100:.2f}%; relative to the category median "
              f"{summary[f'{cat}_error_relative_median'] * 100:.1f}%")
    w = summary["worst_run"]
    print(f"worst run: {w['model']} {w['layout']} mb{w['micro_batch_size']} {w['precision']} {w['recompute']} "
          f"{w['schedule']}: {w['total_error'] * 100:+.2f}%")
    for key, v in summary["total_error_by"].items():
        print(f"  {key:<20} median {v['median'] * 100:5.2f}%  worst {v['worst'] * 100:5.2f}%  ({v['runs']} runs)")
    print(f"wrote {args.out_dir / (stem + '.csv')} and {args.out_dir / (stem + '.json')}")
    if summary["state_mismatching_runs"]:
        return 1
    if not args.quick and not summary["goals_met"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
