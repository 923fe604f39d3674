"""Framework presets: each fed the log lines its framework prints, built here with that
framework's own format strings (copied from the file and release named in `trainables.presets`),
printed by a real process and read by `run_command`, then derived into autotune's metrics."""

from __future__ import annotations

import json
import re
import statistics
import sys
from datetime import datetime
from pathlib import Path

import pytest

from autotune.schema import Status
from trainables.command import RunShape, run_command
from trainables.presets import PRESETS, preset_patterns


def printer(tmp_path, lines: list[str]) -> list[str]:
    """A program that prints these lines (as a framework would) and exits 0."""
    (tmp_path / "lines.json").write_text(json.dumps(lines))
    code = ("import json, sys\nfor line in json.load(open(sys.argv[1])):\n    print(line, flush=True)\n")
    (tmp_path / "prog.py").write_text(code)
    return [sys.executable, str(tmp_path / "prog.py"), str(tmp_path / "lines.json")]


def run(tmp_path, preset: str, lines: list[str], shape: RunShape, warmup_steps: int = 1):
    return run_command(printer(tmp_path, lines), cwd=tmp_path, metrics_preset=preset, timeout_s=30,
                       warmup_steps=warmup_steps, shape=shape)


# ---------------------------------------------------------------------------------------------
# torchtitan 0.3.0: components/metrics.py MetricsProcessor.log, tools/utils.py Color


class Color:
    red, green, orange, turquoise, blue, cyan, magenta, yellow, reset = (
        "\033[31m", "\033[32m", "\033[38;2;180;60;0m", "\033[38;2;54;234;195m", "\033[34m", "\033[36m",
        "\033[35m", "\033[33m", "\033[39m")


def titan_line(step, loss, grad_norm, gib, pct, tps, tflops, mfu, color=Color):
    mfu_str = f"{mfu:.2f}%" if mfu is not None else "N/A"
    message = (f"{color.red}step: {step:2}  "
               f"{color.green}loss: {loss:8.5f}  "
               f"{color.orange}grad_norm: {grad_norm:7.4f}  "
               f"{color.turquoise}memory: {gib:5.2f}GiB"
               f"({pct:.2f}%)  "
               f"{color.blue}tps: {round(tps):,}  "
               f"{color.cyan}tflops: {tflops:,.2f}  "
               f"{color.magenta}mfu: {mfu_str}{color.reset}")
    return f"[titan] 2026-11-26 10:00:0{step % 10},123 - root - INFO - {message}"  # tools/logging.py's format


def titan_validate_line(step, loss, gib, pct, tps, color=Color):
    return ("[titan] 2026-11-26 10:00:09,000 - root - INFO - "
            f"{color.yellow}validate step: {step:2}  {color.green}loss: {loss:7.4f}  "
            f"{color.turquoise}memory: {gib:5.2f}GiB({pct:.2f}%)  {color.blue}tps: {round(tps):,}{color.reset}")


def test_torchtitan_tps_per_device_times_world_and_memory_in_gib(tmp_path):
    tps = [2100.4, 10250.2, 10411.7, 9987.1, 10122.9]
    gib = [61.2, 63.75, 63.8, 63.79, 63.8]
    lines = ["[titan] 2026-11-26 10:00:00,001 - root - INFO - Training starts at step 1"]
    for i, (t, g) in enumerate(zip(tps, gib), start=1):
        lines.append(titan_line(i, 10.5 - i * 0.25, 1.25, g, g / 80 * 100, t, 123.45, 41.3))
        if i == 3:
            lines.append(titan_validate_line(3, 9.1, 70.5, 88.1, 99999))  # not a training step
    shape = RunShape(seq_len=2048, world_size=8, global_batch_size=32)
    out = run(tmp_path, "torchtitan", lines, shape)
    assert out.status == Status.OK, out.reason
    assert [s["step"] for s in out.steps] == [1, 2, 3, 4, 5]
    assert out.steps[0]["phase"] == "warmup" and all(s["phase"] == "measure" for s in out.steps[1:])
    assert out.steps[1]["tokens_per_s"] == round(tps[1]) * 8
    times = [2048 * 32 / (round(t) * 8) for t in tps[1:]]  # derived: global batch x seq_len / tokens/s
    assert out.summary["step_time_s"] == pytest.approx(statistics.median(times))
    assert out.summary["tokens_per_s"] == pytest.approx(2048 * 32 / statistics.median(times))
    assert out.summary["peak_mem_bytes"] == round(63.80 * 2**30)  # the largest, not the validation line's
    assert (out.summary["loss_first"], out.summary["loss_last"]) == (10.25, 9.25)
    assert "tokens_per_s_per_device x world size 8" in out.derived["tokens_per_s"]
    assert "peak_mem_gib" in out.derived["peak_mem_bytes"]


