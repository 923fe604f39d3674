"""Averaging gradients over the ranks that hold the same shard.

Two ways, selected by `--grad-sync`:

* `bucketed` (the default, what production frameworks do): every gradient lives, from the
  start, as a view into one of a few flat bucket buffers (PyTorch DDP's
  `gradient_as_bucket_view`, Megatron-Core's contiguous grad buffer). A post-accumulate hook
  counts the micro-batches each parameter has seen; when every parameter of a bucket has its
  last micro-batch's gradient, the bucket's all-reduce starts asynchronously while backward
  goes on with the layers before it. Buckets are launched strictly in their fixed order, so
  every replica issues the same collectives in the same sequence whatever order autograd
  happens to finish them in. Nothing is copied: the all-reduce runs in place on the buffer.
* `flat` (the former path, kept to measure against): after backward, every gradient is copied
  into one new flat buffer per group, which is all-reduced with nothing left to overlap.

With bf16 parameters (`--precision bf16-params`) the gradients that are accumulated, reduced and
handed to the optimizer are fp32 "main gradients" (`param.main_grad`, Megatron-Core's name):
backward makes each parameter's bf16 gradient, a post-accumulate hook adds it into the main
gradient and frees it, so the bf16 gradient lives for one parameter at a time. The bucketed mode's
buckets then hold the main gradients.

Dense gradients are averaged over the dp * ep ranks that saw different tokens, expert
gradients summed over the dp ranks holding the same experts and divided by dp * ep as well:
each rank's loss is the mean over its own tokens, and the all-to-all has already brought the
gradients of every EP peer's tokens to the expert's owner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from trainables.moe.config import DEFAULT_BUCKET_MB, GRAD_SYNC_MODES, ParallelDims



def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient the optimizer steps on: the fp32 main gradient where there is one."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def _into_main_grad(p: torch.Tensor) -> None:
    """Add the bf16 gradient backward just made into the fp32 main gradient, and free it."""
    p.main_grad.add_(p.grad)
    p.grad = None


def grad_divisor(dims: ParallelDims, is_expert: bool) -> int:
    """What a summed gradient is divided by: the number of data-parallel replicas, dp * ep, for
    dense and expert parameters alike (see the module docstring)."""
    return dims.data_replicas


@dataclass(frozen=True)
class SyncGroup:
    """Parameters averaged together: the ranks they are summed over and the divisor."""

    group: dist.ProcessGroup | None  # None: a group of one, nothing to send
    divisor: int


@dataclass
class Bucket:
    """A flat buffer whose slices are the gradients of `params`, reduced as one message."""

    buffer: torch.Tensor
    params: list[nn.Parameter]
    sync: SyncGroup
    pending: int = 0
    work: object | None = None
    launched: bool = False


@dataclass
class BucketedGradSync:
    """Reduce gradients during backward, bucket by bucket (see the module docstring)."""

    buckets: list[Bucket]
    micro_batches: int = 1
    main_grads: bool = False
    _seen: dict[int, int] = field(default_factory=dict)
    _bucket_of: dict[int, int] = field(default_factory=dict)
    _next: int = 0
    _hooks: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, b in enumerate(self.buckets):
            for p in b.params:
                self._bucket_of[id(p)] = i
                if self.main_grads:  # first: the bucket is reduced only once the main gradient has it
                    self._hooks.append(p.register_post_accumulate_grad_hook(_into_main_grad))
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    @property
    def buffer_bytes(self) -> int:
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)

    def begin(self, micro_batches: int) -> None:
        """Arm for one optimizer step of `micro_batches` backward passes per parameter."""
        self.micro_batches = micro_batches
        self._seen.clear()
        self._next = 0
        for b in self.buckets:
            b.pending, b.work, b.launched = len(b.params), None, False

    def _on_grad(self, p: torch.Tensor) -> None:
        # Once per backward pass per parameter (a parameter used twice in one pass is summed
        # before its accumulation node runs), so the count is the micro-batch index.
        key = id(p)
        seen = self._seen.get(key, 0) + 1
        self._seen[key] = seen
        if seen != self.micro_batches:
            return  # gradient accumulation: only the last micro-batch's gradient is final
        self.buckets[self._bucket_of[key]].pending -= 1
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, b: Bucket) -> None:
        b.launched = True
        if b.sync.group is not None:
            b.work = dist.all_reduce(b.buffer, group=b.sync.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket (launching any whose parameters got no gradient), then average."""
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
            if b.sync.divisor > 1:
                b.buffer.div_(b.sync.divisor)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


