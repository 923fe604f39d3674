"""Device profiles: the public peak figures the step-time model divides work by.

Profiles are data (`autotune/profiles/devices.yaml`, with the source of every figure), not code.
A space picks one by name (`cluster.profile: H100-SXM`), overrides some figures of one
(`cluster.profile: {base: H100-SXM, inter_node_gb_s: 25}`) or defines its own
(`cluster.profile: {name: my-gpu, peak_tflops: {bf16: 400}, ...}`). On CPU the peak FLOP/s and
memory bandwidth are measured at study start (`measure_cpu`): no data sheet knows this machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import yaml

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
    latency_us: float = 10.0
    launch_us: float = 10.0
    grad_overlap: float = 0.0
    # Memory a CUDA device holds beyond the allocator's live tensors (autotune/device_memory.py):
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
        return self.peak_tflops.get(precision, self.peak_tflops.get("fp32", 1.0)) * 1e12

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_NUMBERS = ("hbm_gb_s", "intra_node_gb_s", "inter_node_gb_s", "latency_us", "launch_us", "grad_overlap",
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


def measure_cpu(base: DeviceProfile | None = None, seconds: float = 0.3,
                shapes: Sequence[tuple[int, int, int]] = ((256, 256, 256),)) -> DeviceProfile:
    """This machine's fp32/bf16 matmul rate and copy bandwidth, one core's worth (a rank gets a
    core or less): the CPU profile's figures no data sheet has. About `seconds` in all.

    `shapes` (m, k, n): the study's own matmuls (e.g. a micro-batch's tokens x width x hidden at
    the smallest and largest micro-batch, and an expert's share of them); each precision's rate
    is their FLOPs over their summed time, as a step runs all of them. A CPU's low-precision rate
    depends on the size more than fp32's: with autocast's casts of both operands (a training step
    pays them on every call), 512x64x128 ran 1.5x faster in bf16 than in fp32 here, 128x64x128
    2.2x slower, so one large shape alone ranked bf16 layouts first where they ran 2.5x slower."""
    import torch

    base = base or get("cpu")
    shapes = [tuple(int(v) for v in s) for s in shapes] or [(256, 256, 256)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peaks = {}
        operands = [(torch.randn(m, k), torch.randn(k, n_)) for m, k, n_ in shapes]
        flops = sum(2 * m * k * n_ for m, k, n_ in shapes)
        share = seconds / 3 / (2 * len(shapes))
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            total = 0.0
            for a, b in operands:
                a.to(dtype) @ b.to(dtype)
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < share:
                    a.to(dtype) @ b.to(dtype)
                    n += 1
                total += (time.perf_counter() - start) / n
            peaks[precision] = flops / total / 1e12
        peaks["fp16"] = peaks["bf16"]
        x = torch.empty(4 << 20)  # 16 MB, beyond the caches
        y = torch.empty_like(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            y.copy_(x)
            n += 1
        hbm = 2 * x.numel() * 4 * n / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(threads)
    return replace(base, peak_tflops=peaks, hbm_gb_s=hbm,
                   sources={**base.sources, "measured": f"measure_cpu at {time.strftime('%Y-%m-%dT%H:%M:%S')}"})