def test_torchtitan_without_colours_and_with_torchrun_rank_prefix(tmp_path):
    class NoColor:
        red = green = orange = turquoise = blue = cyan = magenta = yellow = reset = ""

    lines = ["[rank0]:" + titan_line(i, 8.0, 1.0, 12.5, 15.6, 4321.0, 1.0, None, color=NoColor) for i in (1, 2, 3)]
    out = run(tmp_path, "torchtitan", lines, RunShape(seq_len=1024, world_size=4, global_batch_size=8))
    assert out.status == Status.OK, out.reason
    assert out.summary["tokens_per_s"] == 4321 * 4 and out.summary["peak_mem_bytes"] == round(12.5 * 2**30)


def test_torchtitan_every_rank_read_loss_from_the_last_stage_memory_from_the_worst(tmp_path):
    """pp 2 on 4 ranks without --local-ranks-filter: every rank prints its step lines. Ranks 0-1
    (first stage) print torchtitan's sentinel loss (-1 per data-parallel rank), ranks 2-3 the
    loss; memory differs by rank; each rank's tps is its own. Read: the last stage's loss, the
    worst rank's memory, the slowest rank's throughput, and the step time it implies."""
    class NoColor:
        red = green = orange = turquoise = blue = cyan = magenta = yellow = reset = ""

    lines = []
    for step in (1, 2, 3):
        for rank, (loss, gib, tps) in enumerate(((-2.0, 30.5, 5100.0), (-2.0, 31.0, 5000.0),
                                                 (9.0 - step, 41.25, 4900.0), (9.0 - step, 40.0, 5050.0))):
            lines.append(titan_line(step, loss, 1.0, gib, gib / 80 * 100, tps + step, 1.0, None, color=NoColor))
    shape = RunShape(seq_len=2048, world_size=4, global_batch_size=16)
    out = run(tmp_path, "torchtitan", lines, shape)
    assert out.status == Status.OK, out.reason
    assert [s["step"] for s in out.steps] == [1, 2, 3]
    assert [s["loss"] for s in out.steps] == [8.0, 7.0, 6.0]  # the last stage's, not the sentinel
    assert (out.summary["loss_first"], out.summary["loss_last"]) == (8.0, 6.0)
    assert out.summary["peak_mem_bytes"] == round(41.25 * 2**30)  # the worst rank's
    slowest = [4900 + step for step in (2, 3)]  # measured steps: the slowest rank bounds each
    times = [2048 * 16 / (t * 4) for t in slowest]
    assert out.summary["step_time_s"] == pytest.approx(statistics.median(times))
    assert out.summary["tokens_per_s"] == pytest.approx(2048 * 16 / statistics.median(times))
    assert "/ tokens_per_s" in out.derived["step_time_s"]


def test_the_torchtitan_space_reads_every_rank():
    """The ready space's template prints every rank's lines (no --local-ranks-filter)."""
    import yaml

    space = yaml.safe_load((Path(__file__).resolve().parents[2] / "search_spaces" / "torchtitan.yaml").read_text())
    assert "--local-ranks-filter" not in space["trainable"]["command"]


# ---------------------------------------------------------------------------------------------
# megatron-core 0.19.2: megatron/training/training.py training_log, training/utils/common_utils.py
# report_memory


def megatron_line(iteration, train_iters, consumed, elapsed_s, lr, batch_size, lm_loss, loss_scale, grad_norm):
    log_string = f" [{datetime(2026, 11, 26, 10, 0, 0).strftime('%Y-%m-%d %H:%M:%S.%f')}]"
    log_string += ' iteration {:8d}/{:8d} |'.format(iteration, train_iters)
    log_string += ' consumed samples: {:12d} |'.format(consumed)
    log_string += ' elapsed time per iteration (ms): {:.1f} |'.format(elapsed_s * 1000.0)
    log_string += f' throughput per GPU (TFLOP/s/GPU): {312.4:.1f} |'
    log_string += f' learning rate: {lr:.6E} |'
    log_string += f' global batch size: {batch_size:5d} |'
    log_string += ' {}: {:.6E} |'.format("lm loss", lm_loss)
    log_string += ' {}: {:.6E} |'.format("load_balancing_loss", 1.02)
    log_string += f' loss scale: {loss_scale:.1f} |'
    log_string += f' grad norm: {grad_norm:.3f} |'
    log_string += ' number of skipped iterations: {:3d} |'.format(0)
    log_string += ' number of nan iterations: {:3d} |'.format(0)
    return log_string


