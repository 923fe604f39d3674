"""Seeded synthetic token streams: learnable, reproducible, never downloaded."""

from __future__ import annotations

import torch


def synthetic_batch(vocab_size: int, batch: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """Token ids [batch, seq_len + 1] for one optimizer step of the whole global batch.

    Each row is an arithmetic progression modulo the vocabulary (random start and stride)
    with 10% of positions replaced by noise, so the loss has something to learn and every
    layout sees exactly the same data for the same (seed, step).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, vocab_size, (batch, 1), generator=g)
    stride = torch.randint(1, 8, (batch, 1), generator=g)
    tokens = (start + stride * torch.arange(seq_len + 1)) % vocab_size
    noise = torch.rand(batch, seq_len + 1, generator=g) < 0.1
    random = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=g)
    return torch.where(noise, random, tokens)
