"""The cluster profile: the step-time model's device figures measured on the study's own cluster
before its first trial, instead of a data sheet's.

The probe (`autotune.trials.probe`) runs on Ray ranks placed like a trial's, over the trials'
backend: the candidates' dense and grouped GEMM shapes per precision on one device, the copy
bandwidth, and all-reduce, all-to-all and send/recv times against message size for the group
sizes the candidates use (and, on a cluster of several nodes, between two nodes). Each
collective's times are fitted to the alpha-beta cost the step-time model uses (a start-up
latency per algorithm step, a bandwidth over the bytes that cross a link), and the fits replace
the profile's `latency_us`, `intra_node_gb_s` (`inter_node_gb_s`), `peak_tflops` and `hbm_gb_s`, and
give the all-to-all and send bandwidths inside a node (`a2a_gb_s`, `p2p_gb_s`). One block of the
model, shrunk to a tiny width, run forward and backward, gives a floor of a layer's fixed cost per
micro-batch (`launch_us`, raised to it where the profile's figure is lower): what makes many small
micro-batches slower than their FLOPs say, on the device itself rather than a guess.

It costs a few seconds (`PROBE_SECONDS` of measuring, plus starting the ranks, whose warm
workers the trials then reuse), and is cached per cluster and device (`cache_dir()`), so later
studies on the same cluster skip it; a continued study and `validate --from` read the figures
kept with the study. A failed probe never fails a study: the profile's own figures stay.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from autotune.predict.steptime import LAUNCHES_PER_LAYER_PASS
from autotune.redaction import error_line
from autotune.space.devices import DeviceProfile
from autotune.space.layout import Layout
from autotune.space.spec import Spec
from autotune.trials.machine import cpu_matmul_shapes
from autotune.trials.probe import ProbeConfig, layer_model

PROBE_SECONDS = {"cpu": 1.0, "cuda": 6.0}  # measuring time on the ranks (start-up not included)
PROBE_TIMEOUT_S = 120.0
CACHE_MAX_AGE_S = 7 * 86400.0
MAX_GROUPS = 3  # collective group sizes measured: 2, the widest and one between
MESSAGE_BYTES = {"cpu": (1 << 12, 1 << 16, 1 << 20), "cuda": (1 << 16, 1 << 20, 1 << 24, 1 << 26)}
# The alpha-beta cost of each collective over g ranks: (latency steps, share of the bytes sent).
_COST = {"all_reduce": (lambda g: 2 * (g - 1), lambda g: 2 * (g - 1) / g),
         "all_to_all": (lambda g: g - 1, lambda g: (g - 1) / g),
         "send_recv": (lambda g: 1, lambda g: 1.0)}


def cache_dir() -> Path:
    """Where cluster profiles are kept between studies: $AUTOTUNE_CACHE_DIR, else the user's cache."""
    root = os.environ.get("AUTOTUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "autotune")
    return Path(root) / "cluster-profiles"


def probe_world(spec: Spec) -> int:
    """Ranks inside one node that the probe measures on: as many as the widest layout, at most a node."""
    widest = max(spec.world_sizes)
    per_node = spec.cluster.ranks_per_node or spec.cluster.total_ranks
    return max(1, min(widest, per_node, spec.cluster.total_ranks))


def probe_config(spec: Spec) -> ProbeConfig:
    """What the probe measures for this space: its GEMM shapes, its group sizes, its message sizes,
    its block's fixed cost."""
    cfg = spec.model.config()
    world = probe_world(spec)
    device = spec.cluster.device
    gemms = [(1, m, k, n) for m, k, n in cpu_matmul_shapes(spec)]
    if cfg.n_experts:  # the grouped expert GEMM at EP 1: every expert, its share of the tokens
        tokens = max(spec.search.micro_batch_size) * spec.search.seq_len
        gemms.append((cfg.n_experts, max(1, tokens * cfg.top_k // cfg.n_experts), cfg.d_model, cfg.ffn_hidden))
    used = {v for v in (*spec.search.tp, *spec.search.ep, *spec.world_sizes) if 2 <= v <= world}
    if world >= 2:
        used |= {2, world}
    sizes = sorted(used)
    if len(sizes) > MAX_GROUPS:
        sizes = [sizes[0], sizes[len(sizes) // 2], sizes[-1]]
    return ProbeConfig(device=device, world=world, gemms=tuple(dict.fromkeys(gemms)),
                       precisions=("fp32", "bf16", "bf16-params"),
                       groups=tuple(sizes), sizes=MESSAGE_BYTES[device], seconds=PROBE_SECONDS[device],
                       timeout_s=PROBE_TIMEOUT_S, layer=layer_model(cfg))


def cluster_key(spec: Spec, probe: ProbeConfig) -> str:
    """What makes two clusters the same for their figures: the nodes Ray sees (host, CPUs, GPUs),
    the ranks' share of them, the device, torch, and what is measured."""
    import ray

    nodes = sorted((n.get("NodeManagerHostname", ""), n.get("Resources", {}).get("CPU", 0),
                    n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive"))
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = ""
    c = spec.cluster
    what = {"nodes": nodes, "device": c.device, "profile": c.profile, "cpus_per_rank": c.cpus_per_rank,
            "ranks_per_node": c.ranks_per_node, "cluster_nodes": c.nodes, "torch": torch_version,
            "probe": [probe.world, probe.gemms, probe.precisions, probe.groups, probe.sizes, probe.seconds,
                      probe.layer.to_dict() if probe.layer else None]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fit_collectives(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (collective, group size): start-up latency per algorithm step (us) and bandwidth (GB/s),
    from a least-squares line of seconds against bytes."""
    out = []
    for kind, g in sorted({(r["kind"], r["group"]) for r in rows}):
        pts = sorted((r["bytes"], r["seconds"]) for r in rows if r["kind"] == kind and r["group"] == g)
        if len(pts) < 2:
            continue
        x, y = np.array(pts, dtype=float).T
        slope, intercept = np.polyfit(x, y, 1)
        if slope <= 0:  # noise swamped the bytes: the largest message alone bounds the bandwidth
            slope, intercept = y[-1] / x[-1], 0.0
        steps, share = _COST[kind][0](g), _COST[kind][1](g)
        out.append({"kind": kind, "group": g, "latency_us": max(0.0, float(intercept)) / steps * 1e6,
                    "gb_s": share / float(slope) / 1e9})
    return out


def launch_us_of(layer_seconds: float) -> float:
    """A layer's fixed cost, forward and backward (3 passes), as the step-time model's cost of one
    launch (`LAUNCHES_PER_LAYER_PASS` of them per layer and pass), in us."""
    return layer_seconds / (3 * LAUNCHES_PER_LAYER_PASS) * 1e6


def apply(profile: DeviceProfile, record: dict[str, Any]) -> DeviceProfile:
    """The profile with the probe's figures in place of its own (those the probe measured)."""
    if record.get("error"):
        return profile
    changes: dict[str, Any] = {}
    peaks = dict(profile.peak_tflops)
    gemms = [g for g in record.get("gemms", []) if "tflops" in g]  # not the shapes that failed
    for precision in {g["precision"] for g in gemms}:
        mine = [g for g in gemms if g["precision"] == precision]
        flops = sum(g["tflops"] * g["seconds"] for g in mine)  # a step runs all of them: FLOPs over time
        peaks[precision] = flops / sum(g["seconds"] for g in mine)
    if "bf16" in peaks and "fp16" not in {g["precision"] for g in gemms}:
        peaks["fp16"] = peaks["bf16"]
    if gemms:
        changes["peak_tflops"] = peaks
    if record.get("copy_gb_s"):
        changes["hbm_gb_s"] = record["copy_gb_s"]
    # CPU ranks that share cores slow each other down, which the step-time model counts on its own
    # (`Topology.contention`): the figures come from groups no wider than the cores.
    cores = record.get("cores")
    fits = [f for f in record.get("fits", []) if cores is None or f["group"] <= max(2, cores)]
    reduce = [f for f in fits if f["kind"] == "all_reduce" and f.get("where", "node") == "node"]
    if reduce:
        changes["intra_node_gb_s"] = max(reduce, key=lambda f: f["group"])["gb_s"]
    for kind, name in (("all_to_all", "a2a_gb_s"), ("send_recv", "p2p_gb_s")):
        mine = [f for f in fits if f["kind"] == kind and f.get("where", "node") == "node"]
        if mine:
            changes[name] = max(mine, key=lambda f: f["group"])["gb_s"]
    across = [f for f in fits if f["kind"] == "all_reduce" and f.get("where") == "across"]
    if across:
        changes["inter_node_gb_s"] = across[0]["gb_s"]
    if fits:
        changes["latency_us"] = float(np.median([f["latency_us"] for f in fits]))
    # A bare block's fixed cost is a floor of a layer's in a real step (which adds communication
    # calls, hooks and the schedule's own work): it raises the profile's figure, never lowers it. On
    # this machine's CPU the bare block costs about half of what the CPU grids' calibration finds, and
    # applying it as it is made the pp grid's search take 7 trials instead of 1.
    layer = record.get("layer") or {}
    if layer.get("seconds"):
        changes["launch_us"] = max(profile.launch_us, launch_us_of(layer["seconds"]))
    when = record.get("measured_at", "")
    return replace(profile, **changes, sources={**profile.sources, "probe": f"cluster probe of {when}"})


def _run(probe: ProbeConfig, spec: Spec, strategy: str | None = None) -> dict[str, Any]:
    from autotune.schema import Status
    from autotune.trials.executor import run_trial
    from autotune.trials.placement import plan, rank_resources, single

    if strategy is None:
        placement = plan(Layout(1, 1, 1, probe.world, 1, "fp32", "none", "1f1b"), spec.cluster)
    else:
        placement = single(rank_resources(spec.cluster), strategy)
    outcome = run_trial(probe, placement, timeout_s=probe.timeout_s, placement_wait_s=30.0)
    if outcome.status != Status.OK or outcome.summary is None:
        raise RuntimeError(outcome.reason or f"the probe ended {outcome.status.value}")
    return outcome.summary


def measure(spec: Spec) -> dict[str, Any]:
    """Run the probe on the cluster Ray is connected to; its figures and fits, as plain data."""
    probe = probe_config(spec)
    start = time.monotonic()
    figures = _run(probe, spec)
    fits = [dict(f, where="node") for f in fit_collectives(figures.get("collectives", []))]
    if spec.cluster.nodes > 1 and spec.cluster.ranks_per_node:
        # Two ranks on two nodes: the network's bandwidth and latency.
        between = replace(probe, world=2, gemms=(), groups=(2,))
        across = _run(between, spec, "STRICT_SPREAD")
        fits += [dict(f, where="across") for f in fit_collectives(across.get("collectives", []))
                 if f["kind"] != "all_to_all"]
    c = spec.cluster
    layer = figures.get("layer")
    if isinstance(layer, dict) and layer.get("seconds"):  # a floor: does it raise the profile's figure?
        own = c.device_profile().launch_us  # as a layer's seconds: launch_us_of's inverse
        layer = {**layer, "profile_seconds": own / launch_us_of(1.0), "used": launch_us_of(layer["seconds"]) > own}
    return {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "world": probe.world,
            "cores": c.total_ranks * c.cpus_per_rank if c.device == "cpu" else None,
            "device": figures.get("device", spec.cluster.device), "device_name": figures.get("device_name"),
            "gemms": figures.get("gemms", []), "copy_gb_s": figures.get("copy_gb_s"), "layer": layer,
            "collectives": figures.get("collectives", []), "fits": fits,
            "measure_s": figures.get("seconds"), "wall_s": time.monotonic() - start}


def cluster_profile(spec: Spec) -> dict[str, Any]:
    """This cluster's probe record: from the cache when it was measured lately, else measured now
    (and cached). With `reused` set when it came from the cache, `error` when the probe failed."""
    probe = probe_config(spec)
    key = cluster_key(spec, probe)
    path = cache_dir() / f"{key}.json"
    try:
        if time.time() - path.stat().st_mtime < CACHE_MAX_AGE_S:
            return {**json.loads(path.read_text()), "reused": str(path)}
    except (OSError, ValueError):
        pass
    try:
        record = measure(spec)
    except Exception as exc:  # the study goes on with the profile's own figures
        return {"error": error_line(exc, 500), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    record["key"] = key
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # measured but not kept: the next study measures again
    return record


def console_line(record: dict[str, Any]) -> str:
    """One line for the console about what the probe did."""
    if record.get("error"):
        return f"cluster: the probe failed ({record['error']}); the device profile's figures are used"
    if record.get("reused"):
        return f"cluster: figures measured {record['measured_at']} reused (cached for this cluster)"
    parts = []
    fp32 = [g["tflops"] for g in record.get("gemms", []) if g["precision"] == "fp32" and "tflops" in g]
    if fp32:
        parts.append(f"fp32 GEMMs up to {max(fp32):.3g} TFLOP/s")
    reduce = [f for f in record.get("fits", []) if f["kind"] == "all_reduce"]
    if reduce:
        f = min(reduce, key=lambda f: f["group"])
        parts.append(f"all-reduce over {f['group']} ranks {f['gb_s']:.3g} GB/s")
    detail = f" ({', '.join(parts)})" if parts else ""
    return f"cluster: measured by {record['world']} {record['device']} ranks in {record['wall_s']:.1f} s{detail}"

