"""The run itself: command line, metrics file, memory measurement, fail-fast layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch.distributed as dist

from autotune.schema import DEVICE_MEMORY_METRICS, MEMORY_CATEGORIES, SUMMARY_METRICS
from tests.launch import free_port, launch
from trainables.moe.measure import timed_alone
from trainables.moe.train import RunConfig, main

ROOT = Path(__file__).resolve().parents[3]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
FLAGS = ["--model", "tiny", "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-len", "64",
         "--precision", "fp32", "--recompute", "none", "--steps", "3", "--warmup-steps", "1", "--seed", "0"]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("flags,message", [
    (["--ep", "3"], "experts (8) must be divisible by ep (3)"),
    (["--tp", "3"], "heads (4) must be divisible by tp (3)"),
    (["--pp", "3"], "layers (4) must be divisible by pp (3)"),
    (["--global-batch-size", "7"], "global batch (7) must be divisible by micro_batch*dp*ep (2*1*1 = 2)"),
    (["--ep", "2", "--tp", "2"], "world size 4 (pp*dp*ep*tp = 1*1*2*2) != ranks launched 1"),
    (["--precision", "fp8"], "precision 'fp8' must be one of fp32, bf16, fp16"),
    (["--model", "huge"], "unknown model preset 'huge'"),
    (["--model-config", "{nope"], "--model-config is not valid JSON"),
])
def test_bad_layouts_fail_before_any_process_group(flags, message, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(FLAGS + flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not dist.is_initialized()


@pytest.mark.slow
def test_torchrun_four_ranks_ep2_tp2_prints_the_single_rank_losses(tmp_path):
    """The issue's acceptance run: the same command on 4 processes and on 1."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = {}
    for n, layout in ((1, []), (4, ["--ep", "2", "--tp", "2"])):
        out = tmp_path / f"m{n}.jsonl"
        cmd = [TORCHRUN, "--nproc-per-node", str(n), "--master-port", str(free_port()),
               "-m", "trainables.moe.train", *FLAGS, *layout, "--metrics-out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "step   3 measure loss" in proc.stdout
        runs[n] = _read(out)
    for n, lines in runs.items():
        assert [r["type"] for r in lines] == ["step"] * 4 + ["summary"]
        summary = lines[-1]
        assert summary["world_size"] == n and summary["status"] == "ok"
        for key in SUMMARY_METRICS:
            # no known peak FLOP/s on a CPU, and no allocator or device memory to read
            assert key in summary or key in ("mfu", *DEVICE_MEMORY_METRICS), key
        assert not set(DEVICE_MEMORY_METRICS) & set(summary)
        assert len(summary["ranks"]) == n
    one, four = [[r["loss"] for r in runs[n][:-1]] for n in (1, 4)]
    for a, b in zip(four, one):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert runs[4][-1]["layout"] == "EP2_TP2_PP1_DP1"


BASE = RunConfig(model="tiny", micro_batch_size=2, global_batch_size=4, seq_len=64, steps=2, warmup_steps=1)


@pytest.mark.slow
def test_memory_breakdown_sums_to_the_peak_and_follows_recompute():
    acts = {}
    for mode in ("none", "selective", "full"):
        summary = launch(replace(BASE, recompute=mode))[0].summary
        parts = sum(summary[k] for k in MEMORY_CATEGORIES)
        assert parts == summary["peak_mem_bytes"]
        assert all(summary[k] >= 0 for k in MEMORY_CATEGORIES)
        acts[mode] = summary["mem_activations_bytes"]
    # Re-running attention keeps its probabilities out of memory; re-running the block keeps
    # only block inputs.
    assert acts["full"] < acts["selective"] < acts["none"]


@pytest.mark.slow
def test_every_rank_reports_its_memory_and_pipeline_stages_differ():
    results = launch(replace(BASE, pp=2, global_batch_size=8))
    ranks = results[0].summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["peak_mem_bytes"] == sum(r[k] for k in MEMORY_CATEGORIES)
    # Stage 0 keeps two micro-batches of activations in flight under 1F1B, the last stage one.
    assert ranks[0]["mem_activations_bytes"] > ranks[1]["mem_activations_bytes"]
    assert results[0].summary["peak_mem_bytes"] == max(r["peak_mem_bytes"] for r in ranks)


@pytest.mark.slow
def test_mfu_with_a_given_peak_and_consistent_throughput():
    s = launch(replace(BASE, peak_tflops=1.0, memory_probe=False))[0].summary
    assert s["tokens_per_s"] == pytest.approx(s["global_batch_size"] * s["seq_len"] / s["step_time_s"])
    assert s["mfu"] == pytest.approx(s["tokens_per_s"] * s["flops_per_token"] / 1e12)
    assert s["step_time_p90_s"] >= s["step_time_s"]
    assert 1.0 <= s["expert_load_imbalance"] <= 8.0 and s["tokens_dropped_frac"] == 0.0


def test_argv_round_trips_through_the_parser():
    from trainables.moe.train import _parser, config_from_args

    cfg = RunConfig(model="tiny", model_overrides={"n_layers": 8}, ep=2, tp=2, precision="bf16",
                    recompute="full", stage_layers=(3, 5), pp=2, peak_tflops=2.5, memory_probe=False)
    assert config_from_args(_parser().parse_args(cfg.argv())) == cfg


@pytest.mark.alone  # holds the machine's measuring lock and times a run against it
def test_timed_steps_wait_for_the_machines_measuring_lock():
    """A run that measures alone does not time a step while another holder has the machine's
    lock, and then runs to the end; one that does not measure alone ignores the lock."""
    import fcntl
    import threading
    import time

    from trainables.moe.measure import MEASURE_LOCK

    cfg = RunConfig(model="tiny", ep=2, micro_batch_size=2, global_batch_size=8, seq_len=32, steps=2,
                    warmup_steps=1, memory_probe=False)
    with open(MEASURE_LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            t0 = time.monotonic()
            free = launch(cfg, timeout=60)  # not alone: finishes while the lock is held
            took = time.monotonic() - t0
            assert len(free[0].step_times) == 3
            out: list = []
            worker = threading.Thread(target=lambda: out.append(launch(replace(cfg, measure_alone=True), timeout=120)))
            worker.start()
            worker.join(max(3 * took, 5.0))
            assert worker.is_alive() and not out  # waiting for the lock, three times as long as a whole run took
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(120)
    assert not worker.is_alive() and len(out[0][0].step_times) == 3


def _ranks_timing_alone(hosts: list[str], lock_for, inside, pause: float = 0.0) -> list[threading.Thread]:
    """One thread per rank of a trial on `hosts`, each running `inside(rank)` under timed_alone;
    each barrier first waits `pause` s (a slow network: the window in which another trial starts)."""
    import time

    barrier = threading.Barrier(len(hosts))

    def wait() -> None:
        time.sleep(pause)
        barrier.wait(60)

    def rank_body(r: int) -> None:
        with timed_alone(True, r, wait, hosts, lock_for):
            inside(r)

    threads = [threading.Thread(target=rank_body, args=(r,), daemon=True) for r in range(len(hosts))]
    for t in threads:
        t.start()
    return threads


def test_a_trial_on_two_machines_holds_both_machines_locks_while_it_times(tmp_path):
    import fcntl

    lock_for = lambda host: str(tmp_path / f"{host}.lock")  # noqa: E731  one lock file per machine
    entered: list[int] = []
    held_inside: list[bool] = []
    steps = threading.Barrier(4)  # the timed steps' collectives: no rank leaves before the others

    def inside(r: int) -> None:
        entered.append(r)
        if r == 0:  # while timing, neither machine's lock can be taken by anyone else
            for host in ("a", "b"):
                with open(lock_for(host), "a+") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        held_inside.append(False)
                        fcntl.flock(f, fcntl.LOCK_UN)
                    except BlockingIOError:
                        held_inside.append(True)
        steps.wait(30)

    with open(lock_for("b"), "a+") as other:  # another trial is timing on machine b
        fcntl.flock(other, fcntl.LOCK_EX)
        threads = _ranks_timing_alone(["a", "a", "b", "b"], lock_for, inside)
        threads[0].join(1.0)
        assert entered == []  # no rank times while machine b is busy, not even machine a's
        fcntl.flock(other, fcntl.LOCK_UN)
    for t in threads:
        t.join(30)
    assert sorted(entered) == [0, 1, 2, 3] and held_inside == [True, True]


def test_two_trials_sharing_two_machines_in_opposite_rank_order_both_finish(tmp_path):
    """Locks go by machine name, not rank: a trial whose rank 0 is on b and one whose rank 0 is
    on a cannot each hold one machine and wait for the other."""
    lock_for = lambda host: str(tmp_path / f"{host}.lock")  # noqa: E731
    done: list[str] = []
    for _ in range(5):  # each trial takes its first lock within the other's start-up window
        threads = (_ranks_timing_alone(["a", "b"], lock_for, lambda r: done.append("ab"), pause=0.2)
                   + _ranks_timing_alone(["b", "a"], lock_for, lambda r: done.append("ba"), pause=0.2))
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "the two trials deadlocked"
    assert done.count("ab") == done.count("ba") == 10
