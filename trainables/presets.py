"""Framework presets: the patterns that read each framework's standard printed log lines.

`trainable.metrics_preset: hf-trainer | torchtitan | megatron | deepspeed` lets a training
program be tuned without changing it: autotune reads the lines the framework already prints and
derives its own metrics from them (`trainables.command_metrics`). Each pattern below was written
against the framework's own logging code in the release on PyPI, named beside it (the unit tests
feed each preset lines built with those format strings). A user's `metrics_regex` may be given beside a preset: its patterns replace the
preset's of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"  # 12 | 1.5 | .5 | 1.234e+04 | 6.0E-01


@dataclass(frozen=True)
class Preset:
    name: str
    patterns: Mapping[str, str]  # metric or raw-figure name -> regex with one group
    source: str  # where the formats come from
    reads: str  # what the preset reads, in words, for error messages and the README
    enable: str = ""  # how to make the framework print those lines, where its defaults print none


PRESETS: dict[str, Preset] = {
    # transformers 5.23.0, trainer_callback.py: PrinterCallback.on_log / ProgressCallback.on_log print
    # str(logs) with floats as f"{v:.4g}" strings ({'loss': '6.279', ...}); older releases print bare
    # floats, both are read. trainer_utils.py speed_metrics: train_samples_per_second = samples of the
    # whole run (per-device batch x accumulation x world size x steps) / runtime, train_steps_per_second
    # likewise; they arrive once, in the last log dict of Trainer.train. With
    # --include_num_input_tokens_seen, Trainer.log adds train_tokens_per_second to every log dict: the
    # input tokens seen on every rank (gathered) since train() began / the time since: the last one
    # printed is the whole run's, counted by the Trainer itself (padding included unless
    # "non_padding"), and is used for tokens/s when present.
    "hf-trainer": Preset(
        "hf-trainer",
        {"loss": rf"\{{.*'loss': '?{NUM}'?",
         "samples_per_s": rf"'train_samples_per_second': '?{NUM}'?",
         "steps_per_s": rf"'train_steps_per_second': '?{NUM}'?",
         "run_tokens_per_s": rf"'train_tokens_per_second': '?{NUM}'?"},
        "transformers 5.23.0: trainer_callback.py (PrinterCallback/ProgressCallback.on_log), "
        "trainer_utils.py (speed_metrics)",
        "the Trainer's log dicts: {'loss': ...} per logging step (with 'train_tokens_per_second' under "
        "--include_num_input_tokens_seen) and {'train_samples_per_second': ..., 'train_steps_per_second': ...} "
        "at the end"),
    # torchtitan 0.3.0, components/metrics.py MetricsProcessor.log:
    #   f"step: {step:2}  loss: {loss:8.5f}  grad_norm: {g:7.4f}  memory: {max_reserved_gib:5.2f}GiB({pct:.2f}%)
    #   tps: {round(tps):,}  tflops: {tflops:,.2f}  mfu: {mfu:.2f}%" (with colour codes unless disabled),
    # through tools/logging.py's "[titan] <time> - root - INFO - " prefix on stdout. tps is tokens per
    # second per device: ntokens / (time x cp x tp x pp) with ntokens the tokens of one data-parallel
    # rank, i.e. global tokens/s / world size. Its "validate step:" lines are left out.
    "torchtitan": Preset(
        "torchtitan",
        {"step": r"^(?!.*validate step:).*\bstep:\s*(\d+)\s+loss:",
         "loss": rf"^(?!.*validate step:).*\bstep:\s*\d+\s+loss:\s*{NUM}",
         "tokens_per_s_per_device": r"^(?!.*validate step:).*\bstep:\s*\d+\s+loss:.*\btps:\s*([\d,]+)",
         "peak_mem_gib": rf"^(?!.*validate step:).*\bstep:\s*\d+\s+loss:.*\bmemory:\s*{NUM}\s*GiB"},
        "torchtitan 0.3.0: components/metrics.py (MetricsProcessor.log), tools/logging.py",
        "its step lines 'step: N  loss: ...  memory: X GiB(...)  tps: N ...'"),
    # megatron-core 0.19.2 (the wheel ships megatron/training), training/training.py training_log:
    #   " [date] iteration {:8d}/{:8d} | consumed samples: ... | elapsed time per iteration (ms): {:.1f} |
    #   ... | lm loss: {:.6E} | ..." printed by the last rank (elapsed time averaged over --log-interval);
    # training/utils/common_utils.py report_memory: "[Rank R] (after N iterations) memory (MB) |
    # allocated: x | max allocated: x | reserved: x | max reserved: x" (MB there is 2^20 bytes), printed
    # by data-parallel rank 0 of each pipeline stage: the largest "max reserved" is the peak.
    "megatron": Preset(
        "megatron",
        {"step": r"\biteration\s+(\d+)/\s*\d+\s*\|",
         "step_time_ms": rf"\biteration\s+\d+/\s*\d+\s*\|.*\belapsed time per iteration \(ms\):\s*{NUM}",
         "loss": rf"\biteration\s+\d+/\s*\d+\s*\|.*\|\s*lm loss:\s*{NUM}",
         "peak_mem_mib": rf"\bmemory \(MB\)\s*\|.*\|\s*max reserved:\s*{NUM}"},
        "megatron-core 0.19.2: megatron/training/training.py (training_log), "
        "megatron/training/utils/common_utils.py (report_memory)",
        "its 'iteration N/M | ... | elapsed time per iteration (ms): X | ... | lm loss: X |' lines and its "
        "memory report"),
    # deepspeed 0.19.8, utils/timer.py ThroughputTimer.stop, every steps_per_print steps with
    # "timers": {"throughput": {"enabled": true}} (the default):
    #   "epoch={}/micro_step={}/global_step={}, RunningAvgSamplesPerSec={}, CurrSamplesPerSec={},
    #   MemAllocated={}GB, MaxMemAllocated={}GB" through deepspeed's logger.info on every rank, each
    # with its own step time (the slowest rank's copy of a step counts). CurrSamplesPerSec =
    # train_batch_size (global) / the step's time; the memory is round(bytes / 1024**3, 2), so GiB.
    # DeepSpeed prints no loss of its own. With its defaults it prints none of these lines:
    # steps_per_print defaults to None (runtime/constants.py: no report boundary, timer.py
    # _is_report_boundary) and its logger starts at WARNING (utils/logging.py, since 0.17.6); the
    # config's "steps_per_print": 1 and "log_level": "info" (runtime/engine.py sets the logger's
    # level from it) turn them on.
    "deepspeed": Preset(
        "deepspeed",
        {"step": r"\bglobal_step=(\d+), RunningAvgSamplesPerSec=",
         "step_samples_per_s": rf"\bglobal_step=\d+, RunningAvgSamplesPerSec=.*?\bCurrSamplesPerSec={NUM}",
         "peak_mem_gib": rf"\bglobal_step=\d+, RunningAvgSamplesPerSec=.*\bMaxMemAllocated={NUM}GB"},
        "deepspeed 0.19.8: deepspeed/utils/timer.py (ThroughputTimer.stop)",
        "its throughput lines 'epoch=E/micro_step=M/global_step=N, RunningAvgSamplesPerSec=..., "
        "CurrSamplesPerSec=..., MemAllocated=...GB, MaxMemAllocated=...GB'",
        "DeepSpeed prints them only when its config has \"steps_per_print\": 1 and \"log_level\": \"info\" (its "
        "defaults, since 0.17.6, print none): add both to the DeepSpeed config the program passes to "
        "deepspeed.initialize"),
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def preset_patterns(name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A preset's patterns, with the user's own `metrics_regex` replacing those of the same name."""
    if name not in PRESETS:
        raise ValueError(f"metrics_preset: {name!r} is not a preset; use one of {', '.join(PRESET_NAMES)}")
    return {**PRESETS[name].patterns, **(extra or {})}
