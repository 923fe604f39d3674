"""The ready DeepSpeed space tunes an unchanged DeepSpeed program (DeepSpeed-MoE, expert parallel
over 2 gloo ranks on this CPU), its speed read from DeepSpeed's own throughput lines; and the
same program with DeepSpeed's default config prints none, which the trial's reason explains."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from autotune.schema import Status
from autotune.space.spec import spec_from_data
from autotune.study.runner import RunOptions, run_study
from trainables.command import RunShape, run_command

deepspeed = pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
SPACE = REPO / "search_spaces" / "deepspeed.yaml"
PROGRAM = REPO / "trainables" / "examples" / "ds_train.py"
BIN_DIR = str(Path(sys.executable).parent)  # torchrun of this environment, as a user's PATH has it
ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": BIN_DIR + os.pathsep + os.environ["PATH"]}


@pytest.fixture(scope="module", autouse=True)
def shm_op():
    """DeepSpeed on CPU compiles its shared-memory collective op (a C++ extension) when its first
    process group starts: 35 s on this machine when idle, minutes when it is busy. Built here once,
    outside the trials' time limits, as a user's first DeepSpeed run on a machine would build it,
    with the trials' PATH: a different `ninja` (this environment's against the system's) hashes
    its commands differently and builds the op again."""
    from deepspeed.accelerator import get_accelerator

    path = os.environ["PATH"]
    os.environ["PATH"] = BIN_DIR + os.pathsep + path
    try:
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            builder.load()
    finally:
        os.environ["PATH"] = path


def test_the_deepspeed_space_tunes_a_deepspeed_program_that_prints_its_lines(tmp_path):
    # As the space's comment says: the program's config turns DeepSpeed's throughput lines on.
    (tmp_path / "ds_config.json").write_text(json.dumps({"steps_per_print": 1, "log_level": "info"}))
    data = yaml.safe_load(SPACE.read_text())
    data["model"] = {"preset": "tiny"}
    data["cluster"] = {"ranks": 2, "device": "cpu", "memory_gb": 2.0, "cpus_per_rank": 1}
    data["search"].update(ep=[2], world_sizes=[2], micro_batch_size=[2], global_batch_size=4, seq_len=32,
                          precision=["fp32"], recompute=["none"])
    data["budget"].update(trials=1, trial_timeout_s=240, remeasure_share=0)
    data["tracking"] = {"experiment": "deepspeed", "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    data["study"] = {"name": "deepspeed", "output_dir": str(tmp_path / "runs")}
    command = data["trainable"]["command"]
    command[command.index("train.py")] = str(PROGRAM)
    data["trainable"].update(cwd=str(tmp_path), env=ENV)
    spec = spec_from_data(data)
    result = run_study(spec, yaml.safe_dump(data), RunOptions(live=False))

    (trial,) = [t for t in result.trials if t.status not in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID)]
    assert trial.ok, trial.reason
    assert trial.layout.ep == 2 and len(trial.step_times) >= 3
    assert trial.metrics["tokens_per_s"] > 0 and trial.metrics["peak_mem_bytes"] > 0
    assert "step_samples_per_s" in trial.reason  # derived from DeepSpeed's CurrSamplesPerSec, and says so


def test_a_default_configured_deepspeed_program_prints_no_line_and_the_reason_says_what_to_add(tmp_path):
    (tmp_path / "ds_config.json").write_text("{}")  # DeepSpeed's defaults
    argv = [sys.executable, str(PROGRAM), "--deepspeed_config", "ds_config.json", "--steps", "3"]
    out = run_command(argv, cwd=tmp_path, metrics_preset="deepspeed", timeout_s=180, warmup_steps=1,
                      shape=RunShape(seq_len=32, world_size=1, global_batch_size=2),
                      env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert out.returncode == 0 and out.status == Status.NO_METRICS, out.reason
    assert '"steps_per_print": 1 and "log_level": "info"' in out.reason


def _port() -> int:
    from tests.faults import free_port

    return free_port()
