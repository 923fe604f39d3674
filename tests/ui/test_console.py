"""`autotune run` prints autotune's own lines only; other libraries' messages go to the log."""

from __future__ import annotations

import re
import subprocess

from tests.ui.conftest import QuickStudy, autotune_command, user_env

# Every line autotune itself prints during a run (autotune/study/progress.py, autotune/cli/main.py).
OWN_LINE = re.compile(r"^(study \S+( \([^)]*\))?: |trial +\d+ |\[\d+:\d\d\] done |report: |best: |log: |warning: "
                      r"|proposals answered without a run: |cluster: )")


def foreign_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not OWN_LINE.match(line)]


def test_make_run_prints_only_autotune_lines(quick_study: QuickStudy):
    proc = quick_study.proc
    assert foreign_lines(proc.stdout) + foreign_lines(proc.stderr) == []
    assert proc.stderr == ""
    log = quick_study.directory / "autotune.log"
    assert proc.stdout.splitlines()[-1].startswith(f"log: autotune-runs/{quick_study.name}/autotune.log")
    # What used to be printed is in the log instead, not lost.
    text = log.read_text()
    for expected in ("Token authentication is enabled", "ExperimentalWarning", "mlflow.store.db.utils"):
        assert expected in text, f"{expected!r} not in {log}:\n{text[-3000:]}"


def test_the_counter_sees_a_foreign_line():
    """The check above would fail on what `make run` used to print."""
    before = ("trial   0 start  EP1_TP1_PP1_DP1/mb2/fp32/full/1f1b (world 1)\n"
              "2026-11-26 13:15:11,774\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled\n"
              "best: EP1_TP1_PP1_DP1/mb2/fp32/full/1f1b at 1,438 tokens/s\n")
    assert foreign_lines(before) == [before.splitlines()[1]]


def test_verbose_shows_the_libraries_messages(quick_study: QuickStudy):
    # The finished study resumed: no trial runs, but Optuna, MLflow and the report are opened again.
    proc = subprocess.run([*autotune_command(), "run", str(quick_study.space), "--resume", "--verbose"],
                          cwd=quick_study.folder, env=user_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ExperimentalWarning" in proc.stderr
    assert "--verbose shows them" not in proc.stdout and "log: " in proc.stdout


def test_the_console_names_one_best_and_accounts_for_every_trial(quick_study: QuickStudy):
    """The last progress line names the best the final line names, at the same figure; every trial
    number from 0 to the last one is on a line of its own or in the summary of proposals answered
    without a run."""
    out = quick_study.proc.stdout
    final = re.search(r"(?m)^best: (\S+) at ([\d,]+) tokens/s$", out)
    assert final, out[-3000:]
    progress = re.findall(r"(?m)^\[\d+:\d\d\] done .*; best (\S+) at ([\d,]+) tok/s$", out)
    assert progress and progress[-1] == final.groups(), out[-3000:]
    numbers = {int(n) for n in re.findall(r"(?m)^trial +(\d+) ", out)}
    for line in re.findall(r"(?m)^proposals answered without a run: (.*)$", out):
        for first, last in re.findall(r"(\d+)(?:-(\d+))?", " ".join(re.findall(r"\(trials? ([^)]*)\)", line))):
            numbers.update(range(int(first), int(last or first) + 1))
    assert numbers == set(range(max(numbers) + 1)), sorted(numbers)
