"""Device profiles: the public peak figures the step-time model divides work by.

Profiles are data (`autotune/space/profiles/devices.yaml`, with the source of every figure), not code.
A space picks one by name (`cluster.profile: H100-SXM`), overrides some figures of one
(`cluster.profile: {base: H100-SXM, inter_node_gb_s: 25}`) or defines its own
(`cluster.profile: {name: my-gpu, peak_tflops: {bf16: 400}, ...}`). On CPU the peak FLOP/s and
memory bandwidth are measured at study start (`autotune/trials/machine.py`): no data sheet knows
this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from trainables.moe.config import math_precision

PROFILES_FILE = Path(__file__).resolve().parent / "profiles" / "devices.yaml"
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_FOR_DEVICE = {"cpu": "cpu", "cuda": "H100-SXM"}


class ProfileError(ValueError):
    """A profile name or field that does not exist, or a value that cannot be one."""


@dataclass(frozen=True)
class DeviceProfile:
    """Per-device figures (units in the field names); see devices.yaml for their meaning."""

    name: str
    peak_tflops: dict[str, float]
    hbm_gb_s: float
    intra_node_gb_s: float
    inter_node_gb_s: float
    ranks_per_node: int = 8
    # Inside a node, where an all-to-all or a send moves data at another rate than an all-reduce
    # (the cluster profile measures each); None: intra_node_gb_s.
    a2a_gb_s: float | None = None
    p2p_gb_s: float | None = None
    latency_us: float = 10.0
    launch_us: float = 10.0
    grad_overlap: float = 0.0
    # Memory a CUDA device holds beyond the allocator's live tensors (autotune/predict/device_memory.py):
    # reserved-but-unallocated slack as a fraction of the allocated peak, the device's used memory
    # beyond the reservation in a process without peers (driver, CUDA context, library
    # workspaces), and NCCL's communicator buffers once a rank has peers. Zero on CPU.
    mem_fragmentation: float = 0.0
    mem_context_bytes: int = 0
    mem_nccl_bytes: int = 0
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    extrapolated: bool = False  # not the device the study measures on

    def peak_flops(self, precision: str) -> float:
        """FLOP/s of this precision's matmuls: bf16-params (bf16 operands, no casts) as measured
        where a cluster probe measured it, else as bf16."""
        tflops = self.peak_tflops.get(precision) or self.peak_tflops.get(math_precision(precision))
        return (tflops or self.peak_tflops.get("fp32", 1.0)) * 1e12

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_NUMBERS = ("hbm_gb_s", "intra_node_gb_s", "inter_node_gb_s", "a2a_gb_s", "p2p_gb_s", "latency_us", "launch_us",
            "grad_overlap",
            "mem_fragmentation", "mem_context_bytes", "mem_nccl_bytes")


def _build(name: str, entry: dict[str, Any], where: str) -> DeviceProfile:
    known = {f.name for f in fields(DeviceProfile)} - {"extrapolated"}
    unknown = sorted(set(entry) - known - {"base"})
    if unknown:
        raise ProfileError(f"{where}: unknown field {unknown[0]!r}; use one of {', '.join(sorted(known - {'name'}))}")
    data = {k: v for k, v in entry.items() if k != "base"}
    peaks = data.get("peak_tflops")
    if not isinstance(peaks, dict) or not peaks:
        raise ProfileError(f"{where}.peak_tflops: give a mapping such as {{bf16: 989, fp32: 67}}")
    for p, v in peaks.items():
        if p not in PRECISIONS or not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ProfileError(f"{where}.peak_tflops.{p}: must be one of {', '.join(PRECISIONS)} with a positive "
                               f"number of TFLOP/s (got {v!r})")
    for k in _NUMBERS:
        v = data.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
            raise ProfileError(f"{where}.{k}: must be a number >= 0 (got {v!r})")
    for k in ("hbm_gb_s", "intra_node_gb_s", "inter_node_gb_s"):
        if k not in data or not data[k]:
            raise ProfileError(f"{where}.{k}: missing or zero; give the device's figure in GB/s")
    data["peak_tflops"] = {p: float(v) for p, v in peaks.items()}
    data["name"] = str(data.get("name", name))
    return DeviceProfile(**data)


@lru_cache(maxsize=4)
def _load(path: Path) -> dict[str, DeviceProfile]:
    raw = yaml.safe_load(path.read_text())
    return {name: _build(name, dict(entry), f"{path.name}: {name}") for name, entry in raw.items()}


def profiles(path: Path = PROFILES_FILE) -> dict[str, DeviceProfile]:
    """Every profile of the data file, by name."""
    return dict(_load(path))


def get(name: str) -> DeviceProfile:
    known = _load(PROFILES_FILE)
    if name not in known:
        raise ProfileError(f"unknown device profile {name!r}; choose one of {', '.join(known)} or define it "
                           f"in cluster.profile")
    return known[name]


def resolve(profile: str | dict[str, Any] | None, device: str) -> DeviceProfile:
    """The profile a space's cluster section means: a name, an override of one, or a new one."""
    if profile is None:
        return get(DEFAULT_FOR_DEVICE[device])
    if isinstance(profile, str):
        return get(profile)
    entry = dict(profile)
    base_name = entry.get("base")
    if base_name is None and "peak_tflops" not in entry:
        base_name = DEFAULT_FOR_DEVICE[device]
    if base_name is not None:
        base = get(str(base_name)).to_dict()
        peaks = {**base["peak_tflops"], **(entry.get("peak_tflops") or {})}
        merged = {**base, **entry, "peak_tflops": peaks}
        merged.pop("extrapolated", None)
        merged["name"] = str(entry.get("name", f"{base_name}*"))
        return _build(merged["name"], merged, "cluster.profile")
    return _build(str(entry.get("name", "custom")), entry, "cluster.profile")
