"""`make test`'s first step (tests/system_deps.sh): nothing to do where the browser and database
tests' system packages are present; where they are missing and cannot be installed, one line with
the command to run and a non-zero exit, before any test starts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "system_deps.sh"


def _bin(tmp_path: Path, uid: int) -> Path:
    """A PATH with the shell tools the script uses, and an `id` that answers `uid`: no chromium, no
    chromedriver, no apt-get, no sudo."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("bash", "ls"):
        (folder / tool).symlink_to(shutil.which(tool))
    (folder / "id").write_text(f"#!/bin/bash\necho {uid}\n")
    (folder / "id").chmod(0o755)
    return folder


def test_missing_packages_that_cannot_be_installed_stop_with_the_command_to_run(tmp_path):
    proc = subprocess.run([str(_bin(tmp_path, 1000) / "bash"), str(SCRIPT)], env={"PATH": str(tmp_path / "bin")},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("error: the browser and database tests need chromium chromium-driver")
    assert line.endswith("install them with: sudo apt-get install -y --no-install-recommends chromium chromium-driver"
                         + (" postgresql" if "postgresql" in line.split("need")[1].split(";")[0] else ""))


def test_nothing_to_do_where_everything_is_installed():
    """This machine runs the suite, so `make test` has already put them here."""
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_make_test_runs_it_first():
    make = (ROOT / "Makefile").read_text()
    assert "test: setup system-deps" in make and "\tbash tests/system_deps.sh" in make.replace("@bash", "bash")
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"
