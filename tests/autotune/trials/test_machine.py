"""The machine measured: a CPU's matmul rate over a space's own shapes, and its copy bandwidth."""

from __future__ import annotations

from pathlib import Path

import yaml

from autotune.space.spec import spec_from_data
from autotune.trials.machine import cpu_matmul_shapes, measure_cpu

ROOT = Path(__file__).resolve().parents[3]


def test_cpu_measurement_fills_the_profile():
    p = measure_cpu(seconds=0.15)
    assert 1e-4 < p.peak_tflops["fp32"] < 10 and 0.1 < p.hbm_gb_s < 1000
    assert "measured" in p.sources


def test_cpu_rate_is_measured_over_the_step_s_matmul_mix():
    spec = spec_from_data(yaml.safe_load((ROOT / "search_spaces" / "quickstart-cpu.yaml").read_text()))
    # micro-batches 2 and 8 of 64 tokens, width 64, FFN 128; experts get top_k 2 of 8 of the tokens
    assert cpu_matmul_shapes(spec) == [(128, 64, 128), (32, 64, 128), (512, 64, 128), (128, 64, 128)]
    p = measure_cpu(seconds=0.1, shapes=cpu_matmul_shapes(spec))
    assert all(1e-5 < p.peak_tflops[k] < 10 for k in ("fp32", "bf16", "fp16"))
