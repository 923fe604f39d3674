"""The built-in trainable's run config for a layout of a space: what a trial's ranks run and what
the report's launch command spells out (imports nothing heavy)."""

from __future__ import annotations

from typing import Any

from autotune.space.layout import Layout
from autotune.space.spec import Spec


def run_config_for(spec: Spec, layout: Layout, **extra: Any):
    """The trainable's config for a layout of this space (imports nothing heavy)."""
    from trainables.moe.run_config import RunConfig

    return RunConfig(
        model=spec.model.preset, model_overrides=spec.model.overrides(), ep=layout.ep, tp=layout.tp,
        pp=layout.pp, dp=layout.dp, micro_batch_size=layout.micro_batch_size,
        global_batch_size=spec.search.global_batch_size, seq_len=spec.search.seq_len,
        precision=layout.precision, recompute=layout.recompute, schedule=layout.schedule,
        steps=spec.budget.measure_steps, warmup_steps=spec.budget.warmup_steps, seed=spec.study.seed,
        device=spec.cluster.device, **extra,
    )
