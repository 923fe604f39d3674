"""The one metric schema shared by trainables, MLflow, reports and tests.

This module imports nothing heavy: trainables import it, and so does `autotune validate`.
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    OK = "ok"
    OOM = "oom"
    TIMEOUT = "timeout"
    CRASHED = "crashed"
    INVALID = "invalid"
    PRUNED_BY_MEMORY_MODEL = "pruned_by_memory_model"
    EARLY_STOPPED = "early_stopped"
    NODE_LOST = "node_lost"
    NO_METRICS = "no_metrics"  # the program ran to its end but printed or wrote nothing autotune could read


# Memory categories on the worst rank; each has a `pred_` twin from the memory model.
MEMORY_CATEGORIES: tuple[str, ...] = (
    "mem_params_bytes",
    "mem_grads_bytes",
    "mem_optimizer_bytes",
    "mem_activations_bytes",
    "mem_other_bytes",
)

THROUGHPUT_METRICS: tuple[str, ...] = (
    "tokens_per_s",  # global, steady state: global batch x seq_len / median step time
    "step_time_s",  # median of measured steps, slowest rank
    "step_time_p90_s",
    "samples_per_s",
    "mfu",  # model FLOPs utilisation with active (top-k) parameters; absent where peak FLOP/s is unknown
)

# CUDA only, max over ranks: the caching allocator's peak reservation (allocated + cached
# segments) and the whole device's used memory at the peak as NVML reports it (adds the CUDA
# context, NCCL buffers and library workspaces). `peak_mem_bytes` is the allocated peak.
DEVICE_MEMORY_METRICS: tuple[str, ...] = ("peak_mem_reserved_bytes", "peak_mem_device_bytes")

SUMMARY_METRICS: tuple[str, ...] = THROUGHPUT_METRICS + (
    "peak_mem_bytes",  # max over ranks
    *DEVICE_MEMORY_METRICS,
    *MEMORY_CATEGORIES,
    "expert_load_imbalance",  # max tokens on one expert / mean, worst MoE layer
    "tokens_dropped_frac",
    "loss_first",
    "loss_last",
)

# Not from the trainable: autotune computes these from a trial's measured steps (autotune.search.stats),
# the 90% bootstrap interval on the median step time, recorded beside `step_time_s`.
INTERVAL_METRICS: tuple[str, ...] = ("step_time_lo_s", "step_time_hi_s")

# The step-time model's prediction for a trial (autotune/predict/steptime.py, calibrated on the trials
# measured before it was chosen), recorded beside the measured tokens_per_s and step_time_s.
PREDICTED_SPEED: tuple[str, ...] = ("pred_tokens_per_s", "pred_step_time_s")

STEP_METRICS: tuple[str, ...] = ("loss", "step_time_s", "tokens_per_s")

# Run parameters recorded for every trial (MLflow params, report columns, CLI flags).
LAYOUT_PARAMS: tuple[str, ...] = (
    "ep", "tp", "pp", "dp", "world_size", "micro_batch_size", "global_batch_size", "seq_len",
    "precision", "recompute", "schedule",
)


def pred_name(metric: str) -> str:
    return "pred_" + metric
