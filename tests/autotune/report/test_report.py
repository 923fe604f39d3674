"""The deployment report: verdict, checks with figures, numbers that agree, plots, launch command."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from autotune.predict.memory import predict
from autotune.records.results import StudyResult, launch_command
from autotune.report.write import build_report, render_html, render_markdown, write_report
from autotune.schema import MEMORY_CATEGORIES, SUMMARY_METRICS, Status
from autotune.space.layout import Layout
from autotune.space.spec import Spec, spec_from_data
from autotune.trial_record import TrialRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("Study", "Verdict", "Best layout", "Memory", "Throughput and latency", "Experts and loss",
            "Validation checks", "Top", "Trials by status", "Plots", "Launch")
CHECK_IDS = {"peak_within_cap", "memory_prediction", "loss_decreasing", "throughput_stable", "expert_balance",
             "tokens_dropped", "tokens_consistent", "memory_adds_up", "world_size", "ranks_priority"}


def make_spec(cluster: dict[str, Any] | None = None, search: dict[str, Any] | None = None,
              name: str = "unit") -> Spec:
    return spec_from_data({
        "model": {"preset": "tiny"},
        "cluster": {"ranks": 4, "device": "cpu", "memory_gb": 0.05, **(cluster or {})},
        "search": {"ep": [1, 2, 4], "world_sizes": [1, 2, 4], "micro_batch_size": [2, 8], "global_batch_size": 16,
                   "seq_len": 64, **(search or {})},
        "study": {"name": name},
    })


def prediction(spec: Spec, layout: Layout) -> dict[str, int]:
    shape = layout.shape(spec.search.global_batch_size, spec.search.seq_len)
    return predict(spec.model.config(), layout.dims, shape, spec.cluster.device).as_metrics()


def ok_record(spec: Spec, number: int, layout: Layout, step_time_s: float, parts: list[int],
              **metrics: float) -> TrialRecord:
    """A finished trial whose figures agree with each other unless `metrics` says otherwise."""
    tokens = spec.search.global_batch_size * spec.search.seq_len
    m = {"tokens_per_s": tokens / step_time_s, "samples_per_s": spec.search.global_batch_size / step_time_s,
         "step_time_s": step_time_s, "step_time_p90_s": step_time_s * 1.1, "loss_first": 5.5, "loss_last": 5.4,
         "expert_load_imbalance": 1.3, "tokens_dropped_frac": 0.0,
         **dict(zip(MEMORY_CATEGORIES, parts)), "peak_mem_bytes": sum(parts)}
    m.update(metrics)
    # Invented figures get an exact prediction, so only the check a test breaks can fail; the
    # real runs below carry the memory model's own prediction.
    predicted = {f"pred_{k}": v for k, v in zip(MEMORY_CATEGORIES, parts)}
    predicted["pred_peak_mem_bytes"] = sum(parts)
    return TrialRecord(number, layout, Status.OK, metrics=m, prediction=predicted,
                       losses=(m["loss_first"], 5.45, m["loss_last"]),
                       step_times=(step_time_s * 0.95, step_time_s, step_time_s * 1.1))


def failed_record(number: int, layout: Layout, status: Status, reason: str) -> TrialRecord:
    return TrialRecord(number, layout, status, reason)


def lay(ep: int = 1, dp: int = 1, mb: int = 2, precision: str = "fp32", recompute: str = "none") -> Layout:
    return Layout(ep, 1, 1, dp, mb, precision, recompute)


def parts_of(peak_mb: float) -> list[int]:
    """Five categories (params, grads, optimizer, activations, other) summing to peak_mb MB."""
    total = int(peak_mb * 1e6)
    head = [total // 8, total // 8, total // 4, total // 3]
    return head + [total - sum(head)]


def study(spec: Spec, trials: list[TrialRecord], name: str = "unit") -> StudyResult:
    return StudyResult(name, spec, tuple(trials), machine={"device": spec.cluster.device}, wall_s=1.0)


def sections_of(md: str) -> list[str]:
    return re.findall(r"^## (.+)$", md, flags=re.MULTILINE)


def md_table(md: str, header_start: str) -> list[list[str]]:
    """Rows (cells stripped) of the first markdown table whose header starts with `header_start`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # axes, labels and bars, not an empty canvas
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 200 and width > 200


