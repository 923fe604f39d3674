"""The cluster profile: measured on real Ray ranks over gloo, fitted to the alpha-beta cost the
step-time model uses, cached per cluster, applied to the device profile."""

from __future__ import annotations

import json

from dataclasses import replace

import pytest

from autotune.predict.steptime import LAUNCHES_PER_LAYER_PASS
from autotune.space.devices import get
from autotune.space.spec import spec_from_data
from autotune.study import cluster_profile as cp
from autotune.study.connect import WORKER_NICENESS


def _spec(cpus_per_rank: float = 1.0, **search):
    return spec_from_data({
        "model": {"preset": "tiny"},
        "cluster": {"ranks": 2, "device": "cpu", "memory_gb": 1.0, "cpus_per_rank": cpus_per_rank},
        "search": {"ep": [1, 2], "tp": [1, 2], "micro_batch_size": [1, 4], "global_batch_size": 8, "seq_len": 32,
                   **search},
        "study": {"name": "probe"},
    })


def test_the_fit_recovers_each_collectives_latency_and_bandwidth():
    alpha, bandwidth = 40e-6, 3e9
    rows = []
    for g in (2, 4):
        for size in (1 << 12, 1 << 16, 1 << 20):
            rows.append({"kind": "all_reduce", "group": g, "bytes": size,
                         "seconds": 2 * (g - 1) * alpha + 2 * (g - 1) / g * size / bandwidth})
            rows.append({"kind": "all_to_all", "group": g, "bytes": size,
                         "seconds": (g - 1) * alpha + (g - 1) / g * size / bandwidth})
    rows += [{"kind": "send_recv", "group": 2, "bytes": s, "seconds": alpha + s / bandwidth} for s in (1e3, 1e6)]
    fits = cp.fit_collectives(rows)
    assert {(f["kind"], f["group"]) for f in fits} == {("all_reduce", 2), ("all_reduce", 4), ("all_to_all", 2),
                                                        ("all_to_all", 4), ("send_recv", 2)}
    for f in fits:
        assert f["latency_us"] == pytest.approx(40.0, rel=1e-6) and f["gb_s"] == pytest.approx(3.0, rel=1e-6)


def test_applying_a_record_replaces_what_it_measured_and_keeps_the_rest():
    base = get("cpu")
    record = {"measured_at": "now", "cores": 2.0, "copy_gb_s": 30.0,
              "gemms": [{"precision": "fp32", "groups": 1, "tflops": 0.1, "seconds": 1.0},
                        {"precision": "fp32", "groups": 8, "tflops": 0.05, "seconds": 1.0},
                        {"precision": "bf16", "groups": 1, "tflops": 0.2, "seconds": 1.0}],
              "fits": [{"kind": "all_reduce", "group": 2, "latency_us": 100.0, "gb_s": 1.5, "where": "node"},
                       {"kind": "all_reduce", "group": 4, "latency_us": 300.0, "gb_s": 0.4, "where": "node"},
                       {"kind": "all_to_all", "group": 2, "latency_us": 70.0, "gb_s": 3.0, "where": "node"},
                       {"kind": "all_to_all", "group": 4, "latency_us": 90.0, "gb_s": 0.5, "where": "node"},
                       {"kind": "send_recv", "group": 2, "latency_us": 50.0, "gb_s": 2.0, "where": "node"}]}
    p = cp.apply(base, record)
    # The FLOPs of both shapes over their summed time, as a step runs both.
    assert p.peak_tflops["fp32"] == pytest.approx(0.075) and p.peak_tflops["fp16"] == p.peak_tflops["bf16"] == 0.2
    # Four ranks on two cores share them (the step-time model counts that on its own): the widest
    # group within the cores gives the bandwidth, and the latency is the median of those fits.
    assert p.intra_node_gb_s == 1.5 and p.latency_us == pytest.approx(70.0) and p.hbm_gb_s == 30.0
    assert (p.a2a_gb_s, p.p2p_gb_s) == (3.0, 2.0)  # each collective's own bandwidth
    assert (p.inter_node_gb_s, p.launch_us, p.ranks_per_node) == (base.inter_node_gb_s, base.launch_us,
                                                                  base.ranks_per_node)
    assert cp.apply(base, {"error": "the probe timed out"}) == base
    # A bare block's fixed cost, forward and backward (3 passes of the model's launches per layer), is
    # a floor: it raises the profile's figure (300 us a launch, 3.6 ms a layer) and never lowers it.
    slow = cp.apply(base, {**record, "layer": {"moe": True, "tokens": 16, "seconds": 0.0048}})
    assert slow.launch_us * 3 * LAUNCHES_PER_LAYER_PASS == pytest.approx(4800.0)
    assert cp.apply(base, {**record, "layer": {"moe": True, "tokens": 16, "seconds": 0.0012}}).launch_us == base.launch_us
    assert cp.apply(base, {**record, "layer": {"moe": True, "error": "no kernel"}}).launch_us == base.launch_us
    h100 = get("H100-SXM")  # 10 us a launch: a bare block of 1.2 ms a layer raises it
    assert cp.apply(h100, {"layer": {"seconds": 0.0012}}).launch_us == pytest.approx(100.0)


