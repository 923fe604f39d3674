"""A plain DeepSpeed training script, as people write them: flags, a model with DeepSpeed-MoE
layers, `deepspeed.initialize` with the JSON config the flags name, a training loop.

Nothing in it knows autotune: a study tunes it through its flags and reads DeepSpeed's own
printed throughput lines (`metrics_preset: deepspeed`). Those lines appear only when the config
asks for them (`"steps_per_print": 1, "log_level": "info"`; DeepSpeed's defaults print none). The
data are random token ids (no download), so it runs anywhere, on CPU too (gloo):

    torchrun --nproc-per-node 2 -m trainables.examples.ds_train --deepspeed_config ds_config.json \\
        --ep-size 2 --micro-batch-size 2 --gradient-accumulation-steps 1 --seq-len 32 --steps 4
"""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from deepspeed.moe.layer import MoE


class Expert(torch.nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Net(torch.nn.Module):
    def __init__(self, vocab: int, d: int, hidden: int, experts: int, ep_size: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.moes = torch.nn.ModuleList(MoE(hidden_size=d, expert=Expert(d, hidden), num_experts=experts,
                                            ep_size=ep_size, k=2) for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab)
        self.recompute = False

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, aux = self.embed(ids), 0.0
        for moe in self.moes:
            y, loss, _ = (torch.utils.checkpoint.checkpoint(moe, x, use_reentrant=False) if self.recompute
                          else moe(x))
            x, aux = x + y, aux + loss
        return self.head(x), aux


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ep-size", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--bf16", default="false")
    p.add_argument("--activation-checkpointing", default="false", help="recompute each MoE layer in backward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1)  # set by DeepSpeed's own launcher
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args()
    with open(args.deepspeed_config) as f:
        config = json.load(f)
    config.update(train_micro_batch_size_per_gpu=args.micro_batch_size,
                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                  bf16={"enabled": args.bf16.lower() == "true"})
    deepspeed.init_distributed()
    torch.manual_seed(args.seed)
    net = Net(vocab=256, d=64, hidden=128, experts=8, ep_size=args.ep_size, layers=2)
    net.recompute = args.activation_checkpointing.lower() == "true"
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)  # torch's: no compiled op needed
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    gen = torch.Generator().manual_seed(args.seed + engine.global_rank)
    for _ in range(args.steps):
        for _ in range(args.gradient_accumulation_steps):
            ids = torch.randint(0, 256, (args.micro_batch_size, args.seq_len + 1), generator=gen).to(engine.device)
            logits, aux = engine(ids[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, 256), ids[:, 1:].reshape(-1)) + 0.01 * aux
            engine.backward(loss)
            engine.step()


if __name__ == "__main__":
    main()