# ---------------------------------------------------------------------------------------------
# A study of real runs of the trainable (world 1, tiny model)

REAL = {"model": "tiny", "global_batch_size": 4, "seq_len": 32, "steps": 2, "warmup_steps": 1, "device": "cpu"}


def real_spec(cluster: dict[str, Any] | None = None, search: dict[str, Any] | None = None) -> Spec:
    return spec_from_data({
        "model": {"preset": "tiny"},
        "cluster": {"ranks": 1, "device": "cpu", "memory_gb": 0.05, **(cluster or {})},
        "search": {"micro_batch_size": [2], "global_batch_size": 4, "seq_len": 32, "precision": ["fp32"],
                   "recompute": ["none", "full"], **(search or {})},
        "budget": {"warmup_steps": 1, "measure_steps": 2},
        "study": {"name": "real-runs"},
    })


@pytest.fixture(scope="module")
def real_trials() -> list[TrialRecord]:
    """Two real world-1 runs, recorded the way a study records a trial's summary."""
    from tests.launch import launch
    from trainables.moe.train import RunConfig

    spec = real_spec()
    out = []
    for number, layout in enumerate((lay(recompute="none"), lay(recompute="full"))):
        summary = launch(RunConfig(micro_batch_size=layout.micro_batch_size, precision=layout.precision,
                                   recompute=layout.recompute, **REAL))[0].summary
        out.append(TrialRecord(
            number, layout, Status(summary["status"]), summary["reason"],
            metrics={k: summary[k] for k in SUMMARY_METRICS if k in summary},
            prediction=prediction(spec, layout), ranks=tuple(summary["ranks"]),
            losses=tuple(summary["losses"]), step_times=tuple(summary["step_times_s"])))
    return out


@pytest.fixture(scope="module")
def real_report(real_trials, tmp_path_factory):
    result = study(real_spec(), real_trials, name="real-runs")
    files = write_report(result, tmp_path_factory.mktemp("report"))
    return result, files


def test_real_study_writes_every_file_with_every_section(real_report):
    _, files = real_report
    md, page = files.markdown.read_text(), files.html.read_text()
    for title in SECTIONS:
        assert any(s.startswith(title) for s in sections_of(md)), title
        assert re.search(rf"<h2>{re.escape(title)}", page), title
    assert_png(files.pareto_png)
    assert_png(files.memory_png)
    # The page is self-contained: both plots inline, byte for byte the files written beside it.
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [files.pareto_png.read_bytes(), files.memory_png.read_bytes()]
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "![" in md and "pareto.png" in md and "memory.png" in md


def test_real_study_json_holds_verdict_best_and_checks_with_figures(real_report):
    result, files = real_report
    report = json.loads(files.json.read_text())
    best = result.best()
    assert report["best"]["number"] == best.number
    assert report["best"]["key"] == best.layout.key
    assert {c["id"] for c in report["checks"]} == CHECK_IDS
    for c in report["checks"]:
        if c["id"] == "ranks_priority":  # launched here without Ray, whose worker records it (test_study)
            assert c["passed"] is None and c["detail"] == "priority not recorded"
            continue
        assert c["passed"] is not None and c["figure"] is not None and c["detail"], c
    gating_ok = all(c["passed"] for c in report["checks"] if c["gates"])
    assert report["verdict"]["ready"] is gating_ok
    assert report["verdict"]["status"] == ("READY" if gating_ok else "NOT READY")
    assert report["verdict"]["reasons"]
    assert report == build_report(result)  # the file is the report, nothing added on the way


def test_real_study_rendered_throughput_matches_batch_over_step_time(real_report):
    result, files = real_report
    md = files.markdown.read_text()
    spec = result.spec
    tps = float(re.search(r"Throughput: ([\d,]+) tokens/s", md).group(1).replace(",", ""))
    ms = float(re.search(r"Step time \(median\): ([\d.]+) ms", md).group(1))
    expected = spec.search.global_batch_size * spec.search.seq_len / (ms / 1e3)
    # Only display rounding separates them: half a unit of the last digit of each figure.
    assert abs(tps - expected) <= expected * 0.005 / ms * 1.01 + 0.5
    # The best's row of the trials table shows the very same strings.
    row = next(r for r in md_table(md, "rank | trial") if "(best)" in r[1])
    assert row[8] == f"{tps:,.0f}" and float(row[9]) == ms
    assert "tokens/s = global batch x seq_len / step time" in md


