"""Memory and speed measurements of a running rank.

Parameter, gradient and optimizer bytes are counted exactly from the tensors. The peak and
its split into activations and the rest come from one tracked step: on CPU from a dispatch
mode that follows every storage's life (CPU tensors have no allocator statistics), on CUDA
from the caching allocator's peak, split the same way. On CUDA the peak is also taken as the
device sees it: what the allocator reserved (allocated plus its cached, fragmented segments) and
what the driver reports in use on the whole device (NVML: the CUDA context, NCCL buffers and
library workspaces besides), since that is what runs out on a real card.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
# No public API sees every allocation of a CPU step: CPU tensors have no allocator statistics,
# `torch.profiler(profile_memory=True)` reports allocations but not which storage dies when,
# and `TorchFunctionMode` (public) misses the ops autograd runs in backward. A dispatch mode is
# the one hook below autograd; torch 2.13 exposes it only under this module path.
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary



def _storage_bytes(tensors: Iterator[torch.Tensor], device: torch.device) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or t.device != device:
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


@dataclass(frozen=True)
class StateBytes:
    params: int
    grads: int
    optimizer: int


def _grads(params: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The gradients the optimizer steps on: fp32 main gradients where the parameters have them
    (bf16 parameters), else `.grad`."""
    for p in params:
        main = getattr(p, "main_grad", None)
        yield main if main is not None else p.grad


def _masters(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What the optimizer steps that is not a parameter of the module: fp32 master weights."""
    own = {id(p) for p in module.parameters()}
    return [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]


def resident_bytes(module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Parameters, module buffers, gradient buffers and master weights allocated up front: what
    exists before the first step."""
    params = list(module.parameters())
    return _storage_bytes(iter([*params, *module.buffers(), *_grads(params), *_masters(module, optimizer)]),
                          device)


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> StateBytes:
    """Exact bytes of what persists between steps, on this rank's device (master weights count
    with the optimizer's states, as they are the optimizer's copy)."""
    params = list(module.parameters())
    opt = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return StateBytes(
        params=_storage_bytes(iter(params), device),
        grads=_storage_bytes(_grads(params), device),
        optimizer=_storage_bytes(iter([*opt, *_masters(module, optimizer)]), device),
    )


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor in an op's arguments or results (nested tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class LiveMemory(TorchDispatchMode):
    """Bytes of every storage created while active, followed until it dies.

    With a limit, going over it raises torch.OutOfMemoryError at the allocation that crosses
    it: a CPU rank gets the same failure a GPU's allocator would give. Each storage is tagged
    with the phase that created it: `forward` (activations and what
    the forward keeps), `backward` (gradient temporaries, recomputed activations, buffers of
    the return trip) or `optimizer`. Entering it for the first step catches what persists
    from then on (gradients, optimizer states, pipeline receive buffers); entering it again
    for a later step measures that step's peak over everything still alive.
    """

    def __init__(self, resident: int = 0, limit_bytes: int | None = None) -> None:
        super().__init__()
        self.resident, self.limit = resident, limit_bytes
        self.live = {"forward": 0, "backward": 0, "optimizer": 0}
        self.peak = 0
        self.peak_split: dict[str, int] = dict(self.live)
        self._known = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}
        self._in_optimizer = False
        self._hooks: list = []

    def _phase(self) -> str:
        if self._in_optimizer:
            return "optimizer"
        # No public query says "autograd is running a backward"; this binding is what
        # torch.autograd.graph itself uses for the same question (torch 2.13).
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def _freed(self, key: int, phase: str, size: int, _ref: weakref.ref) -> None:
        self.live[phase] -= size
        self._refs.pop(key, None)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._known or st.nbytes() == 0 or st.device.type == "meta":
            return
        phase, size = self._phase(), st.nbytes()
        self._known[st] = phase
        key = id(st)
        self._refs[key] = weakref.ref(st, functools.partial(self._freed, key, phase, size))
        self.live[phase] += size
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.peak_split = total, dict(self.live)
        if self.limit is not None and self.resident + total > self.limit:
            raise torch.OutOfMemoryError(
                f"tried to hold {(self.resident + total) / 1e6:,.2f} MB on this rank, over its memory limit "
                f"of {self.limit / 1e6:,.2f} MB")

    def reset_peak(self) -> None:
        self.peak, self.peak_split = sum(self.live.values()), dict(self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Outputs that alias an input (views, in-place ops) allocated nothing new.
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out

    def __enter__(self):
        def pre(*_a):
            self._in_optimizer = True

        def post(*_a):
            self._in_optimizer = False

        self._hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)