def megatron_memory(rank, iteration, allocated, max_allocated, reserved, max_reserved):
    mega_bytes = 1024.0 * 1024.0
    string = f'(after {iteration} iterations)' + ' memory (MB)'
    string += f" | allocated: {allocated / mega_bytes:.2f}"
    string += f" | max allocated: {max_allocated / mega_bytes:.2f}"
    string += f" | reserved: {reserved / mega_bytes:.2f}"
    string += f" | max reserved: {max_reserved / mega_bytes:.2f}"
    return "[Rank {}] {}".format(rank, string)


def test_megatron_elapsed_ms_per_iteration_and_the_memory_report(tmp_path):
    elapsed = [3.2104, 1.5013, 1.4987, 1.5121, 1.4902]
    lines = [megatron_line(i, 5, 64 * i, t, 1e-4, 64, 11.0 - i / 10, 1.0, 2.5) for i, t in enumerate(elapsed, 1)]
    lines.insert(1, " validation loss at iteration 1 | lm loss value: 1.050000E+01 | lm loss PPL: 3.6E+04 |")
    lines.insert(2, megatron_memory(0, 1, 30e9, 51e9, 52e9, 60_000_000_000))
    lines.insert(3, megatron_memory(8, 1, 30e9, 55e9, 58e9, 64_000_000_000))  # the second pipeline stage
    shape = RunShape(seq_len=1024, world_size=16, global_batch_size=64)
    out = run(tmp_path, "megatron", lines, shape)
    assert out.status == Status.OK, out.reason
    assert [s["step"] for s in out.steps] == [1, 2, 3, 4, 5]
    step_times = [float(f"{t * 1000:.1f}") / 1000 for t in elapsed[1:]]
    assert out.summary["step_time_s"] == pytest.approx(statistics.median(step_times))
    assert out.summary["tokens_per_s"] == pytest.approx(64 * 1024 / statistics.median(step_times))
    assert out.summary["peak_mem_bytes"] == round(float(f"{64e9 / 2**20:.2f}") * 2**20)
    assert out.summary["loss_first"] == pytest.approx(10.9) and out.summary["loss_last"] == pytest.approx(10.5)
    assert out.derived["step_time_s"].startswith("step_time_ms / 1000")
    assert "/ step_time_s" in out.derived["tokens_per_s"]


# ---------------------------------------------------------------------------------------------
# deepspeed 0.19.8: deepspeed/utils/timer.py ThroughputTimer.stop


def deepspeed_line(epoch, micro_step, global_step, avg, curr, mem, max_mem):
    message = ("epoch={}/micro_step={}/global_step={}, RunningAvgSamplesPerSec={}, CurrSamplesPerSec={}, "
               "MemAllocated={}GB, MaxMemAllocated={}GB".format(epoch, micro_step, global_step, avg, curr,
                                                                round(mem / 1024**3, 2), round(max_mem / 1024**3, 2)))
    return f"[2026-11-26 10:00:00,000] [INFO] [timer.py:264:stop] {message}"  # deepspeed's logger format


def test_deepspeed_samples_per_second_from_every_rank_the_slowest_counts(tmp_path):
    curr = [20.112, 41.05, 40.51, 42.8]
    lines = []
    for step, c in enumerate(curr, start=1):
        for rank_skew in (0.0, -0.7):  # two ranks print the same global step
            lines.append(deepspeed_line(0, step * 2, step, 40.3, c + rank_skew, 30 * 2**30, (50 + step) * 2**30))
    shape = RunShape(seq_len=1024, world_size=2, global_batch_size=64)
    out = run(tmp_path, "deepspeed", lines, shape)
    assert out.status == Status.OK, out.reason
    assert [s["step"] for s in out.steps] == [1, 2, 3, 4]  # each step once: the slowest rank's figure
    measured = [c - 0.7 for c in curr[1:]]
    assert out.summary["step_time_s"] == pytest.approx(statistics.median(64 / c for c in measured))
    assert out.summary["tokens_per_s"] == pytest.approx(statistics.median(measured) * 1024)
    assert out.summary["peak_mem_bytes"] == round(54.0 * 2**30)
    assert out.derived["tokens_per_s"] == "step_samples_per_s x seq_len 1024 (each step)"
    assert out.derived["step_time_s"] == "global batch 64 / step_samples_per_s (each step)"