def test_real_study_memory_categories_sum_to_the_peak(real_report):
    result, files = real_report
    report = json.loads(files.json.read_text())
    mem = report["best"]["memory"]
    assert sum(mem["measured"].values()) == mem["peak_bytes"] == result.best().metrics["peak_mem_bytes"]
    assert sum(mem["predicted"].values()) == mem["predicted_peak_bytes"]
    rows = md_table(files.markdown.read_text(), "category")
    assert [r[0] for r in rows] == ["params", "grads", "optimizer", "activations", "other", "peak (sum)"]
    measured = [float(r[1]) for r in rows]
    decimals = report["unit"]["decimals"]
    assert abs(sum(measured[:5]) - measured[5]) <= 5 * 0.5 * 10 ** -decimals + 1e-9
    # One rounding everywhere: the peak reads the same in the memory, trials and checks tables.
    md = files.markdown.read_text()
    best_row = next(r for r in md_table(md, "rank | trial") if "(best)" in r[1])
    assert best_row[-2] == rows[5][1]  # the peak column, just before status
    assert f"{rows[5][1]} {report['unit']['name']} of" in md


def test_real_study_reports_cpu_facts_without_inventing_any(real_report):
    result, files = real_report
    md = files.markdown.read_text()
    best = result.best()
    assert "MFU: not measured: peak FLOP/s of this device unknown" in md
    assert "mfu" not in best.metrics
    assert "Experts per rank: 8 experts / EP 1 = 8" in md
    assert launch_command(result.spec, best.layout) in md
    assert "export OMP_NUM_THREADS=1" in md
    assert "MASTER_ADDR" not in md  # one node: torchrun needs no rendezvous address
    m = best.metrics
    assert f"{m['tokens_dropped_frac'] * 100:.3f}%" in md
    assert len(md_table(md, "rank | coords")) == 1  # one rank, its peak listed


# ---------------------------------------------------------------------------------------------
# Studies built from plain values


def test_no_successful_trial_is_not_ready_with_counts_by_reason(tmp_path):
    spec = make_spec()
    trials = [
        failed_record(0, lay(1, 1, 8), Status.PRUNED_BY_MEMORY_MODEL,
                      "predicted peak 0.061 GB > cap 0.045 GB (90% of 0.05 GB)"),
        failed_record(1, lay(1, 2, 8), Status.PRUNED_BY_MEMORY_MODEL,
                      "predicted peak 0.071 GB > cap 0.045 GB (90% of 0.05 GB)"),
        failed_record(2, lay(2, 2), Status.OOM, "rank 1: out of memory"),
        failed_record(3, lay(4, 1), Status.INVALID, "experts (8) must be divisible by ep (3)"),
    ]
    result = study(spec, trials)
    report = build_report(result)
    assert report["verdict"]["status"] == "NOT READY" and report["verdict"]["ready"] is False
    assert report["verdict"]["reasons"][0].startswith("no feasible layout")
    assert report["best"] is None and report["checks"] == []
    by_reason = report["trials"]["counts_by_reason"]
    assert by_reason["pruned_by_memory_model: predicted peak # GB > cap # GB (#% of # GB)"] == 2
    assert by_reason["oom: rank #: out of memory"] == 1
    assert by_reason["invalid: experts"] == 1
    assert report["trials"]["counts_by_status"] == {"pruned_by_memory_model": 2, "oom": 1, "invalid": 1}
    assert any("(2 trials)" in r for r in report["verdict"]["reasons"])

    files = write_report(result, tmp_path)
    md = files.markdown.read_text()
    assert "**NOT READY**" in md and "no feasible layout" in md
    assert "| pruned_by_memory_model | 2 |" in md
    assert "predicted peak 0.071 GB > cap 0.045 GB" in md  # each trial's own reason is kept
    assert "torchrun" not in md  # nothing to launch
    assert "NOT READY" in files.html.read_text()
    assert_png(files.pareto_png)
    assert_png(files.memory_png)


