"""What one run is: model, layout, step shape and budget. Free of torch, so the tuner can
build, validate and print it without importing a deep-learning framework."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from trainables.moe.config import DEFAULT_BUCKET_MB, PRESETS, ModelConfig, ParallelDims, RunShape, layout_problems, preset


OPTIMIZERS = ("adamw", "sgd")


class LayoutError(ValueError):
    """The layout breaks a structural rule; raised before any process group starts."""


@dataclass(frozen=True)
class RunConfig:
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    ep: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 2
    global_batch_size: int = 8
    seq_len: int = 64
    precision: str = "fp32"
    recompute: str = "none"
    schedule: str = "1f1b"
    stage_layers: tuple[int, ...] | None = None
    steps: int = 5  # measured steps, after the warm-up steps
    warmup_steps: int = 1
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.01
    device: str = "auto"  # auto | cpu | cuda
    memory_probe: bool = True  # one extra tracked step after the measured ones
    peak_tflops: float | None = None  # per device; overrides the built-in table (needed for MFU on CPU)
    timeout_s: float | None = None  # process-group timeout
    memory_limit_bytes: int | None = None  # per rank: going over it is an out-of-memory error
    grad_sync: str = "bucketed"  # bucketed: reduced during backward | flat: one copy after it
    bucket_mb: float = DEFAULT_BUCKET_MB  # bucket size of the bucketed gradient reduction
    optimizer: str = "adamw"  # adamw | sgd (plain SGD: what the gradient parity tests also run)
    measure_alone: bool = False  # time the steps under the machine's measuring lock (measure.timed_alone)

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(pp=self.pp, dp=self.dp, ep=self.ep, tp=self.tp)

    @property
    def shape(self) -> RunShape:
        return RunShape(self.micro_batch_size, self.global_batch_size, self.seq_len, self.precision,
                        self.recompute, self.schedule, self.stage_layers, self.grad_sync)

    def model_config(self) -> ModelConfig:
        return replace(preset(self.model), **self.model_overrides)

    def problems(self, ranks_available: int | None = None) -> list[str]:
        out = []
        if self.model not in PRESETS:
            return [f"unknown model preset {self.model!r}: choose one of {', '.join(PRESETS)}"]
        unknown = set(self.model_overrides) - set(ModelConfig.__dataclass_fields__)
        if unknown:
            return [f"unknown model field(s) {', '.join(sorted(unknown))}"]
        if self.steps < 1:
            out.append(f"steps must be >= 1 (got {self.steps})")
        if self.warmup_steps < 0:
            out.append(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if not self.bucket_mb > 0:
            out.append(f"bucket_mb must be > 0 (got {self.bucket_mb})")
        if self.optimizer not in OPTIMIZERS:
            out.append(f"optimizer {self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        return out + layout_problems(self.model_config(), self.dims, self.shape, ranks_available)

    def check(self, ranks_available: int | None = None) -> None:
        problems = self.problems(ranks_available)
        if problems:
            raise LayoutError("; ".join(problems))

    def argv(self) -> list[str]:
        """The command-line flags that reproduce this run exactly."""
        out = ["--model", self.model]
        if self.model_overrides:
            out += ["--model-config", json.dumps(self.model_overrides, sort_keys=True, separators=(",", ":"))]
        for name in ("ep", "tp", "pp", "dp", "micro_batch_size", "global_batch_size", "seq_len", "precision",
                     "recompute", "schedule", "steps", "warmup_steps", "seed", "lr", "weight_decay", "device"):
            out += ["--" + name.replace("_", "-"), str(getattr(self, name))]
        if self.stage_layers is not None:
            out += ["--stage-layers", ",".join(map(str, self.stage_layers))]
        if self.peak_tflops is not None:
            out += ["--peak-tflops", str(self.peak_tflops)]
        if self.memory_limit_bytes is not None:
            out += ["--memory-limit-gb", repr(self.memory_limit_bytes / 1e9)]
        if not self.memory_probe:
            out += ["--no-memory-probe"]
        # Written only when not the default, so launch commands stay as short as before.
        if self.grad_sync != "bucketed":
            out += ["--grad-sync", self.grad_sync]
        if self.bucket_mb != DEFAULT_BUCKET_MB:
            out += ["--bucket-mb", str(self.bucket_mb)]
        if self.optimizer != "adamw":
            out += ["--optimizer", self.optimizer]
        return out
