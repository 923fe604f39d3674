"""`autotune ui`: the MLflow UI on a tracking store, its own output kept in a log file.

`mlflow ui` prints uvicorn's start-up log and Starlette's deprecation warnings; a user wants
the address. So the server's output goes to a log, the command waits until the port answers,
and the console gets one line with the URL (or one `error:` line naming the log).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

START_TIMEOUT_S = 180.0  # `import mlflow` and a database migration on a busy machine


class UiError(RuntimeError):
    """The UI could not start (exit code 2)."""


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _answers(host: str, port: int) -> bool:
    """The server answers requests (its port is bound before its worker can serve)."""
    import urllib.request

    target = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else \
        f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{target}:{port}/health", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _stop(proc: subprocess.Popen) -> None:
    """Ends the server and the workers it started (its own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _stop_on_sigterm():
    """A SIGTERM (`kill`, a service manager) ends the UI like Ctrl-C does, so the server started
    in its own session ends too. Returns the previous handler (None off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def serve(store: str, host: str, port: int, log_path: Path, ready: Callable[[str], None]) -> int:
    """Run `mlflow ui` on `store` until it ends or Ctrl-C; `ready` gets the URL once it answers."""
    if not _port_free(host, port):
        raise UiError(f"--port {port}: {host}:{port} is already in use; choose another port with --port")
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
    except OSError as exc:
        raise UiError(f"cannot write the UI's log {log_path} ({exc.strerror or exc}); run it from a writable "
                      f"folder") from None
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", host, "--port", str(port),
           # One person browsing their studies: one worker (the default 4 each import MLflow).
           "--workers", "1"]
    with log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    previous = _stop_on_sigterm()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(host, port):
            if proc.poll() is not None:
                raise UiError(f"mlflow ui stopped while starting (exit code {proc.returncode}): "
                              f"{_last_line(log_path) or 'no output'}; its log: {log_path}")
            if time.monotonic() > deadline:
                raise UiError(f"mlflow ui did not answer on {host}:{port} within {START_TIMEOUT_S:.0f} s; "
                              f"its log: {log_path}")
            time.sleep(0.3)
        ready(f"http://{host}:{port}")
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the user's way to stop it
        return 0
    finally:
        _stop(proc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
