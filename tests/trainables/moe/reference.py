"""The expert computation as it ran before the grouped GEMMs: a Python loop over experts with one
copy of the group sizes to the host. Kept as the reference the grouped path is tested against,
and as the kernel-efficiency benchmark's baseline (`benchmarks/kernel_efficiency.py`); never
used by the product."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from trainables.moe.model import GroupedExperts

MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "addmv", "mv", "dot")


def looped_experts(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    outs = []
    for e, xe in enumerate(torch.split(x, counts.tolist())):
        h = F.silu(xe @ experts.w1[e]) * (xe @ experts.w3[e])
        outs.append(h @ experts.w2[e])
    return torch.cat(outs) if outs else x.new_zeros(0, experts.w2.shape[-1])


@contextlib.contextmanager
def looped() -> Iterator[None]:
    """Every GroupedExperts (plain, or expert-parallel: DistributedExperts calls the base's
    forward between its all-to-alls) runs the loop while inside."""
    original = GroupedExperts.forward
    GroupedExperts.forward = looped_experts
    try:
        yield
    finally:
        GroupedExperts.forward = original


class MatmulCount(TorchDispatchMode):
    """Matrix-multiply kernels dispatched while active (forward and backward), by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMUL_OPS:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())
