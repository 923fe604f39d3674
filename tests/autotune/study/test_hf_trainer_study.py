"""The shipped Hugging Face space (`search_spaces/hf-trainer.yaml`) run for real: a plain `Trainer`
script training a tiny random Mixtral on CPU, unchanged, tuned through its standard flags with
`metrics_preset: hf-trainer`, at world 1 and at world 2 under torchrun (DDP on gloo)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from autotune.schema import Status
from autotune.space.spec import spec_from_data
from autotune.study.runner import RunOptions, run_study

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
SPACE = REPO / "search_spaces" / "hf-trainer.yaml"


def tiny_mixtral(folder: Path) -> None:
    """A random MoE model's config with the `tiny` preset's widths: nothing is downloaded."""
    transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, num_local_experts=8,
                               num_experts_per_tok=2, max_position_embeddings=64).save_pretrained(folder)


@pytest.mark.parametrize("world, micro_batches, trials", [(1, [2, 4], 2), (2, [2], 1)])
def test_the_hf_trainer_space_tunes_an_unchanged_trainer_script(tmp_path, world, micro_batches, trials):
    data = yaml.safe_load(SPACE.read_text())
    tiny_mixtral(tmp_path / "tiny-mixtral")  # the space reads ./tiny-mixtral from the program's folder
    data["cluster"]["ranks"] = world
    data["search"].update(world_sizes=[world], micro_batch_size=micro_batches, recompute=["none"])
    data["budget"].update(trials=trials, trial_timeout_s=240)
    data["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data["study"]["output_dir"] = str(tmp_path / "runs")
    bin_dir = str(Path(sys.executable).parent)  # torchrun of this environment, as a user's PATH has it
    data["trainable"].update(cwd=str(tmp_path), env={**data["trainable"]["env"], "PYTHONPATH": str(REPO),
                                                     "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")})
    spec = spec_from_data(data)
    result = run_study(spec, yaml.safe_dump(data), RunOptions(live=False))

    launched = [t for t in result.trials if t.status not in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID)]
    assert launched and all(t.ok for t in launched), [(t.layout.key, t.status, t.reason) for t in launched]
    seq_len = spec.search.seq_len
    for t in launched:
        assert t.layout.world_size == world
        log = (spec.study.directory() / "trials" / f"{t.number:04d}" / "node0" / "command.log").read_text()
        printed = re.findall(r"'train_samples_per_second': '([0-9.e+-]+)'", log)
        assert len(printed) == 1, log[-2000:]  # the Trainer's own final line, printed once (rank 0)
        samples = float(printed[0])
        assert t.metrics["samples_per_s"] == samples
        assert t.metrics["tokens_per_s"] == pytest.approx(samples * seq_len, rel=1e-12)
        assert t.reason.startswith("derived (metrics_preset hf-trainer): ")
        assert f"tokens_per_s = samples_per_s {samples:.6g} x seq_len {seq_len}" in t.reason
        assert t.metrics["loss_first"] > 0 and len(t.losses) == 5  # one {'loss': ...} line per step

    report_dir = spec.study.directory() / "report"
    best = json.loads((report_dir / "report.json").read_text())["best"]
    perf = best["performance"]
    assert perf["tokens_per_s"] == pytest.approx(perf["samples_per_s"] * seq_len, rel=1e-12)
    assert perf["derived"].startswith("derived (metrics_preset hf-trainer)")
    assert "Not printed by the program, computed by autotune: derived" in (report_dir / "report.md").read_text()
    command = best["launch"]["command"]
    assert f"--nproc-per-node {world}" in command and "-m trainables.examples.hf_train" in command
    assert f"--per_device_train_batch_size {best['layout']['micro_batch_size']}" in command