# ---------------------------------------------------------------------------------------------
# transformers 5.23.0: trainer_callback.py PrinterCallback.on_log, trainer_utils.py speed_metrics


def hf_line(logs: dict, formatted: bool = True) -> str:
    if formatted:
        logs = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items()}
    return str(logs)


@pytest.mark.parametrize("formatted", [True, False])
def test_hf_trainer_samples_and_steps_per_second(tmp_path, formatted):
    lines = [hf_line({"loss": 6.2791, "grad_norm": 1.52, "learning_rate": 5e-05, "epoch": 0.25}, formatted),
             hf_line({"loss": 6.1012, "grad_norm": 1.49, "learning_rate": 2.5e-05, "epoch": 0.5}, formatted),
             hf_line({"train_runtime": 0.4836, "train_samples_per_second": 49.634, "train_steps_per_second": 12.409,
                      "train_loss": 6.19, "epoch": 0.5}, formatted)]
    shape = RunShape(seq_len=64, world_size=2, global_batch_size=4)
    out = run(tmp_path, "hf-trainer", lines, shape, warmup_steps=0)
    assert out.status == Status.OK, out.reason
    samples = 49.63 if formatted else 49.634
    steps = 12.41 if formatted else 12.409
    assert out.summary["samples_per_s"] == samples
    assert out.summary["tokens_per_s"] == samples * 64
    assert out.summary["step_time_s"] == 1 / steps
    assert out.summary["loss_first"] == pytest.approx(6.279 if formatted else 6.2791)
    assert len(out.steps) == 2  # the summary line's train_loss is not a step
    assert out.derived == {"tokens_per_s": f"samples_per_s {samples:g} x seq_len 64",
                           "step_time_s": f"1 / steps_per_s {steps:g}"}


