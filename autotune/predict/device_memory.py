"""Memory a CUDA device holds beyond the tensors alive at the peak, as an explicit term.

The analytic model (`autotune/predict/memory.py`) predicts the caching allocator's allocated peak. A
card runs out of what the driver counts, which adds three things:

* the allocator's slack: reserved segments it keeps cached and cannot hand out for a larger
  block (fragmentation), a fraction of the allocated peak;
* what a process holds outside the allocator: the CUDA context (kernel images of torch,
  cuBLAS, cuDNN), library workspaces, and what the driver had in use before it;
* NCCL's communicator buffers, once a rank talks to a peer (world size > 1).

The figures are fields of each device profile (`autotune/space/profiles/devices.yaml`:
`mem_fragmentation`, `mem_context_bytes`, `mem_nccl_bytes`); `calibrate` fits them from
measured runs (allocated, reserved and device bytes per rank), as `benchmarks/gpu_check.py`
does on a real card. Plain arithmetic: screening calls it for every candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from autotune.space.devices import DEFAULT_FOR_DEVICE, DeviceProfile, get


@dataclass(frozen=True)
class DeviceOverhead:
    fragmentation: float  # reserved beyond allocated, as a fraction of the allocated peak
    context_bytes: int  # used beyond the reservation by a process without peers
    nccl_bytes: int  # communicator buffers of a rank that has peers

    def reserved(self, allocated: int) -> int:
        """Reserved bytes the allocator holds when `allocated` bytes are live at the peak."""
        return allocated + math.ceil(allocated * self.fragmentation)

    def device(self, allocated: int, world_size: int) -> int:
        """Bytes in use on the device at the peak: reserved, the context, and NCCL's buffers."""
        return self.reserved(allocated) + self.context_bytes + (self.nccl_bytes if world_size > 1 else 0)

    def as_profile_fields(self) -> dict[str, float | int]:
        """The same figures as devices.yaml spells them."""
        return {"mem_fragmentation": self.fragmentation, "mem_context_bytes": self.context_bytes,
                "mem_nccl_bytes": self.nccl_bytes}


def overhead_of(profile: DeviceProfile) -> DeviceOverhead:
    return DeviceOverhead(profile.mem_fragmentation, int(profile.mem_context_bytes), int(profile.mem_nccl_bytes))


@lru_cache(maxsize=None)
def overhead_for(name: str | None = None) -> DeviceOverhead:
    """A named profile's overhead terms; without a name, the default CUDA profile's."""
    return overhead_of(get(name or DEFAULT_FOR_DEVICE["cuda"]))


@dataclass(frozen=True)
class Sample:
    """One rank's measured peak: the allocator's and the driver's view."""

    allocated: int
    reserved: int
    device: int
    world_size: int = 1


def calibrate(samples: Iterable[Sample], nccl_default: int | None = None) -> DeviceOverhead:
    """Overhead terms that cover every sample (the worst case, since pruning must not let an
    out-of-memory layout through): the largest slack fraction (rounded up), the largest use
    beyond the reservation on ranks without peers, and what ranks with peers need beyond that.
    Without a sample that has peers, NCCL's term is `nccl_default` (the default profile's)."""
    samples = list(samples)
    if not samples:
        raise ValueError("calibrate needs at least one measured sample")
    frag = max((s.reserved - s.allocated) / s.allocated for s in samples if s.allocated > 0)
    alone = [s.device - s.reserved for s in samples if s.world_size == 1]
    peers = [s.device - s.reserved for s in samples if s.world_size > 1]
    context = max(alone) if alone else min(peers)
    if peers:
        nccl = max(0, max(peers) - context)
    else:
        nccl = overhead_for().nccl_bytes if nccl_default is None else nccl_default
    return DeviceOverhead(fragmentation=math.ceil(max(0.0, frag) * 1e4) / 1e4, context_bytes=max(0, int(context)),
                          nccl_bytes=int(nccl))
