"""Real servers for integration tests: PostgreSQL from Debian's packages and `mlflow server`.

Both bind to 127.0.0.1 on free ports and are stopped by the fixture that started them. A
machine without PostgreSQL's server binaries skips the tests that need it, saying why.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.faults import free_port


def postgres_bindir() -> Path | None:
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


@dataclass
class Postgres:
    bindir: Path
    root: Path
    port: int
    as_user: list[str]

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, tool: str, *args: str) -> None:
        subprocess.run(self.as_user + [str(self.bindir / tool), *args], check=True, capture_output=True,
                       text=True, timeout=120)

    def create_database(self, name: str) -> str:
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def stop(self) -> None:
        try:
            self.run("pg_ctl", "-D", str(self.root / "data"), "stop", "-m", "immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> Postgres:
    """initdb + pg_ctl start, as the `postgres` user when running as root (initdb refuses root)."""
    bindir = postgres_bindir()
    if bindir is None:
        raise FileNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    root = Path(tempfile.mkdtemp(prefix="atpg", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chmod(root, 0o755)
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    pg = Postgres(bindir, root, free_port(), as_user)
    pg.run("initdb", "-D", str(root / "data"), "-A", "trust", "-U", "postgres")
    pg.run("pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
           f"-p {pg.port} -k {root} -c listen_addresses=127.0.0.1", "start")
    return pg


@dataclass
class MlflowServer:
    proc: subprocess.Popen
    port: int

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_mlflow_server(backend_uri: str, workdir: Path, timeout: float = 120) -> MlflowServer:
    """Loopback only, with --allowed-hosts naming exactly how clients reach it."""
    port = free_port()
    hosts = f"127.0.0.1:{port},localhost:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--allowed-hosts", hosts,
         "--artifacts-destination", str(workdir / "artifacts")],
        cwd=workdir, stdout=open(workdir / "mlflow-server.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    server = MlflowServer(proc, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(workdir / 'mlflow-server.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{server.uri}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError("mlflow server did not answer in time")
