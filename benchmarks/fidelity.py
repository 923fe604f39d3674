"""Fidelity of short trials: do a few steps rank layouts the way a long run does?

A set of layouts of the quickstart space (search_spaces/quickstart-cpu.yaml; a seeded sample of
its fitting layouts, so pipelines, EP, TP, DP, both precisions and both recompute modes appear)
is run on real gloo ranks (`tests.launch.launch`, one thread per rank, the memory probe on as in
a trial):

* short runs: the quickstart budget (`budget.warmup_steps`, `budget.measure_steps`: 1 and 3),
  taken from the first steps of an independent run of 15 steps (a run's first steps are exactly a
  shorter run of the same seed: same data, same code path), which also gives every other short
  setting (warm-up w, measured m, w + m <= 15) for free; repeated in a second pass;
* long runs: 10x the quickstart's steps (10 warm-up, 30 measured), the reference ranking.

The passes run one after the other (short, long, short again), each in its own shuffled order,
so that the machine's load at one moment does not favour a layout in both rankings.

Kendall's tau-b between each short ranking and the long one; goal: tau >= 0.9 at the
quickstart setting. The table of tau by (warm-up, measured) says which short setting reaches
the goal; the split-half tau of the long runs (steps 10-24 against 25-39) shows the noise floor.

    python -m benchmarks.fidelity            # 12 layouts (~8 min on 2 cores, more under load)
    python -m benchmarks.fidelity --quick    # 3 layouts, few steps: checks the script works

Results: benchmarks/results/fidelity.{csv,json} (`fidelity_quick.*` with --quick).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, say, write_csv, write_json  # noqa: E402

QUICKSTART = ROOT / "search_spaces" / "quickstart-cpu.yaml"
GOAL_TAU = 0.9
LONG_FACTOR = 10
SWEEP_STEPS = 15
WARMUPS = (0, 1, 2, 3, 5)
MEASURES = (1, 2, 3, 4, 5, 8, 10)


def kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties in either ranking count as neither concordant nor discordant)."""
    n = len(x)
    conc = disc = tie_x = tie_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tie_x += 1
            elif dy == 0:
                tie_y += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + tie_x) * (conc + disc + tie_y)) ** 0.5
    return (conc - disc) / denom if denom else float("nan")


def pick_layouts(n: int, seed: int = 0, quick: bool = False):
    from autotune.candidates import screen
    from autotune.spec import load_spec

    spec = load_spec(QUICKSTART)
    fitting = [c.layout for c in screen(spec).candidates if c.fits]
    if quick:  # quicker layouts: the quick mode checks the script, not the figure
        fitting = [l for l in fitting if l.precision == "fp32" and l.pp == 1]
    return spec, sorted(random.Random(seed).sample(fitting, min(n, len(fitting))))


def _run(spec, layout, warmup: int, steps: int) -> list[float]:
    """Per-step wall times (slowest rank) of one run, warm-up included."""
    from autotune.results import run_config_for
    from tests.launch import launch

    cfg = run_config_for(spec, layout, timeout_s=600)
    from dataclasses import replace

    cfg = replace(cfg, warmup_steps=warmup, steps=steps)
    results = launch(cfg, timeout=600)
    per_rank = [r.step_times for r in results]
    return [max(ts[i] for ts in per_rank) for i in range(warmup + steps)]


