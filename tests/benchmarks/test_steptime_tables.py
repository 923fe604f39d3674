"""The step-time benchmark's diagnosis of a fixed cost per layer and micro-batch: two rows of one
layout at two micro-batch sizes, split into a fixed and a per-sequence part. Cheap: no Ray."""

from __future__ import annotations

from benchmarks.steptime_tables import _layouts, fixed_costs, raw_terms
from autotune.space import devices
from autotune.predict.steptime import Topology, prior_weights
from trainables.moe.config import ModelConfig

MODEL = ModelConfig(vocab_size=1024, d_model=256, n_layers=8, n_heads=4, ffn_hidden=512, n_experts=8, top_k=2,
                    max_seq_len=512)
GBS, SEQ = 64, 512


def _row(ep: int, tp: int, pp: int, dp: int, mb: int, step_s: float) -> dict[str, str]:
    return {"ep": str(ep), "tp": str(tp), "pp": str(pp), "dp": str(dp), "micro_batch_size": str(mb),
            "precision": "bf16", "recompute": "none", "schedule": "1f1b", "status": "ok",
            "tokens_per_s": str(GBS * SEQ / step_s)}


def test_two_micro_batch_sizes_of_one_layout_give_back_the_fixed_and_the_per_sequence_cost():
    fixed, per_seq = 0.004, 0.0015  # seconds per layer and micro-batch, per layer and sequence
    rows = []
    for ep, pp, mb in ((2, 2, 4), (2, 2, 1), (4, 1, 2)):  # the last layout has one size only: no split
        slots = (GBS // (mb * ep) + pp - 1) * MODEL.n_layers / pp  # micro-batches and bubble, layers per stage
        rows.append(_row(ep, 1, pp, 1, mb, slots * (fixed + per_seq * mb)))
    table = {"rows": rows, "model": MODEL, "gbs": GBS, "seq": SEQ}
    raw, _ = raw_terms(MODEL, _layouts(rows), GBS, SEQ, devices.get("H100-SXM"), Topology(8))
    (got,) = fixed_costs(table, raw)
    assert got["micro_batch_sizes"] == [1, 4] and got["layout"] == "EP2_TP1_PP2_DP1"
    assert abs(got["fixed_ms_per_layer_micro_batch"] - 4.0) < 1e-3
    assert abs(got["ms_per_layer_sequence"] - 1.5) < 1e-3
    # The model's own predictions split the same way: its launches are part of its fixed cost.
    assert 0 < got["model_overhead_ms_per_layer_micro_batch"] < got["model_fixed_ms_per_layer_micro_batch"]
    predicted = raw @ prior_weights()
    mb = [int(r["micro_batch_size"]) for r in rows[:2]]
    for n in range(2):  # the split gives the model's two step times back
        slots = (GBS // (mb[n] * 2) + 1) * MODEL.n_layers / 2
        back = slots * (got["model_fixed_ms_per_layer_micro_batch"] + got["model_ms_per_layer_sequence"] * mb[n]) / 1e3
        rounding = slots * 0.0005 * (1 + mb[n]) / 1e3  # both figures are given to 0.001 ms
        assert abs(back - predicted[n]) <= rounding < 0.05 * predicted[n]