def test_finished_trials_all_over_the_cap_are_no_feasible_layout():
    spec = make_spec()
    result = study(spec, [ok_record(spec, 0, lay(), 0.2, parts_of(48.0)),
                          ok_record(spec, 1, lay(2), 0.1, parts_of(46.0))])
    report = build_report(result)
    assert report["verdict"]["status"] == "NOT READY"
    assert "every one peaked above the memory cap" in report["verdict"]["reasons"][0]
    assert report["trials"]["counts_by_reason"] == {"ok: measured peak over the memory cap": 2}
    assert [p["pareto"] for p in report["trials"]["points"]] == [False, True]


def test_ready_study_ranks_trials_and_marks_the_best():
    spec = make_spec()
    trials = [ok_record(spec, 0, lay(), 0.20, parts_of(19.4)), ok_record(spec, 1, lay(2), 0.15, parts_of(13.0)),
              ok_record(spec, 2, lay(4), 0.12, parts_of(11.0)),
              ok_record(spec, 3, lay(4, 1, 8), 0.05, parts_of(47.0)),  # fastest, but over the 45 MB cap
              failed_record(4, lay(2, 2), Status.CRASHED, "rank 0: boom")]
    report = build_report(study(spec, trials))
    assert report["verdict"]["status"] == "READY", report["verdict"]
    assert report["best"]["number"] == 2
    top = report["trials"]["top"]
    assert [r["number"] for r in top] == [2, 1, 0, 3, 4]
    assert [r["rank"] for r in top] == [1, 2, 3, 4, 5]
    assert top[0]["best"] and top[3]["status"] == "ok: measured peak over the memory cap"
    assert top[4]["tokens_per_s"] is None and top[4]["status"] == "crashed"
    assert report["unit"]["name"] == "MB"
    md = render_markdown(report)
    assert "| 1 | #2 (best) | EP4_TP1_PP1_DP1 |" in md
    assert "rank 0: boom" in md
    assert [b["number"] for b in report["memory_bars"]] == [2, 1, 0]


@pytest.mark.parametrize("change,check_id", [
    ({"loss_last": 5.6}, "loss_decreasing"),
    ({"loss_last": float("nan")}, "loss_decreasing"),
    ({"step_time_p90_s": 0.12 * 1.3}, "throughput_stable"),
    ({"tokens_dropped_frac": 0.02}, "tokens_dropped"),
    ({"tokens_per_s": 16 * 64 / 0.12 * 1.01}, "tokens_consistent"),
    ({"peak_mem_bytes": 11_000_001}, "memory_adds_up"),
])
def test_a_failed_gating_check_makes_it_not_ready(change, check_id, tmp_path):
    spec = make_spec()
    result = study(spec, [ok_record(spec, 0, lay(4), 0.12, parts_of(11.0), **change)])
    report = build_report(result)
    failed = [c for c in report["checks"] if c["passed"] is False]
    assert [c["id"] for c in failed] == [check_id]
    assert failed[0]["gates"] is True
    assert report["verdict"]["status"] == "NOT READY"
    assert any(r.startswith(failed[0]["name"]) for r in report["verdict"]["reasons"])
    # Non-finite figures still give a strict JSON file.
    json.loads(write_report(result, tmp_path).json.read_text())


def test_warning_checks_do_not_gate_ready():
    spec = make_spec()
    record = ok_record(spec, 0, lay(4), 0.12, parts_of(11.0), expert_load_imbalance=3.0)
    record = TrialRecord(record.number, record.layout, record.status, metrics=record.metrics,
                         prediction={k: v * 2 for k, v in record.prediction.items()}, losses=record.losses,
                         step_times=record.step_times)
    report = build_report(study(spec, [record]))
    failed = {c["id"] for c in report["checks"] if c["passed"] is False}
    assert failed == {"expert_balance", "memory_prediction"}
    assert report["verdict"]["status"] == "READY"
    assert len(report["verdict"]["warnings"]) == 2
    md = render_markdown(report)
    assert "no (warning)" in md and "Warnings (do not gate READY)" in md


