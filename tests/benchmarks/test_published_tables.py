"""Every published table under benchmarks/data is complete and self-consistent.

A table's CSV holds the documented columns, its YAML names the source, the layout mapping and
what the step-time model needs; every row's layout fills the same cluster, and the recorded
tokens/s is the step time converted with the YAML's batch and sequence length. Cheap: no Ray.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from autotune.space import devices
from trainables.moe.config import ModelConfig

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
COLUMNS = ["ep", "tp", "pp", "dp", "micro_batch_size", "precision", "recompute", "schedule", "status",
           "tokens_per_s", "peak_mem_bytes", "step_time_s", "source_row"]
TABLES = sorted(DATA.glob("*.yaml"))


def test_at_least_three_published_tables():
    assert len(TABLES) >= 3, [p.name for p in TABLES]


@pytest.mark.parametrize("meta_path", TABLES, ids=[p.stem for p in TABLES])
def test_table_is_complete(meta_path: Path):
    meta = yaml.safe_load(meta_path.read_text())
    for key in ("source", "mapping", "model", "global_batch_size", "seq_len", "profile", "ranks_per_node"):
        assert meta.get(key), f"{meta_path.name}: {key} missing"
    ModelConfig(**meta["model"])
    devices.resolve(meta["profile"], "cuda")
    with meta_path.with_suffix(".csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 4 and all(r["status"] in ("ok", "oom") for r in rows)
    worlds = {int(r["ep"]) * int(r["tp"]) * int(r["pp"]) * int(r["dp"]) for r in rows}
    assert len(worlds) == 1, f"{meta_path.name}: layouts of different cluster sizes {worlds}"
    keys = [tuple(r[c] for c in COLUMNS[:8]) for r in rows]
    assert len(keys) == len(set(keys)), f"{meta_path.name}: a layout appears twice"
    tokens = meta["global_batch_size"] * meta["seq_len"]
    for r in ok:
        assert r["source_row"]
        assert float(r["tokens_per_s"]) == pytest.approx(tokens / float(r["step_time_s"]), rel=1e-3)
