"""Device-level memory on CUDA: the overhead term, its calibration, pruning and the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from autotune.predict.candidates import FITS, OVER_MEMORY, judge
from autotune.predict.device_memory import Sample, calibrate, overhead_for, overhead_of
from autotune.predict.memory import predict
from autotune.records.results import StudyResult
from autotune.report.write import build_report, render_markdown
from autotune.schema import MEMORY_CATEGORIES, Status
from autotune.space.devices import profiles, resolve
from autotune.space.layout import Layout
from autotune.space.spec import spec_from_data
from autotune.trial_record import TrialRecord
from trainables.moe.config import ParallelDims, RunShape, preset

ROOT = Path(__file__).resolve().parents[3]
SMALL_SHAPE = RunShape(8, 32, 1024, "bf16")


def test_cuda_prediction_adds_slack_context_and_nccl_beyond_the_allocated_peak():
    o = overhead_for()
    alone = predict(preset("small"), ParallelDims(), SMALL_SHAPE, "cuda")
    assert alone.reserved == o.reserved(alone.total) > alone.total
    assert alone.device == o.reserved(alone.total) + o.context_bytes
    with_peers = predict(preset("small"), ParallelDims(dp=2), RunShape(8, 32, 1024, "bf16"), "cuda")
    assert with_peers.device == o.reserved(with_peers.total) + o.context_bytes + o.nccl_bytes
    metrics = alone.as_metrics()
    assert metrics["pred_peak_mem_device_bytes"] == alone.device > metrics["pred_peak_mem_reserved_bytes"] > \
        metrics["pred_peak_mem_bytes"] == alone.total
    cpu = predict(preset("tiny"), ParallelDims(), RunShape(2, 8, 64), "cpu")
    assert cpu.device == cpu.total and "pred_peak_mem_device_bytes" not in cpu.as_metrics()


def test_the_overhead_terms_are_device_profile_data():
    h200 = profiles()["H200"]
    assert "gpu_check" in h200.sources["mem_fragmentation"] and h200.mem_context_bytes > 0
    assert 0 < h200.mem_fragmentation < 1 and overhead_for("H200") == overhead_of(h200)
    assert overhead_of(profiles()["cpu"]).context_bytes == 0
    # A space may override them like any other figure of a profile.
    mine = resolve({"base": "H200", "mem_context_bytes": 3_000_000_000}, "cuda")
    assert overhead_of(mine).context_bytes == 3_000_000_000 and overhead_of(mine).fragmentation == h200.mem_fragmentation


def test_calibration_covers_every_sample():
    # The H200 runs of benchmarks/gpu_check.py (bytes), and a made-up two-rank sample.
    h200 = [Sample(17_116_568_576, 19_713_228_800, 21_753_626_624),
            Sample(117_031_795_200, 133_345_312_768, 135_383_613_440)]
    fit = calibrate(h200, nccl_default=536_870_912)
    assert fit.context_bytes == 2_040_397_824 and abs(fit.fragmentation - 0.1517) < 2e-4
    for s in h200:
        assert fit.device(s.allocated, 1) >= s.device and fit.reserved(s.allocated) >= s.reserved
    peers = calibrate([*h200, Sample(10_000_000_000, 11_000_000_000, 13_540_397_824, world_size=2)])
    assert peers.nccl_bytes == 13_540_397_824 - 11_000_000_000 - 2_040_397_824


def _cuda_spec(memory_gb: float):
    return spec_from_data({"model": {"preset": "small"},
                           "cluster": {"ranks": 1, "device": "cuda", "memory_gb": memory_gb},
                           "search": {"micro_batch_size": [8], "global_batch_size": 32, "seq_len": 1024,
                                      "precision": ["bf16"]},
                           "objective": {"memory_cap": 1.0}, "study": {"name": "dev"}})


def test_pruning_on_cuda_uses_the_device_level_prediction():
    layout = Layout(1, 1, 1, 1, 8, "bf16", "none")
    pred = predict(preset("small"), ParallelDims(), SMALL_SHAPE, "cuda")
    between = (pred.total + pred.device) / 2 / 1e9  # the allocated peak fits, the device's view does not
    verdict = judge(_cuda_spec(between), layout)
    assert verdict.verdict == OVER_MEMORY and "predicted device memory" in verdict.reason
    assert judge(_cuda_spec(pred.device / 1e9 + 0.01), layout).verdict == FITS


def test_report_shows_allocated_reserved_and_device_memory_and_caps_the_device_figure():
    spec = _cuda_spec(21.0)
    layout = Layout(1, 1, 1, 1, 8, "bf16", "none")
    pred = predict(spec.model.config(), layout.dims, layout.shape(32, 1024), "cuda").as_metrics()
    parts = [2_095_500_288, 2_095_500_288, 4_191_000_576, 6_473_761_944, 2_260_805_480]  # H200 small run
    m = {"tokens_per_s": 59226.5, "step_time_s": 32 * 1024 / 59226.5, "step_time_p90_s": 0.568, "loss_first": 10.55,
         "loss_last": 10.44, "expert_load_imbalance": 3.1, "tokens_dropped_frac": 0.0,
         **dict(zip(MEMORY_CATEGORIES, parts)), "peak_mem_bytes": sum(parts),
         "peak_mem_reserved_bytes": 19_713_228_800, "peak_mem_device_bytes": 21_753_626_624}
    trial = TrialRecord(0, layout, Status.OK, metrics=m, prediction=pred, losses=(10.55, 10.44))
    report = build_report(StudyResult("dev", spec, (trial,), machine={"device": "cuda"}, wall_s=1.0))
    memory = report["best"]["memory"] if report["best"] else None
    # 21.75 GB on the device is over the 21 GB card although 17.1 GB allocated is not: no best layout.
    assert memory is None and report["verdict"]["status"] != "READY"
    fits = _cuda_spec(24.0)
    report = build_report(StudyResult("dev", fits, (trial,), machine={"device": "cuda"}, wall_s=1.0))
    memory = report["best"]["memory"]
    assert memory["reserved_bytes"] == 19_713_228_800 and memory["device_bytes"] == 21_753_626_624
    assert memory["predicted_device_bytes"] == pred["pred_peak_mem_device_bytes"]
    md = render_markdown(report)
    assert "| reserved by the allocator | 19.713 |" in md and "| used on the device (NVML) | 21.754 |" in md
    cap = next(c for c in report["checks"] if c["id"] == "peak_within_cap")
    assert cap["figure"] == 21_753_626_624 and cap["passed"] and "device memory" in cap["name"]


def test_the_gpu_check_imports_no_tuner_dependency():
    """The GPU machine has torch but no ray/optuna/mlflow/pydantic: the check's own imports and
    the memory model must not need them."""
    code = ("import sys, runpy; sys.argv=['gpu_check', '--help']\n"
            "import benchmarks.gpu_check, autotune.predict.memory, trainables.moe.train\n"
            "bad = sorted(m for m in ('ray', 'optuna', 'mlflow', 'pydantic', 'autotune.space.spec') if m in sys.modules)\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
