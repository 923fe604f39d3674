"""Helpers shared by the benchmarks: where results go, the machine they ran on, small statistics."""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPACES = ROOT / "benchmarks" / "spaces"


def machine() -> dict[str, Any]:
    """What a figure was measured on; the load average says how busy the shared machine was."""
    import torch

    out: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
                           "python": platform.python_version(), "torch": torch.__version__}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    try:
        out["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return out


def preload_launch() -> None:
    """Ranks that `tests.launch` starts fork from a server that has already imported what every
    rank imports (dynamo, pulled in by meta-device init; the pipelining package; the grad scaler),
    so a rank starts in milliseconds instead of importing them once per rank."""
    import tests.launch as launch_mod

    launch_mod._CTX.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed.pipelining",
                                            "torch.distributed.fsdp.sharded_grad_scaler", "trainables.moe.train",
                                            "tests.launch"])


def write_csv(path: Path, rows: list[dict[str, Any]], header: Iterable[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(header) if header is not None else list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def say(text: str = "") -> None:
    print(text, flush=True)


def ensure_path() -> None:
    """Make the project importable when a benchmark runs as a file rather than with -m."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def study_in_fresh_process(module: str, args: list[str], what: str, env: dict[str, str] | None = None,
                           prefix: str = "bench-") -> dict[str, Any]:
    """Run `python -m MODULE --one ... --folder TMP` in a new process (its own Ray, MLflow store and
    Optuna journal under a temporary folder) and return the JSON line it prints last. `env` is
    added to the environment; `{folder}` in its values becomes the temporary folder."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        extra = {k: v.replace("{folder}", tmp) for k, v in (env or {}).items()}
        proc = subprocess.run([sys.executable, "-m", module, *args, "--folder", tmp], cwd=tmp,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **extra}, capture_output=True, text=True,
                              timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return json.loads(lines[-1])