@dataclass(frozen=True)
class PeakMemory:
    peak: int
    activations: int
    other: int
    reserved: int | None = None  # CUDA: the caching allocator's peak reservation
    device: int | None = None  # CUDA: memory in use on the whole device at the peak (driver's view)
    device_source: str = ""  # "nvml" or "cudaMemGetInfo"


def device_used_bytes(device: torch.device) -> tuple[int, str]:
    """Memory in use on the whole device, as `nvidia-smi` shows it, and where the figure came from.

    NVML (`nvidia-ml-py`, the optional `gpu` extra) through torch, which maps the index through
    CUDA_VISIBLE_DEVICES; without it the runtime's free/total (cudaMemGetInfo), which counts the
    same allocations.
    """
    try:
        return int(torch.cuda.device_memory_used(device)), "nvml"
    except Exception:  # no pynvml, an older torch, or NVML refused: the runtime knows it too
        free, total = torch.cuda.mem_get_info(device)
        return int(total - free), "cudaMemGetInfo"


def measure_peak(live: LiveMemory, resident: int, state: StateBytes, device: torch.device,
                 step: Callable[[], object]) -> PeakMemory:
    """Run `step` under the tracker; split its peak into state, activations and the rest.

    `resident` is what existed before tracking began (parameters and module buffers).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    live.reset_peak()
    with live:
        step()
    tracked_peak = resident + live.peak
    act = live.peak_split["forward"]
    reserved = used = None
    source = ""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
        reserved = int(torch.cuda.max_memory_reserved(device))
        # The allocator keeps its segments cached after the step, so the device is still as full
        # as at the peak (the stat is the peak reservation; the driver's count is read now).
        used, source = device_used_bytes(device)
    else:
        peak = tracked_peak
    known = state.params + state.grads + state.optimizer
    act = max(0, min(act, peak - known))
    return PeakMemory(peak=peak, activations=act, other=peak - known - act, reserved=reserved, device=used,
                      device_source=source)


# Dense peak FLOP/s of tensor-core (or fp32) math by device name fragment, from vendor datasheets.
_PEAK_FLOPS = {
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.0e12, "fp16": 756.0e12, "fp32": 51.2e12},
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12},
    "A100": {"bf16": 312.0e12, "fp16": 312.0e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "fp32": 91.6e12},
    "L4": {"bf16": 121.0e12, "fp16": 121.0e12, "fp32": 30.3e12},
}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for this precision; None where it is not known (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, table in _PEAK_FLOPS.items():
        if fragment in name:
            return table[precision]
    return None


# Every trial on one machine that times its steps alone locks this file while it does.
MEASURE_LOCK = os.path.join(tempfile.gettempdir(), "autotune-measure.lock")


@contextlib.contextmanager
def timed_alone(enabled: bool, rank: int, barrier: Callable[[], None], hosts: Sequence[str] | None = None,
                lock_for: Callable[[str], str] = lambda host: MEASURE_LOCK) -> Iterator[None]:
    """Hold the measuring lock of every machine the trial runs on while the timed steps run, so
    that trials whose ranks share cores (CPU ranks; `cluster.cpus_per_rank` < 1) do not time each
    other's work. `hosts[r]` names global rank r's machine (None: one machine); the lowest rank
    on each machine takes that machine's lock (`lock_for(host)`), machine after machine in name
    order with a `barrier` after each, so the whole trial starts timing together.

    Every trial takes the locks in the same (name) order, so two trials that share machines
    cannot each hold one lock and wait for the other's: one of them gets them all first.
    Only timing is serialised: start-up, placement and the memory probe still overlap. On this
    2-core machine two concurrent quick-start trials slowed each other by 20-40%, which is
    what made one layout's runs in one study differ more than its steps showed. A lock goes
    with the process if it dies (flock)."""
    if not enabled:
        yield
        return
    hosts = list(hosts) if hosts is not None else [""] * (rank + 1)
    mine = hosts[rank]
    lead = hosts.index(mine) == rank  # the lowest rank on this machine
    handle = None
    try:
        for host in sorted(set(hosts)):
            if lead and host == mine:
                handle = open(lock_for(host), "a+")
                fcntl.flock(handle, fcntl.LOCK_EX)
            barrier()
        yield
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