def tokens_per_s(tokens: int, times: list[float]) -> float:
    return tokens / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 layouts, few steps")
    p.add_argument("--layouts", type=int, default=12, help="layouts to compare (default 12)")
    p.add_argument("--passes", type=int, default=2, help="independent short passes (default 2)")
    args = p.parse_args(argv)

    import tests.launch as launch_mod

    # Ranks fork from a server that already imported these, so a run starts in milliseconds.
    launch_mod._CTX.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed.pipelining",
                                            "torch.distributed.fsdp.sharded_grad_scaler", "trainables.moe.train",
                                            "tests.launch"])
    started = time.monotonic()
    spec, layouts = pick_layouts(3 if args.quick else args.layouts, quick=args.quick)
    w0, m0 = spec.budget.warmup_steps, spec.budget.measure_steps
    long_w, long_m = LONG_FACTOR * w0, LONG_FACTOR * m0
    sweep = 5 if args.quick else SWEEP_STEPS
    if args.quick:
        long_w, long_m = 2, 4
    passes = 1 if args.quick else args.passes
    tokens = spec.search.global_batch_size * spec.search.seq_len
    say(f"{len(layouts)} layouts of {QUICKSTART.name}; short: the first steps of {passes} pass(es) of {sweep}-step "
        f"runs (quickstart: {w0} warm-up + {m0} measured); long: {long_w} warm-up + {long_m} measured")

    short: list[dict[str, list[float]]] = []
    long: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}

    def timed(label: str, layout, warmup: int, steps: int) -> list[float]:
        t0 = time.monotonic()
        times = _run(spec, layout, warmup, steps)
        seconds[label] = seconds.get(label, 0.0) + time.monotonic() - t0
        say(f"  {label:<6} {layout.key:<40} {tokens_per_s(tokens, times[warmup:]):9.0f} tok/s "
            f"({time.monotonic() - t0:5.1f} s)")
        return times

    def short_pass(k: int) -> None:
        order = list(layouts)
        random.Random(100 + k).shuffle(order)
        short.append({l.key: timed(f"short{k + 1}", l, 0, sweep) for l in order})

    short_pass(0)
    order = list(layouts)
    random.Random(1).shuffle(order)
    for layout in order:
        long[layout.key] = timed("long", layout, long_w, long_m)
    for k in range(1, passes):
        short_pass(k)

    keys = [l.key for l in layouts]
    ref = [tokens_per_s(tokens, long[k][long_w:]) for k in keys]
    half = long_m // 2
    first = [tokens_per_s(tokens, long[k][long_w:long_w + half]) for k in keys]
    second = [tokens_per_s(tokens, long[k][long_w + half:]) for k in keys]
    split_half_tau = kendall_tau_b(first, second)

    settings: list[dict[str, Any]] = []
    for w in WARMUPS:
        for m in MEASURES:
            if w + m > sweep:
                continue
            taus = [kendall_tau_b([tokens_per_s(tokens, s[k][w:w + m]) for k in keys], ref) for s in short]
            settings.append({"warmup_steps": w, "measure_steps": m, "steps": w + m,
                             **{f"tau_pass{i + 1}": round(t, 4) for i, t in enumerate(taus)},
                             "tau_mean": round(statistics.fmean(taus), 4), "tau_min": round(min(taus), 4)})
    at_default = next((s for s in settings if s["warmup_steps"] == w0 and s["measure_steps"] == m0), None)
    reaching = sorted((s for s in settings if s["tau_min"] >= GOAL_TAU), key=lambda s: (s["steps"], s["warmup_steps"]))
    best = max(settings, key=lambda s: (s["tau_min"], -s["steps"]))

    rows = []
    for i, k in enumerate(keys):
        row = {"layout_key": k, "long_tokens_per_s": round(ref[i], 1),
               "long_first_half_tokens_per_s": round(first[i], 1), "long_second_half_tokens_per_s": round(second[i], 1)}
        for j, s in enumerate(short):
            row[f"short{j + 1}_tokens_per_s"] = round(tokens_per_s(tokens, s[k][w0:w0 + m0]), 1)
            row[f"short{j + 1}_step_times_s"] = " ".join(f"{t:.4f}" for t in s[k])
        row["long_step_times_s"] = " ".join(f"{t:.4f}" for t in long[k])
        rows.append(row)

    say("")
    say(f"{'layout':<40} {'long':>8} " + " ".join(f"{'short' + str(j + 1):>8}" for j in range(len(short))) + "  (tokens/s)")
    for r in sorted(rows, key=lambda r: -r["long_tokens_per_s"]):
        say(f"{r['layout_key']:<40} {r['long_tokens_per_s']:8.0f} "
            + " ".join(f"{r[f'short{j + 1}_tokens_per_s']:8.0f}" for j in range(len(short))))
    say("")
    say("Kendall tau-b against the long runs, by short setting (warm-up w, measured m): min over passes")
    say("  w\\m " + " ".join(f"{m:>6}" for m in MEASURES))
    for w in WARMUPS:
        cells = []
        for m in MEASURES:
            s = next((s for s in settings if s["warmup_steps"] == w and s["measure_steps"] == m), None)
            cells.append(f"{s['tau_min']:6.2f}" if s else "     -")
        say(f"  {w:>3} " + " ".join(cells))
    say(f"split-half tau of the long runs (noise floor): {split_half_tau:.3f}")
    tau0 = at_default["tau_min"] if at_default else float("nan")
    met = at_default is not None and tau0 >= GOAL_TAU
    say(f"quickstart setting (w={w0}, m={m0}): tau {', '.join(str(at_default[f'tau_pass{i + 1}']) for i in range(len(short))) if at_default else 'n/a'}"
        f"; goal tau >= {GOAL_TAU}: {'met' if met else 'NOT met'}" + ("  (--quick: 3 layouts, meaningless)" if args.quick else ""))
    if reaching:
        r = reaching[0]
        say(f"cheapest setting reaching tau >= {GOAL_TAU} in every pass: warm-up {r['warmup_steps']}, measured "
            f"{r['measure_steps']} (tau min {r['tau_min']:.2f})")
    else:
        say(f"no short setting up to {sweep} steps reaches tau >= {GOAL_TAU} in every pass; best: warm-up "
            f"{best['warmup_steps']}, measured {best['measure_steps']} (tau min {best['tau_min']:.2f})")
    suffix = "_quick" if args.quick else ""
    data = {"benchmark": "fidelity", "quick": args.quick, "machine": machine(), "space": str(QUICKSTART.relative_to(ROOT)),
            "layouts": keys, "quickstart_setting": {"warmup_steps": w0, "measure_steps": m0},
            "long_setting": {"warmup_steps": long_w, "measure_steps": long_m}, "short_run_steps": sweep,
            "passes": len(short), "tau_at_quickstart_setting": at_default, "goal_tau": GOAL_TAU, "goal_met": met,
            "split_half_tau_long": split_half_tau, "settings": settings,
            "cheapest_setting_reaching_goal": reaching[0] if reaching else None, "best_setting": best,
            "seconds_by_phase": {k: round(v, 1) for k, v in seconds.items()},
            "runtime_s": round(time.monotonic() - started, 1)}
    write_csv(RESULTS / f"fidelity{suffix}.csv", rows)
    write_json(RESULTS / f"fidelity{suffix}.json", data)
    say(f"wrote {RESULTS / f'fidelity{suffix}.csv'} and .json ({data['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
