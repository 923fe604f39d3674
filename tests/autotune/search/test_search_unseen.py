"""A table the searcher has never seen, whose optimum is not the model's uncalibrated pick, is
still found within the space's own budget: calibration on the first measurements steers it."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from autotune.space import devices
from autotune.predict.candidates import INVALID, screen
from autotune.predict.speedmodel import SpeedModel
from autotune.predict.steptime import Topology, predict, prior_weights
from autotune.space.spec import load_spec
from benchmarks import search_efficiency as se
from benchmarks.replay import load_table, replay_layout_searcher

ROOT = Path(__file__).resolve().parents[3]
SPACE = ROOT / "search_spaces" / "seed-16x80gb.yaml"
# Another world than the model's default H100 profile: A100s on a 100 Gb/s network, expert
# all-to-all 5x, per-kernel and per-collective overheads 4x dearer than the defaults, tensor-parallel
# all-reduces and gradient reduction cheaper, and +-5% noise on every layout.
TRUTH = np.array([1.0, 1.0, 0.5, 5.0, 1.0, 0.3, 1.0, 4.0, 4.0, 1.0])


def _table(tmp_path: Path) -> tuple[Path, str]:
    spec = load_spec(SPACE)
    sc = screen(spec)
    valid = [c for c in sc.candidates if c.verdict != INVALID]
    profile = replace(devices.get("A100-80GB"), inter_node_gb_s=12.5)
    t = predict(spec.model.config(), [c.layout for c in valid], spec.search.global_batch_size, spec.search.seq_len,
                profile, Topology(8), prior_weights() * TRUTH)
    tps = t.tokens_per_s * np.random.default_rng(7).uniform(0.95, 1.05, len(valid))
    path = tmp_path / "unseen.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ep", "tp", "pp", "dp", "micro_batch_size", "precision", "recompute", "schedule", "status",
                    "tokens_per_s", "peak_mem_bytes"])
        for c, v in zip(valid, tps):
            lay = c.layout
            w.writerow([lay.ep, lay.tp, lay.pp, lay.dp, lay.micro_batch_size, lay.precision, lay.recompute,
                        lay.schedule, "ok", round(float(v), 1), c.prediction.total])
    default_pick = SpeedModel.of(spec).predict([c.layout for c in sc.candidates if c.fits])
    fitting = [c.layout for c in sc.candidates if c.fits]
    return path, fitting[int(np.argmax(default_pick.tokens_per_s))].key


def test_an_unseen_table_with_another_optimum_is_found_within_budget(tmp_path):
    se._quiet()
    path, model_pick = _table(tmp_path)
    spec = load_spec(SPACE)
    table = load_table(path, screen(spec).cap_bytes, spec.search.global_batch_size * spec.search.seq_len)
    assert model_pick not in table.good  # the uncalibrated model would open on the wrong layout
    data = yaml.safe_load(SPACE.read_text())
    for seed in (0, 1):
        run = replay_layout_searcher(data, table, seed)
        found = run.found_at(table)
        assert found is not None and found <= spec.budget.trials, (seed, run.keys[:found or 40])
