"""Real faults for tests: processes to kill or stop, and multi-node Ray clusters on this machine.

Everything here acts on real processes found through /proc, never on mocks. Each cluster gets
its own temporary folder and token, and is torn down by killing exactly its own processes
(`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
FORKSERVER = "multiprocessing.forkserver"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def parent(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return not line.split()[1].startswith("Z")
    except OSError:
        return False
    return False


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    """The pids still alive after waiting up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    return left


def worker_exits(session_dir: str) -> list[tuple[str, str]]:
    """(worker id, exit type) of every Ray worker whose exit the session's GCS recorded
    (`gcs_server.out`: "Reporting worker exit, worker id = ..., exit_type = SYSTEM_ERROR, ...").
    SYSTEM_ERROR is a worker that died or was killed by something other than Ray's own shutdown."""
    import re

    path = Path(session_dir) / "logs" / "gcs_server.out"
    text = path.read_text(errors="replace") if path.exists() else ""
    return re.findall(r"Reporting worker exit, worker id = (\w+), .*?exit_type = (\w+)", text)


def rank_processes(session_dir: str, raylet: int | None = None) -> list[int]:
    """Trial rank processes of one Ray session (or of one raylet, i.e. one node): forked by a
    fork server that a Ray worker of that session (a child of its raylet) started."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if FORKSERVER not in cmdline(pid):
            continue
        server = parent(pid)
        if server is None or FORKSERVER not in cmdline(server):
            continue
        worker = parent(server)
        owner = parent(worker) if worker else None
        if owner and session_dir in cmdline(owner) and raylet in (None, owner):
            out.append(pid)
    return sorted(out)


def _signal(pids: list[int], sig: int) -> None:
    """Signal each process that still exists (one may have gone since it was listed)."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """A real Ray cluster of several nodes (processes) on this machine."""

    root: Path
    port: int
    env: dict[str, str]
    address: str = ""
    dashboard_port: int | None = None
    nodes: list[dict] = field(default_factory=list)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def pids(self) -> list[int]:
        return [int(e.name) for e in Path("/proc").iterdir()
                if e.name.isdigit() and str(self.root) in cmdline(int(e.name))]

    def raylet_of(self, node_id: str) -> int:
        for pid in self.pids():
            line = cmdline(pid)
            if "raylet/raylet" in line and f"--node_id={node_id}" in line:
                return pid
        raise LookupError(f"no raylet of node {node_id}")

    @contextlib.contextmanager
    def client(self):
        """This process as a driver of the cluster (it shares the session's token)."""
        import ray

        ray.init(address=self.address, logging_level="ERROR")
        try:
            yield ray
        finally:
            ray.shutdown()

    def stop(self) -> None:
        """The raylets first, then the rest: a raylet given SIGTERM while its GCS is going too waits
        out a drain timeout instead of exiting at once."""
        raylets = [pid for pid in self.pids() if "raylet/raylet" in cmdline(pid)]
        _signal(raylets, signal.SIGTERM)
        wait_gone(raylets, 5)
        pids = self.pids()
        # the autoscaler's monitor ignores SIGTERM and would hold up the teardown 5 s
        monitor = [pid for pid in pids if "autoscaler/_private/monitor.py" in cmdline(pid)]
        _signal(monitor, signal.SIGKILL)
        _signal([pid for pid in pids if pid not in monitor], signal.SIGTERM)
        left = wait_gone(pids, 5)
        _signal(left, signal.SIGKILL)
        wait_gone(left, 10)


def cluster_env(ray_priority: bool = False) -> dict[str, str]:
    """Token auth on with this session's token (tests/conftest.py), fast node-death detection, and
    the deployment's idle-worker limit. Workers at normal priority, as the compose file runs them,
    unless `ray_priority` leaves Ray's own nice 15, as on a cluster started by hand."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(16),
               RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4",
               RAY_health_check_initial_delay_ms="0", RAY_health_check_timeout_ms="1000",
               RAY_num_workers_soft_limit="64")  # idle workers kept, as docker/docker-compose.yml keeps them
    if not ray_priority:
        env["RAY_worker_niceness"] = "0"
    return env


def own_ports(head: bool = False) -> list[str]:
    """`ray start` flags giving a node free ports where Ray's defaults are fixed numbers."""
    flags = [f"--dashboard-agent-listen-port={free_port()}"]
    return flags + [f"--ray-client-server-port={free_port()}"] if head else flags


def start_cluster(nodes: list[dict], dashboard: bool = False, attempts: int = 3,
                  ray_priority: bool = False) -> Cluster:
    """nodes[0] is the head; each is {"num_cpus": n, "resources": {...}}. `ray_priority`: see
    cluster_env.

    A loaded machine sometimes fails a node's start (a port taken meanwhile, a slow GCS): the
    whole cluster is then torn down and started again on fresh ports.
    """
    for attempt in range(attempts):
        try:
            return _start_cluster(nodes, dashboard, ray_priority)
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _start_cluster(nodes: list[dict], dashboard: bool, ray_priority: bool) -> Cluster:
    root = Path(tempfile.mkdtemp(prefix="atr", dir="/tmp"))  # short: socket paths have a length limit
    port = free_port()
    env = cluster_env(ray_priority)
    cluster = Cluster(root=root, port=port, env=env, nodes=nodes)
    # Every node of a machine would take Ray's fixed default ports for its dashboard agent (52365)
    # and a head for its client server (10001): on one machine, beside other clusters of the
    # suite, each node gets free ones, as each would have its own on a machine of its own.
    head = [RAY, "start", "--head", f"--port={port}", f"--num-cpus={nodes[0].get('num_cpus', 1)}",
            f"--temp-dir={root}", "--disable-usage-stats", *own_ports(head=True)]
    if nodes[0].get("resources"):
        head.append(f"--resources={json.dumps(nodes[0]['resources'])}")
    if dashboard:
        cluster.dashboard_port = free_port()
        head += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={cluster.dashboard_port}"]
    else:
        head.append("--include-dashboard=false")
    def start(cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")

    try:
        start(head)
        ip = _node_ip()
        cluster.address = f"{ip}:{port}"
        for i, node in enumerate(nodes[1:], 1):
            # A temp folder of its own, as on a machine of its own: nodes sharing one would also
            # share (and garbage-collect) each other's unpacked runtime environments.
            cmd = [RAY, "start", f"--address={cluster.address}", f"--num-cpus={node.get('num_cpus', 1)}",
                   f"--temp-dir={root / f'n{i}'}", "--disable-usage-stats", *own_ports()]
            if node.get("resources"):
                cmd.append(f"--resources={json.dumps(node['resources'])}")
            start(cmd)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()
