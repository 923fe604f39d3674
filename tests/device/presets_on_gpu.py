"""GPU check of the presets: the shipped spaces' own command templates (search_spaces/hf-trainer.yaml,
search_spaces/torchtitan.yaml), filled for one GPU and run for real through
`trainables.command.run_command`, which reads their printed lines with the presets.

Not part of the test suite (it needs a GPU, and torchtitan with its assets): run from the
repository root on a GPU machine with torch and transformers installed,

    OUT=out TORCHTITAN_TOKENIZER=/path/to/torchtitan/tests/assets/tokenizer \
        python tests/device/presets_on_gpu.py

It writes `gpu_check.json` (status, reason, summary, derived figures, steps) and each command's
log to $OUT. Autotune's study itself (Ray, Optuna, MLflow) is not needed: this checks the
templates and the presets. The torchtitan data are random words in its c4_test layout.
"""
import json
import os
import random
import time
from pathlib import Path

import yaml

from trainables.command import CommandOutcome, RunShape, layout_spellings, render_argv, run_command

OUT = Path(os.environ.get("OUT", "device-out"))
OUT.mkdir(parents=True, exist_ok=True)
repo = Path.cwd()  # the repository root
TOKENIZER = Path(os.environ.get("TORCHTITAN_TOKENIZER", "tests/assets/tokenizer"))
results: dict[str, dict] = {}

def titan() -> CommandOutcome:
    work = Path("/tmp/tt"); (work / "tests/assets/c4_test").mkdir(parents=True, exist_ok=True)
    (work / "tests/assets/tokenizer").mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (work / "tests/assets/tokenizer" / f).write_text((TOKENIZER / f).read_text())
    rnd = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    with open(work / "tests/assets/c4_test/data.json", "w") as fh:
        for i in range(3000):
            fh.write(json.dumps({"text": " ".join(rnd.choice(words) for _ in range(400)), "timestamp": "", "url": ""}) + "\n")
    space = yaml.safe_load((repo / "search_spaces/torchtitan.yaml").read_text())
    values = dict(ep=1, tp=1, pp=1, dp=1, micro_batch_size=4, global_batch_size=4, seq_len=512, world_size=1,
                  seed=0, precision="bf16", recompute="selective", schedule="1f1b", nproc=1, nnodes=1, node_rank=0,
                  master_addr="127.0.0.1", master_port=29511, trial_dir=str(work / "out"),
                  metrics_file=str(work / "m.jsonl"))
    values.update(layout_spellings("bf16", "selective", 4, 4, 1, 1))
    argv = render_argv(space["trainable"]["command"], values)
    argv[0] = "torchrun"
    out = run_command(argv, cwd=work, metrics_preset="torchtitan", timeout_s=300, warmup_steps=3,
                      shape=RunShape(seq_len=512, world_size=1, global_batch_size=4),
                      env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    (OUT / "titan.log").write_text(out.log_path.read_text()[-200000:])
    return out

def hf() -> CommandOutcome:
    work = Path("/tmp/hf"); work.mkdir(exist_ok=True)
    from transformers import MixtralConfig
    MixtralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                  max_position_embeddings=1024).save_pretrained(work / "tiny-mixtral")
    space = yaml.safe_load((repo / "search_spaces/hf-trainer.yaml").read_text())
    values = dict(ep=1, tp=1, pp=1, dp=1, micro_batch_size=8, global_batch_size=8, seq_len=512, world_size=1,
                  seed=0, precision="bf16", recompute="none", schedule="1f1b", nproc=1, nnodes=1, node_rank=0,
                  master_addr="127.0.0.1", master_port=29512, trial_dir=str(work / "out"),
                  metrics_file=str(work / "m.jsonl"))
    values.update(layout_spellings("bf16", "none", 8, 8, 1, 1))
    argv = render_argv(space["trainable"]["command"], values)
    argv = [a if a != "gloo" else "nccl" for a in argv]
    out = run_command(argv, cwd=work, metrics_preset="hf-trainer", timeout_s=200, warmup_steps=1,
                      shape=RunShape(seq_len=512, world_size=1, global_batch_size=8),
                      env={"PYTHONPATH": str(repo) + ":" + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"})
    (OUT / "hf.log").write_text(out.log_path.read_text()[-100000:])
    return out

for name, fn in (("hf-trainer", hf), ("torchtitan", titan)):
    t0 = time.time()
    try:
        out = fn()
        results[name] = {"status": out.status.value, "reason": out.reason, "summary": out.summary,
                         "derived": out.derived, "steps": out.steps, "wall_s": time.time() - t0}
    except Exception as exc:
        results[name] = {"error": repr(exc)}
    print(name, json.dumps(results[name])[:3000], flush=True)
(OUT / "gpu_check.json").write_text(json.dumps(results, indent=1))