@pytest.mark.slow
def test_hf_trainer_tokens_per_second_as_the_trainer_counts_them_read_from_a_real_run(tmp_path):
    """The example Trainer script run for real on this CPU with --include_num_input_tokens_seen:
    the Trainer prints train_tokens_per_second in every log dict, and its last value (the whole run,
    every rank's tokens) is tokens/s; the step time still comes from train_steps_per_second."""
    pytest.importorskip("transformers")
    from tests.autotune.study.test_hf_trainer_study import tiny_mixtral

    tiny_mixtral(tmp_path / "tiny-mixtral")
    argv = [sys.executable, "-m", "trainables.examples.hf_train", "--config_dir", "tiny-mixtral", "--seq_len", "32",
            "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--max_steps", "3",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--include_num_input_tokens_seen", "true", "--use_cpu", "true"]
    repo = str(Path(__file__).resolve().parents[2])
    out = run_command(argv, cwd=tmp_path, metrics_preset="hf-trainer", timeout_s=240, warmup_steps=1,
                      shape=RunShape(seq_len=32, world_size=1, global_batch_size=2),
                      env={"PYTHONPATH": repo, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.status == Status.OK, out.reason
    log = out.log_path.read_text()
    printed = [float(v) for v in re.findall(r"'train_tokens_per_second': '([0-9.e+-]+)'", log)]
    assert printed, log[-2000:]
    assert out.summary["tokens_per_s"] == printed[-1]
    assert out.derived["tokens_per_s"].startswith(f"run_tokens_per_s {printed[-1]:.6g}")
    steps = float(re.findall(r"'train_steps_per_second': '([0-9.e+-]+)'", log)[-1])
    assert out.summary["step_time_s"] == pytest.approx(1 / steps)


def test_deepspeed_printing_nothing_is_told_how_to_turn_its_lines_on(tmp_path):
    """A default-configured DeepSpeed prints no throughput line: the trial's reason says which two
    config keys make it print them."""
    lines = ["[2026-11-26 10:00:00,000] [INFO] [real_accelerator.py:219:get_accelerator] Setting ds_accelerator",
             "training done"]
    out = run(tmp_path, "deepspeed", lines, RunShape(seq_len=128, world_size=2, global_batch_size=8))
    assert out.status == Status.NO_METRICS
    assert '"steps_per_print": 1 and "log_level": "info"' in out.reason and "deepspeed.initialize" in out.reason


def test_a_big_rate_printed_with_an_exponent(tmp_path):
    lines = [hf_line({"loss": 2.0}), hf_line({"train_samples_per_second": 12345.6, "train_steps_per_second": 771.6})]
    out = run(tmp_path, "hf-trainer", lines, RunShape(seq_len=8, world_size=1, global_batch_size=16), 0)
    assert lines[1].startswith("{'train_samples_per_second': '1.235e+04'")
    assert out.status == Status.OK and out.summary["tokens_per_s"] == 12350.0 * 8


def test_a_preset_that_matches_nothing_says_so(tmp_path):
    lines = [megatron_line(i, 3, 8 * i, 0.5, 1e-4, 8, 9.0, 1.0, 1.0) for i in (1, 2, 3)]
    out = run(tmp_path, "torchtitan", lines, RunShape(seq_len=64, world_size=2, global_batch_size=8))
    assert out.status == Status.NO_METRICS
    assert out.reason.startswith("no metrics: the command exited 0 but no printed line matched metrics_preset "
                                 "torchtitan")
    assert "iteration 3/ 3 | consumed samples: 24 |" in out.reason  # the last lines it did print


def test_user_patterns_beside_a_preset_replace_the_same_names(tmp_path):
    patterns = preset_patterns("megatron", {"loss": r"\| lm loss: ([0-9.E+-]+) \|"})
    assert patterns["loss"] == r"\| lm loss: ([0-9.E+-]+) \|" and patterns["step_time_ms"] == \
        PRESETS["megatron"].patterns["step_time_ms"]
    with pytest.raises(ValueError, match="metrics_preset: 'nemo' is not a preset; use one of hf-trainer"):
        preset_patterns("nemo")


# ---------------------------------------------------------------------------------------------
# The ready spaces


@pytest.mark.parametrize("name, layout, flags", [
    ("hf-trainer", (1, 1, 1, 1, 2, "fp32", "none"),
     ["--nproc-per-node 1", "--per_device_train_batch_size 2", "--gradient_accumulation_steps 4", "--bf16 false",
      "--gradient_checkpointing false", "--seq_len 32"]),
    ("torchtitan", (4, 2, 1, 1, 2, "bf16", "selective"),
     ["--nproc-per-node 8", "--parallelism.tensor_parallel_degree=2", "--parallelism.expert_parallel_degree=4",
      "--parallelism.pipeline_parallel_degree=1", "--training.local_batch_size=2",
      "--training.global_batch_size=32", "--training.mixed_precision_param=bfloat16",
      "activation-checkpoint:selective"]),
    ("megatron", (4, 2, 1, 2, 2, "bf16", "selective"),
     ["--nproc-per-node 8 --nnodes 2", "--tensor-model-parallel-size 2", "--expert-model-parallel-size 4",
      "--expert-tensor-parallel-size 2", "--pipeline-model-parallel-size 1", "--micro-batch-size 2",
      "--global-batch-size 64", "--recompute-granularity selective"]),
    ("deepspeed", (4, 1, 1, 2, 2, "bf16", "full"),
     ["--nproc-per-node 8", "--ep-size 4", "--micro-batch-size 2", "--gradient-accumulation-steps 4",
      "--bf16 true", "--activation-checkpointing true"]),
])
def test_each_ready_space_loads_and_fills_the_frameworks_flags(name, layout, flags):
    import yaml

    from autotune.records.results import launch_command
    from autotune.space.layout import Layout
    from autotune.space.spec import spec_from_data

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "search_spaces" / f"{name}.yaml").read_text())
    spec = spec_from_data(data)
    assert spec.trainable.metrics_preset == name
    command = launch_command(spec, Layout(*layout))
    assert "{" not in command
    for flag in flags:
        assert flag in command, (flag, command)


def test_a_misspelled_preset_is_refused_naming_the_field():
    import yaml

    from autotune.space.spec import SpecError, spec_from_data

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "search_spaces" / "hf-trainer.yaml").read_text())
    data["trainable"]["metrics_preset"] = "hf_trainer"
    with pytest.raises(SpecError, match=r"trainable.metrics_preset: 'hf_trainer' is not one of hf-trainer, "
                                        r"torchtitan, megatron, deepspeed; did you mean 'hf-trainer'\?"):
        spec_from_data(data)
