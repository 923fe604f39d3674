"""A plain Hugging Face `Trainer` script, as people write them: `TrainingArguments` from the
command line, a causal LM built from a config folder, a dataset, `trainer.train()`.

Nothing in it knows autotune: a study tunes it through its standard flags and reads the
Trainer's own printed logs (`metrics_preset: hf-trainer`). The data are random token ids (no
download), so it runs anywhere, on CPU too:

    python -m trainables.examples.hf_train --config_dir CONFIG --seq_len 32 \
        --output_dir out --per_device_train_batch_size 2 --max_steps 4 --logging_steps 1 --report_to none

or under `torchrun --nproc-per-node 2 ...` for data parallel training (DDP; gloo on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments


@dataclass
class ModelArguments:
    config_dir: str = field(metadata={"help": "folder with the model's config.json (the weights start random)"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sample"})
    num_samples: int = field(default=4096, metadata={"help": "samples in the random dataset"})


class RandomTokens(torch.utils.data.Dataset):
    """Random token ids, the same on every rank (seeded), labels = inputs (causal LM)."""

    def __init__(self, vocab_size: int, seq_len: int, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (n, seq_len), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    model_args, train_args = HfArgumentParser((ModelArguments, TrainingArguments)).parse_args_into_dataclasses()
    config = AutoConfig.from_pretrained(model_args.config_dir)
    model = AutoModelForCausalLM.from_config(config)
    data = RandomTokens(config.vocab_size, model_args.seq_len, model_args.num_samples, train_args.seed)
    Trainer(model=model, args=train_args, train_dataset=data).train()


if __name__ == "__main__":
    main()
