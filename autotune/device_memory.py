"""Memory a CUDA device holds beyond the tensors alive at the peak, as an explicit term.

The analytic model (`autotune/memory.py`) predicts the caching allocator's allocated peak. A
card runs out of what the driver counts, which adds three things:

* the allocator's slack: reserved segments it keeps cached and cannot hand out for a larger
  block (fragmentation), a fraction of the allocated peak plus a fixed remainder;
* the CUDA context of the process (kernel images of torch, cuBLAS, cuDNN; their workspaces);
* NCCL's communicator buffers, once a rank talks to a peer (world size > 1).

Each profile in `autotune/profiles/cuda_memory.json` gives these figures; `calibrate` fits them
from measured trials (allocated, reserved and device bytes per rank), as
`benchmarks/gpu_check.py` does on a real card. Plain arithmetic and the standard library only:
screening calls it for every candidate, and the GPU check runs where no tuner is installed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

PROFILES = Path(__file__).resolve().parent / "profiles" / "cuda_memory.json"
DEFAULT_PROFILE = "cuda"


@dataclass(frozen=True)
class DeviceOverhead:
    fragmentation: float  # reserved beyond allocated, as a fraction of the allocated peak
    reserved_fixed_bytes: int  # ... and a fixed remainder (segment rounding)
    context_bytes: int  # CUDA context, kernels and library workspaces of one process
    nccl_bytes: int  # communicator buffers of a rank that has peers
    source: str = ""

    def reserved(self, allocated: int) -> int:
        """Reserved bytes the allocator holds when `allocated` bytes are live at the peak."""
        return allocated + math.ceil(allocated * self.fragmentation) + self.reserved_fixed_bytes

    def device(self, allocated: int, world_size: int) -> int:
        """Bytes in use on the device at the peak: reserved, the context, and NCCL's buffers."""
        return self.reserved(allocated) + self.context_bytes + (self.nccl_bytes if world_size > 1 else 0)


@lru_cache(maxsize=None)
def profiles(path: str = str(PROFILES)) -> dict[str, DeviceOverhead]:
    data = json.loads(Path(path).read_text())
    fields = DeviceOverhead.__dataclass_fields__
    return {name: DeviceOverhead(**{k: v for k, v in entry.items() if k in fields})
            for name, entry in data.items() if not name.startswith("_")}


def overhead_for(profile: str | None = None) -> DeviceOverhead:
    """A profile's overhead terms; an unknown name falls back to the generic CUDA profile."""
    table = profiles()
    return table.get(profile or DEFAULT_PROFILE) or table[DEFAULT_PROFILE]


@dataclass(frozen=True)
class Sample:
    """One rank's measured peak: the allocator's and the driver's view."""

    allocated: int
    reserved: int
    device: int
    world_size: int = 1


def calibrate(samples: Iterable[Sample], source: str = "") -> DeviceOverhead:
    """Overhead terms that cover every sample (the worst case, since pruning must not let an
    out-of-memory layout through): the largest slack fraction, the largest context beyond the
    reservation on ranks without peers, and what ranks with peers need beyond that."""
    samples = list(samples)
    if not samples:
        raise ValueError("calibrate needs at least one measured sample")
    frag = max((s.reserved - s.allocated) / s.allocated for s in samples if s.allocated > 0)
    alone = [s.device - s.reserved for s in samples if s.world_size == 1]
    peers = [s.device - s.reserved for s in samples if s.world_size > 1]
    context = max(alone) if alone else min(peers)
    nccl = max(0, max(peers) - context) if peers else overhead_for().nccl_bytes
    return DeviceOverhead(fragmentation=math.ceil(max(0.0, frag) * 1e4) / 1e4, reserved_fixed_bytes=0,
                          context_bytes=max(0, int(context)), nccl_bytes=int(nccl), source=source)


def as_profile(overhead: DeviceOverhead) -> dict[str, object]:
    """The JSON entry for `profiles/cuda_memory.json`."""
    return asdict(overhead)
