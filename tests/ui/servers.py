"""Start a long-running autotune command (`ui`, `dashboard`) and keep everything it prints."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.ui.conftest import autotune_command, user_env


class Served:
    """`autotune ARGS` running in `cwd`; `lines` is its console output so far (both streams)."""

    def __init__(self, args: list[str], cwd: Path, timeout: float = 300.0) -> None:
        self.proc = subprocess.Popen([*autotune_command(), *args], cwd=cwd, env=user_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True)
                         for s in (self.proc.stdout, self.proc.stderr)]
        for r in self._readers:
            r.start()
        deadline = time.monotonic() + timeout
        while not any("http://" in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"autotune {' '.join(args)} did not print its URL:\n" + "\n".join(self.lines))
            time.sleep(0.2)
        self.url = re.search(r"http://\S+", next(line for line in self.lines if "http://" in line)).group(0)

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; the servers it started must end with it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for r in self._readers:
            r.join(timeout=5)
        return self.proc.returncode
