"""The seed space's opening: the first ten layouts a new study measures, with their predicted terms.

`search_spaces/seed-16x80gb.yaml` (64 experts, ~14B parameters, 2 nodes x 8 GPUs of 80 GB) cannot
run here; what can be checked is what the searcher would launch first. Printed: the ten layouts
of the opening (`autotune.search.searcher.opening`: the fastest predicted fitting layout of each
(ep, tp, pp) family) with each predicted term in ms, the pipeline bubble and predicted tokens/s;
beside them, in the same run, the first ten of the rules-of-thumb frontier order the searcher used
before (`autotune.search.searcher.frontier`: fast precision, least model parallelism, largest
micro-batch, most ranks, least recompute, then the layout's name), by the same model.

Check (issue 13): no layout of the opening has a predicted bubble over 30% while a fitting layout
with less bubble is predicted faster.

    python -m benchmarks.seed_opening            # ~2 s
    python -m benchmarks.seed_opening --quick    # the same; results as _quick

Results: benchmarks/results/seed_opening.{csv,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from autotune.predict.candidates import screen  # noqa: E402
from autotune.predict.speedmodel import SpeedModel  # noqa: E402
from autotune.predict.steptime import SHORT_NAMES, TERMS  # noqa: E402
from autotune.search.searcher import MAX_OPENING_BUBBLE, frontier, opening  # noqa: E402
from autotune.space.spec import load_spec  # noqa: E402
from benchmarks.common import RESULTS, machine, say, write_csv, write_json  # noqa: E402

SPACE = ROOT / "search_spaces" / "seed-16x80gb.yaml"



def _rows(kind: str, layouts, speed: SpeedModel) -> list[dict]:
    t = speed.predict(layouts)
    out = []
    for i, lay in enumerate(layouts):
        r = t.row(i)
        out.append({"order": kind, "rank": i + 1, "layout": lay.key, **{t_: round(r[t_] * 1e3, 2) for t_ in TERMS},
                    "bubble_ms": round(r["bubble"] * 1e3, 2), "bubble_frac": round(float(t.bubble_frac[i]), 3),
                    "pred_step_time_ms": round(r["pred_step_time_s"] * 1e3, 2),
                    "pred_tokens_per_s": round(r["pred_tokens_per_s"])})
    return out


def _show(rows: list[dict]) -> None:
    say(f"  {'#':>2} {'layout':<40} " + " ".join(f"{SHORT_NAMES[t]:>7}" for t in TERMS)
        + f" {'bubble':>7} {'step ms':>8} {'pred tok/s':>10}")
    for r in rows:
        say(f"  {r['rank']:>2} {r['layout']:<40} " + " ".join(f"{r[t]:>7.1f}" for t in TERMS)
            + f" {r['bubble_frac']:>7.0%} {r['pred_step_time_ms']:>8.1f} {r['pred_tokens_per_s']:>10,}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.seed_opening", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the same run; results as _quick")
    args = p.parse_args(argv)
    started = time.monotonic()
    spec = load_spec(SPACE)
    sc = screen(spec)
    speed = SpeedModel.of(spec)
    first = opening(spec, sc, speed, 10)
    before = frontier(spec, sc)[:10]
    mine, old = _rows("opening", first, speed), _rows("rules_of_thumb", before, speed)
    say(f"seed space: {sum(c.fits for c in sc.candidates)} fitting layouts of {len(sc.candidates)}; "
        f"model {speed.profile.name}, uncalibrated (terms in ms per step)")
    say("the opening (fastest predicted layout of each (ep, tp, pp) family):")
    _show(mine)
    say("baseline, same model: the previous rules-of-thumb frontier order:")
    _show(old)
    fitting = [c.layout for c in sc.candidates if c.fits]
    every = speed.predict(fitting)
    violations = []
    for r in mine:
        if r["bubble_frac"] > MAX_OPENING_BUBBLE:
            faster = every.step_time_s < r["pred_step_time_ms"] / 1e3
            if (faster & (every.bubble_frac < r["bubble_frac"])).any():
                violations.append(r["layout"])
    ratio = mine[0]["pred_tokens_per_s"] / old[0]["pred_tokens_per_s"]
    say(f"first proposal predicted {mine[0]['pred_tokens_per_s']:,} tokens/s against the rules of thumb's "
        f"{old[0]['pred_tokens_per_s']:,} ({ratio:.2f}x); opening layouts with EP > 1: "
        f"{sum(1 for x in first if x.ep > 1)} of {len(first)} (rules of thumb: {sum(1 for x in before if x.ep > 1)})")
    say(f"check: no opening layout with predicted bubble > {MAX_OPENING_BUBBLE:.0%} while a fitting layout with "
        f"less bubble is predicted faster: {'met' if not violations else 'NOT met: ' + ', '.join(violations)}")
    suffix = "_quick" if args.quick else ""
    write_csv(RESULTS / f"seed_opening{suffix}.csv", mine + old)
    write_json(RESULTS / f"seed_opening{suffix}.json",
               {"benchmark": "seed_opening", "quick": args.quick, "machine": machine(), "space": str(SPACE.relative_to(ROOT)),
                "profile": speed.profile.name, "opening": mine, "rules_of_thumb": old,
                "first_ratio_vs_rules_of_thumb": ratio, "bubble_check_met": not violations, "violations": violations,
                "runtime_s": round(time.monotonic() - started, 2)})
    return 0 if not violations else 1


if __name__ == "__main__":
    sys.exit(main())