@dataclass
class FlatGradSync:
    """After backward: one flat copy of each group's gradients, all-reduced, copied back."""

    groups: list[tuple[SyncGroup, list[nn.Parameter]]]
    buffer_bytes: int = 0
    _hooks: list = field(default_factory=list)

    def begin(self, micro_batches: int) -> None:
        pass

    def finish(self) -> None:
        for sync, params in self.groups:
            grads = [g for g in map(grad_of, params) if g is not None]
            if not grads:
                continue
            if sync.group is not None:
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, group=sync.group)
                flat.div_(sync.divisor)
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
            elif sync.divisor > 1:
                for g in grads:
                    g.div_(sync.divisor)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


GradSync = BucketedGradSync | FlatGradSync


def _split(params: list[nn.Parameter], is_expert: list[bool], dims: ParallelDims,
           dense_group: dist.ProcessGroup, expert_group: dist.ProcessGroup
           ) -> list[tuple[SyncGroup, list[nn.Parameter]]]:
    out = []
    for expert, group, size in ((False, dense_group, dims.data_replicas), (True, expert_group, dims.dp)):
        mine = [p for p, e in zip(params, is_expert) if e == expert]
        if mine:
            out.append((SyncGroup(group if size > 1 else None, grad_divisor(dims, expert)), mine))
    return out


def build_grad_sync(mode: str, params: list[nn.Parameter], is_expert: list[bool], dims: ParallelDims,
                    dense_group: dist.ProcessGroup, expert_group: dist.ProcessGroup,
                    bucket_mb: float = DEFAULT_BUCKET_MB, main_grads: bool = False) -> GradSync:
    """The gradient averaging of one rank. `params` in registration order (the order of
    `named_parameters()`, duplicates removed); buckets fill from the last one, the first whose
    gradients backward produces. With `main_grads`, fp32 main gradients are made for the
    (bf16) parameters and accumulated into (see the module docstring)."""
    groups = _split(params, is_expert, dims, dense_group, expert_group)
    if mode == "flat":
        flat = FlatGradSync(groups)
        if main_grads:
            for p in params:
                p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                flat._hooks.append(p.register_post_accumulate_grad_hook(_into_main_grad))
        return flat
    if mode != "bucketed":
        raise ValueError(f"grad sync {mode!r}: choose one of {', '.join(GRAD_SYNC_MODES)}")
    cap = max(1, int(bucket_mb * 2**20))
    buckets: list[Bucket] = []
    for sync, mine in groups:
        chunks: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in reversed(mine):
            nbytes = p.numel() * (4 if main_grads else p.element_size())
            if chunks[-1] and (size + nbytes > cap or p.dtype != chunks[-1][0].dtype):
                chunks.append([])
                size = 0
            chunks[-1].append(p)
            size += nbytes
        for chunk in chunks:
            dtype = torch.float32 if main_grads else chunk[0].dtype
            buffer = torch.zeros(sum(p.numel() for p in chunk), dtype=dtype, device=chunk[0].device)
            offset = 0
            for p in chunk:
                # The gradient is a view of the bucket from now on: accumulation adds into it in
                # place, and the optimizer zeroes it in place (zero_grad(set_to_none=False)).
                view = buffer[offset:offset + p.numel()].view(p.shape)
                if main_grads:
                    p.main_grad = view
                else:
                    p.grad = view
                offset += p.numel()
            buckets.append(Bucket(buffer, chunk, sync))
    # One launch order for both groups: by where backward reaches each bucket's first gradient,
    # so a layer's expert bucket does not wait behind the dense buckets of earlier layers.
    position = {id(p): i for i, p in enumerate(params)}
    buckets.sort(key=lambda b: -position[id(b.params[0])])
    return BucketedGradSync(buckets, main_grads=main_grads)