def test_the_layer_cost_runs_the_models_own_block_shrunk_to_a_tiny_width():
    import torch

    from autotune.trials.probe import LAYER_WIDTH, layer_model, measure_layer
    from trainables.moe.config import preset

    small = layer_model(preset("moe-64e"))  # its 64 experts and top-2 routing, every width 16
    assert (small.d_model, small.ffn_hidden, small.dense_ffn, small.n_experts, small.top_k) == (
        LAYER_WIDTH, LAYER_WIDTH, LAYER_WIDTH, 64, 2)
    moe = measure_layer(small, torch.device("cpu"), 0.05)
    dense = measure_layer(replace(small, first_dense_layers=small.n_layers), torch.device("cpu"), 0.05)
    assert moe["moe"] and not dense["moe"] and moe["seconds"] > 0 and dense["seconds"] > 0
    broken = measure_layer(replace(small, n_heads=3), torch.device("cpu"), 0.05)  # 16 is not divisible by 3
    assert broken["error"] and "seconds" not in broken


@pytest.mark.slow
def test_the_probe_measures_on_ray_ranks_and_a_later_study_reuses_it(tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    spec = _spec()
    plan = cp.probe_config(spec)
    assert plan.world == 2 and plan.groups == (2,) and plan.precisions == ("fp32", "bf16", "bf16-params")
    assert any(g[0] == 8 for g in plan.gemms)  # the grouped expert GEMM, every expert
    # the probe's ranks at normal priority, as a study's own Ray runs them (connect.WORKER_NICENESS)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             _system_config={"worker_niceness": WORKER_NICENESS})
    try:
        record = cp.cluster_profile(spec)
        assert not record.get("error") and "reused" not in record, record
        assert {g["precision"] for g in record["gemms"]} == {"fp32", "bf16", "bf16-params"}
        assert all(g["tflops"] > 0 for g in record["gemms"]) and record["copy_gb_s"] > 0
        assert record["layer"]["moe"] and record["layer"]["seconds"] > 0
        assert record["layer"]["used"] == (record["layer"]["seconds"] > record["layer"]["profile_seconds"])
        assert cp.apply(get("cpu"), record).launch_us == pytest.approx(max(
            get("cpu").launch_us, record["layer"]["seconds"] / (3 * LAUNCHES_PER_LAYER_PASS) * 1e6))
        # Every collective at every message size, on the real ranks (rank 0's clock).
        kinds = {(c["kind"], c["bytes"]) for c in record["collectives"]}
        assert kinds == {(k, s) for k in ("all_reduce", "all_to_all", "send_recv") for s in plan.sizes}
        assert {f["kind"] for f in record["fits"]} == {"all_reduce", "all_to_all", "send_recv"}
        assert all(f["gb_s"] > 0 and f["latency_us"] >= 0 for f in record["fits"])
        assert record["measure_s"] < 10 * plan.seconds and record["wall_s"] < cp.PROBE_TIMEOUT_S
        cached = list((tmp_path / "cache" / "cluster-profiles").glob("*.json"))
        assert len(cached) == 1 and json.loads(cached[0].read_text())["fits"] == record["fits"]
        again = cp.cluster_profile(spec)
        assert again["reused"] == str(cached[0]) and again["fits"] == record["fits"]
        # Another share of the machine is another cluster: measured again, not reused.
        other = cp.cluster_profile(_spec(cpus_per_rank=0.5))
        assert "reused" not in other and not other.get("error")
        # A probe that cannot finish fails alone: the study goes on with the profile's figures.
        monkeypatch.setattr(cp, "PROBE_TIMEOUT_S", 0.001)
        failed = cp.cluster_profile(_spec(micro_batch_size=[2]))
        assert failed["error"] and cp.apply(get("cpu"), failed) == get("cpu")
        assert "probe failed" in cp.console_line(failed)
    finally:
        ray.shutdown()


def test_a_gemm_shape_the_device_cannot_run_is_recorded_and_the_rest_measured():
    import torch

    from autotune.trials.probe import ProbeConfig, measure_gemms

    # A grouped GEMM whose rows are not 16-byte aligned (3 bf16 values) is refused by the kernel.
    probe = ProbeConfig(device="cpu", world=1, gemms=((1, 16, 8, 8), (4, 4, 3, 8)), precisions=("bf16-params",))
    rows = measure_gemms(probe, torch.device("cpu"), 0.05)
    good, bad = rows
    assert good["tflops"] > 0 and "error" not in good
    assert bad["error"] and "tflops" not in bad
    record = {"measured_at": "now", "gemms": rows}
    assert cp.apply(get("cpu"), record).peak_tflops["bf16-params"] == pytest.approx(good["tflops"])