def test_ranks_below_normal_priority_are_a_warning_that_names_the_trials():
    from dataclasses import replace

    spec = make_spec()
    records = [ok_record(spec, n, lay(4, mb=mb), 0.12 + n / 100, parts_of(11.0)) for n, mb in ((0, 2), (1, 8))]

    def at(record, *nice):
        return replace(record, ranks=tuple({"rank": i, "nice": v} for i, v in enumerate(nice)))

    def priority(trials):
        report = build_report(study(spec, trials))
        return report, next(c for c in report["checks"] if c["id"] == "ranks_priority")

    _, check = priority(records)  # records without the figure (older runs, other launchers)
    assert check["passed"] is None and check["detail"] == "priority not recorded"
    _, check = priority([at(records[0], 0, 0, 0, 0), at(records[1], 0, 0, 0, 0)])
    assert check["passed"] is True and check["detail"] == "every rank of the 2 measured trials ran at nice 0"
    report, check = priority([at(records[0], 0, 0, 0, 0), at(records[1], 0, 15, 0, 0)])
    assert check["passed"] is False and check["gates"] is False and check["figure"] == 15
    assert check["detail"].startswith("1 trial of 2 ran ranks at nice up to 15 (#1)")
    assert "RAY_worker_niceness=0" in check["detail"]
    assert report["verdict"]["status"] == "READY"
    assert any(w.startswith("ranks at normal priority (nice 0)") for w in report["verdict"]["warnings"])


def test_fewer_ranks_than_the_cluster_is_said_and_gates_only_a_deployment_run():
    searched = make_spec()  # cluster of 4, search.world_sizes [1, 2, 4]
    deployment = make_spec(search={"world_sizes": None, "ep": [1]})
    for spec, gates in ((searched, False), (deployment, True)):
        report = build_report(study(spec, [ok_record(spec, 0, lay(), 0.2, parts_of(19.4))]))
        world = next(c for c in report["checks"] if c["id"] == "world_size")
        assert world["passed"] is False and world["gates"] is gates
        assert "measured on 1 of the cluster's 4 ranks" in world["detail"]
        assert report["verdict"]["ready"] is (not gates)
        assert "measured on 1 of the cluster's 4 ranks" in render_markdown(report)


def test_large_memory_reads_in_gb_with_three_decimals_everywhere():
    spec = make_spec(cluster={"memory_gb": 80})
    parts = [4_010_000_000, 4_010_000_000, 8_020_000_000, 140_000_000, 2_000_000_000]
    report = build_report(study(spec, [ok_record(spec, 0, lay(4), 0.4, parts)]))
    assert report["unit"] == {"name": "GB", "bytes": 1e9, "decimals": 3}
    md = render_markdown(report)
    assert "| activations | 0.140 |" in md and "| peak (sum) | 18.180 |" in md
    assert "18.180 GB of 72.000 GB cap (90% of 80.000 GB)" in md


def test_mfu_is_shown_when_measured():
    spec = make_spec()
    report = build_report(study(spec, [ok_record(spec, 0, lay(4), 0.12, parts_of(11.0), mfu=0.4123)]))
    assert report["best"]["performance"]["mfu"] == 0.4123
    md = render_markdown(report)
    assert "MFU: 41.2%" in md and "not measured" not in md.split("## Throughput")[1].split("##")[0]


def test_launch_environment_on_cuda_names_only_what_torchrun_needs():
    multi = make_spec(cluster={"ranks": None, "nodes": 2, "ranks_per_node": 2, "device": "cuda", "memory_gb": 80})
    report = build_report(study(multi, [ok_record(multi, 0, lay(4), 0.4, parts_of(500.0))]))
    launch = report["best"]["launch"]
    assert "--nnodes=2" in launch["command"] and launch["nodes"] == 2
    assert [v["name"] for v in launch["env"]] == ["MASTER_ADDR", "MASTER_PORT"]
    md = render_markdown(report)
    assert "Run on each of the 2 nodes" in md and "OMP_NUM_THREADS" not in md

    single = make_spec(cluster={"device": "cuda", "memory_gb": 80})
    report = build_report(study(single, [ok_record(single, 0, lay(4), 0.4, parts_of(500.0))]))
    assert report["best"]["launch"]["env"] == []
    assert "No environment variables are needed" in render_markdown(report)


def test_html_escapes_recorded_text():
    spec = make_spec()
    result = study(spec, [failed_record(0, lay(), Status.CRASHED, "<script>alert(1)</script> | pipe")])
    page = render_html(build_report(result), {})
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "plot not available" in page
    assert "\\| pipe" in render_markdown(build_report(result))
