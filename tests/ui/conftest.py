"""One small quick-start study shared by the console and browser tests of this package.

It is run the way `make run` runs it (the `autotune run` console command on a copy of
`search_spaces/quickstart-cpu.yaml`, with a smaller budget to keep the suite short), in a fresh
folder, so the tests see what a new user sees: its console output, its MLflow store, its report
and its Optuna journal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ui.browser import browser  # noqa: F401 - the package's shared browser fixture

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "search_spaces" / "quickstart-cpu.yaml"
TRIALS = 4  # at least two trials to compare, and the quick start's frontier opening


def autotune_command() -> list[str]:
    """The console script `make run` calls (`.venv/bin/autotune`), or the module where none is."""
    script = Path(sys.executable).parent / "autotune"
    return [str(script)] if script.exists() else [sys.executable, "-m", "autotune.cli"]


def user_env() -> dict[str, str]:
    """A new user's environment: no Ray token of the test session (Ray makes its own), and this
    checkout's code first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass(frozen=True)
class QuickStudy:
    folder: Path
    space: Path
    name: str
    proc: subprocess.CompletedProcess

    @property
    def directory(self) -> Path:
        return self.folder / "autotune-runs" / self.name

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.folder / 'mlflow.db'}"


@pytest.fixture(scope="package")
def quick_study(tmp_path_factory) -> QuickStudy:
    folder = tmp_path_factory.mktemp("quickstart")
    text = QUICKSTART.read_text()
    text, n = re.subn(r"(?m)^(\s*trials:)\s*\d+", rf"\g<1> {TRIALS}", text)
    assert n == 1, "the quick start's budget.trials line moved; update this fixture"
    space = folder / "space.yaml"
    space.write_text(text)
    proc = subprocess.run([*autotune_command(), "run", str(space)], cwd=folder, env=user_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"(?m)^trial +\d+ ok ", proc.stdout), "no trial measured:\n" + proc.stdout[-3000:]
    name = re.search(r"(?m)^\s*name:\s*(\S+)", text.split("study:")[-1]).group(1)
    return QuickStudy(folder=folder, space=space, name=name, proc=proc)
