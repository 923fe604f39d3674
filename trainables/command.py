"""A user's own training command as a trainable: an argv template in, measured metrics out.

autotune can tune any program that trains (Megatron-LM, torchtitan, an in-house script) as long
as the layout reaches it through its command line and its speed comes back through one of the
two channels below. This module has no Ray and no torch in it: it renders the command for one
trial, runs it in a process group of its own, reads its metrics as they appear, and says how the
run ended (`autotune.schema.Status`).

The command template
--------------------
A list of strings, one argv element each, run **without a shell**; its placeholders and their
rules are in `trainables.command_template`. Example::

    ["torchrun", "--nproc-per-node", "{nproc}", "--nnodes", "{nnodes}", "--node-rank", "{node_rank}",
     "--master-addr", "{master_addr}", "--master-port", "{master_port}", "train.py",
     "--expert-parallel={ep}", "--tensor-parallel={tp}", "--pipeline-parallel={pp}",
     "--micro-batch={micro_batch_size}", "--global-batch={global_batch_size}", "--precision={precision}",
     "--recompute={recompute}", "--seed={seed}", "--metrics-out", "{metrics_file}"]

The minimal metrics contract
----------------------------
**A JSON-lines file** (its path is what `{metrics_file}` expands to), written by one rank::

    {"type": "step", "step": 0, "phase": "warmup", "loss": 10.41, "step_time_s": 0.93}
    {"type": "step", "step": 1, "loss": 10.12, "step_time_s": 0.41, "tokens_per_s": 39960}
    ...
    {"type": "summary", "tokens_per_s": 40120.5, "step_time_s": 0.408, "peak_mem_bytes": 71000000000}

* Each line is one JSON object followed by a newline; write whole lines and flush after each
  (a line is read once its newline is there, while the program runs). Other lines are ignored.
* A `"type": "step"` line carries `step` (a whole number) and optionally `loss`, `step_time_s`,
  `tokens_per_s` (numbers) and `phase` (`"warmup"` steps are shown but not measured; without
  `phase`, the first `warmup_steps` steps are warm-up).
* The last `"type": "summary"` line carries any of autotune's summary metrics
  (`autotune.schema.SUMMARY_METRICS`), at least `tokens_per_s` or `step_time_s`. Whatever it
  lacks is computed from the measured steps: `step_time_s` is their median, `step_time_p90_s`
  their 90th percentile, `tokens_per_s` = tokens per step / median step time (or the median of
  the steps' `tokens_per_s`), `loss_first`/`loss_last` the first and last step losses. A program
  that knows it failed may add `"status": "oom"` (any `Status` value) and a `"reason"`.
* No summary line is needed when the steps carry `step_time_s` or `tokens_per_s`.

**Printed lines only**: `metrics_preset` (`hf-trainer`, `torchtitan`, `megatron`, `deepspeed`:
`trainables.presets`) reads a framework's standard log lines as they are; `metrics_regex` maps metric names to regular expressions with exactly
one group, searched (`re.search`) in each stdout line; anchor them (`^step ...`) so that other
lines mentioning the same words are not read as steps. A line matching `step_time_s`,
`tokens_per_s` or `loss` is one step (with `step` from a `step` pattern on the same line, else
counted); a match of any other summary metric (e.g. `peak_mem_bytes`) sets that summary value
(the last match wins; for peak memory the largest). Figures in other units (`step_time_ms`,
`tokens_per_s_per_device`, `step_samples_per_s` per step; `samples_per_s`, `steps_per_s`,
`peak_mem_gib`, `peak_mem_mib` for the run) are turned into autotune's metrics with the trial's
sequence length, world size and global batch (`trainables.command_metrics`), and the outcome says
which figure was derived from what; a step line per figure in other units counts as a step too.
With a preset, a step number seen before is another rank's copy of that step and is read once.
The summary is then computed from the steps as above. Python programs print unbuffered here
(`PYTHONUNBUFFERED=1`), so their lines arrive as they are printed.

How a run ends
--------------
`ok`; `timeout` (the whole process group is stopped: SIGTERM, then SIGKILL after a grace);
`oom` (a non-zero exit whose output shows an out-of-memory error: `torch.OutOfMemoryError`,
`CUDA out of memory`, a Python `MemoryError`, or `Killed` with exit -9/137); `crashed` (any other
non-zero exit, with the exit code or signal and the last stderr line); `no_metrics` (an exit 0
whose output gave no step, or no speed: the reason names the preset or patterns that did not match
and quotes the last lines of output). Processes the command leaves behind are stopped when it exits.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from autotune.schema import Status
from trainables.command_metrics import (  # noqa: F401  (re-exported: the module's public names)
    MAX_LINE, REGEX_NAMES, FileTail, Metrics, RunShape, compile_metrics_regex, match_line,
)
from trainables.command_template import (  # noqa: F401
    INT_PLACEHOLDERS, PLACEHOLDERS, TEXT_PLACEHOLDERS, TemplateError, check_template, layout_spellings, render_argv,
)
from trainables.presets import PRESETS, preset_patterns

DEFAULT_GRACE_S = 5.0
LOG_NAME = "command.log"
TAIL_LINES = 5  # lines of output quoted when a program printed nothing usable

# Output that means the program ran out of memory (searched in the last lines of both streams).
OOM_PATTERNS = re.compile(
    r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory|HIP out of memory"
    r"|RESOURCE_EXHAUSTED: Out of memory|std::bad_alloc|^MemoryError\b|\bMemoryError:"
)
KILLED_LINE = re.compile(r"\bKilled\b")  # a shell's report of a SIGKILLed child: "<pid> Killed  <command>"


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class CommandOutcome:
    status: Status
    reason: str
    summary: dict[str, Any]
    steps: list[dict[str, Any]]
    returncode: int | None
    duration_s: float
    log_path: Path
    notes: list[str] = field(default_factory=list)  # metric lines that were ignored, and why
    derived: dict[str, str] = field(default_factory=dict)  # metric -> the printed figure it was computed from


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies waiting to be reaped do not count)."""
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_group(proc: subprocess.Popen, grace_s: float) -> bool:
    """SIGTERM the process group, SIGKILL what is left after `grace_s`; True if SIGKILL was needed."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        proc.poll()
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()
        if not _group_alive(pgid):
            return False
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    end = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < end:
        time.sleep(0.05)
    return True


def _signal_name(returncode: int) -> str | None:
    number = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 160 else None
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Pump(threading.Thread):
    """Copies one pipe to the shared log, keeps its last lines, and hands stdout lines to a parser."""

    def __init__(self, stream, log, lock: threading.Lock, on_line: Callable[[str], None] | None,
                 mask: Callable[[bytes], bytes] = lambda raw: raw) -> None:
        super().__init__(daemon=True)
        self.stream, self.log, self.lock, self.on_line, self.mask = stream, log, lock, on_line, mask
        self.tail: deque[str] = deque(maxlen=200)

    def run(self) -> None:
        try:
            for raw in iter(lambda: self.stream.readline(MAX_LINE), b""):
                raw = self.mask(raw)
                with self.lock:
                    if not self.log.closed:
                        self.log.write(raw if raw.endswith(b"\n") else raw + b"\n")
                        self.log.flush()
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.tail.append(line)
                if self.on_line is not None:
                    self.on_line(line)
        except (OSError, ValueError):
            pass
        finally:
            try:
                self.stream.close()
            except OSError:
                pass


# Credentials of the tuner's own services, which the process running a program may hold (a Ray
# worker holds the cluster's token): a tuned program never needs them, and a crash dump or a
# printed environment would put them in its log. Withheld from what it inherits; a program that
# does need one gets it through its own `env` / `env_from`.
WITHHELD_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                "PGPASSWORD", "AUTOTUNE_STORAGE")


def masker(secrets: Sequence[str]) -> Callable[[bytes], bytes]:
    """Each secret value replaced by *** in a line of output (values under 4 characters are not
    masked: they would blank ordinary text, and are no secret)."""
    values = sorted({v.encode() for v in secrets if isinstance(v, str) and len(v) >= 4}, key=len, reverse=True)
    if not values:
        return lambda raw: raw
    pattern = re.compile(b"|".join(re.escape(v) for v in values))
    return lambda raw: pattern.sub(b"***", raw)


def _child_env(env: Mapping[str, str | None] | None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in WITHHELD_ENV}
    out.setdefault("PYTHONUNBUFFERED", "1")
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[str(key)] = str(value)
    return out


def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    metrics_file: str | os.PathLike[str] | None = None,
    metrics_regex: Mapping[str, str | re.Pattern[str]] | None = None,
    metrics_preset: str | None = None,
    timeout_s: float,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    warmup_steps: int = 0,
    tokens_per_step: float | None = None,
    shape: RunShape | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    poll_s: float = 0.05,
    on_start: Callable[[int], None] | None = None,
    secrets: Sequence[str] = (),
) -> CommandOutcome:
    """Run one trial's command to its end (or its time limit) and say how it went.

    * `argv`: the rendered command (`render_argv`); it runs without a shell, in a new session
      (its own process group), stdin closed.
    * `env`: variables set on top of this process's environment (None removes one);
      `PYTHONUNBUFFERED=1` is set unless given.
    * `metrics_file` (relative to `cwd`), or `metrics_preset` and/or `metrics_regex`: where the
      metrics come from, the file or the printed lines (see the module docstring). An existing metrics file is removed first, so a
      previous run's lines are never read as this one's.
    * `on_step(step)`: called in this thread for each step as it arrives, with
      `{"type": "step", "step", "phase", and any of "loss", "step_time_s", "tokens_per_s"}`.
      If it raises, the command's process group is stopped and the exception propagates.
    * `log_path`: where stdout and stderr go, line by line (default `<cwd>/command.log`).
    * `warmup_steps`: steps without a `phase` that count as warm-up (left out of the summary).
    * `tokens_per_step`: global batch x sequence length, to compute `tokens_per_s` from step times.
    * `shape`: the trial's sequence length, world size and global batch, to turn printed figures in
      other units (samples/s, steps/s, tokens/s per device, ms) into autotune's metrics.
    * `grace_s`: between SIGTERM and SIGKILL when the process group is stopped.
    * `on_start(pid)`: called once the command runs, with its pid (the leader of its process
      group), so that whoever owns the trial can stop the whole group even if this never returns.
    * `secrets`: values the program was given as secrets (`trainable.env_from`): masked in every
      line of its output before the log, the tails and the reason see it, so that a program
      that prints one when it fails writes it nowhere.

    A command that cannot start returns `crashed` with the reason; nothing here raises for a
    failed run. Bad arguments (neither or both metric sources, a bad regex) raise ValueError.
    """
    printed_lines = metrics_regex is not None or metrics_preset is not None
    if (metrics_file is None) == (not printed_lines):
        raise ValueError("give exactly one of metrics_file (a JSON-lines file the program writes) or "
                         "metrics_preset / metrics_regex (patterns for its printed lines)")
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a non-empty list of strings (use render_argv on the template)")
    patterns = None
    if metrics_preset is not None:
        patterns = compile_metrics_regex(preset_patterns(metrics_preset, metrics_regex))
    elif metrics_regex is not None:
        patterns = compile_metrics_regex(metrics_regex)
    workdir = Path(cwd) if cwd is not None else Path.cwd()
    log = Path(log_path) if log_path is not None else workdir / LOG_NAME
    log.parent.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(max(0, int(warmup_steps)), on_step, shape, unique_steps=metrics_preset is not None)
    tail = None
    if metrics_file is not None:
        mpath = Path(metrics_file)
        mpath = mpath if mpath.is_absolute() else workdir / mpath
        mpath.parent.mkdir(parents=True, exist_ok=True)
        mpath.unlink(missing_ok=True)
        tail = FileTail(mpath, metrics)

    printed: queue.SimpleQueue[tuple[dict[str, Any], dict[str, float], list[str], int]] = queue.SimpleQueue()
    arrived = threading.Event()
    counter = 0

    def parse_stdout(line: str) -> None:
        nonlocal counter
        counter += 1
        step, summary, problems = match_line(patterns, line)
        if step or summary or problems:
            printed.put((step, summary, problems, counter))
            arrived.set()

    start = time.monotonic()
    log_file = open(log, "wb")
    log_file.write(f"$ {shlex.join(argv)}\n".encode())
    log_file.flush()
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=workdir, env=_child_env(env),
                                start_new_session=True)
    except OSError as exc:
        log_file.write(f"cannot start: {exc}\n".encode())
        log_file.close()
        what = "no such program" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
        return CommandOutcome(Status.CRASHED, f"cannot start {argv[0]!r}: {what}; check the first template item "
                                              f"(the program) and PATH", {}, [], None,
                              time.monotonic() - start, log)

    if on_start is not None:
        try:
            on_start(proc.pid)
        except BaseException:
            _stop_group(proc, 0.0)
            log_file.close()
            raise
    lock = threading.Lock()
    mask = masker(secrets)
    out_pump = _Pump(proc.stdout, log_file, lock, parse_stdout if patterns is not None else None, mask)
    err_pump = _Pump(proc.stderr, log_file, lock, None, mask)
    out_pump.start()
    err_pump.start()

    def drain(final: bool = False) -> None:
        while True:
            try:
                step, summary, problems, lineno = printed.get_nowait()
            except queue.Empty:
                break
            for p in problems:
                metrics.note(f"stdout line {lineno}: {p}; left out")
            for name, value in summary.items():
                metrics.set_summary(name, value)
            if step:
                metrics.add_step(step, f"stdout line {lineno}")
        if tail is not None:
            tail.poll(final=final)

    timed_out = killed = False
    leftovers = False
    deadline = start + float(timeout_s)
    try:
        while True:
            arrived.clear()
            drain()
            if proc.poll() is not None:
                break
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                killed = _stop_group(proc, grace_s)
                break
            arrived.wait(min(poll_s, deadline - now))  # a printed line wakes it at once
        duration = time.monotonic() - start
        if not timed_out and _group_alive(proc.pid):
            leftovers = True
            _stop_group(proc, grace_s)
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            _stop_group(proc, grace_s)  # an exception (on_step, Ctrl-C) must not leave the command running
        for pump in (out_pump, err_pump):
            pump.join(timeout=grace_s + 2)
        with lock:
            log_file.close()
    drain(final=True)
    returncode = proc.returncode

    summary = metrics.computed(tokens_per_step)
    notes = list(metrics.notes)
    if metrics.ignored > len(metrics.notes):
        notes.append(f"... and {metrics.ignored - len(metrics.notes)} more ignored metric lines")
    if leftovers:
        notes.append("processes the command left running after it exited were stopped")
    status, reason = _classify(returncode, timed_out, killed, timeout_s, grace_s, metrics, summary,
                               out_pump.tail, err_pump.tail, tail, patterns, metrics_preset, log)
    reason = mask(reason.encode()).decode("utf-8", "replace")  # a metrics file's lines are not masked above
    return CommandOutcome(status, reason, summary, metrics.steps, returncode, duration, log, notes,
                          dict(metrics.derived))


def _classify(returncode: int | None, timed_out: bool, killed: bool, timeout_s: float, grace_s: float,
              metrics: Metrics, summary: dict[str, Any], out_tail: Iterable[str], err_tail: Iterable[str],
              tail: FileTail | None, patterns: dict[str, re.Pattern[str]] | None, preset: str | None,
              log_path: Path) -> tuple[Status, str]:
    if timed_out:
        how = f"SIGTERM, then SIGKILL after {grace_s:g} s" if killed else "SIGTERM"
        n = len(metrics.steps)
        return Status.TIMEOUT, (f"the command ran past its {timeout_s:g} s limit after {n} step{'s' * (n != 1)}; "
                                f"its process group was stopped ({how})")
    err_lines = [line for line in err_tail if line.strip()]
    out_lines = [line for line in out_tail if line.strip()]
    if returncode:
        signame = _signal_name(returncode)
        how = (f"killed by {signame}" + (f" (exit {returncode})" if returncode > 0 else "")) if signame \
            else f"exit code {returncode}"
        oom_line = next((line for line in reversed(err_lines + out_lines) if OOM_PATTERNS.search(line)), None)
        if oom_line is None and returncode in (-9, 137) and \
                any(KILLED_LINE.search(line) for line in err_lines + out_lines):
            oom_line = "Killed (the kernel's out-of-memory killer, most likely)"
        if oom_line is not None:
            return Status.OOM, _one_line(f"out of memory ({how}): {oom_line}")
        if metrics.summary_status and metrics.summary_status[0] != Status.OK.value:
            return Status(metrics.summary_status[0]), _one_line(metrics.summary_status[1] or how)
        last = err_lines[-1] if err_lines else out_lines[-1] if out_lines else "(no output)"
        extra = ""
        if returncode in (-9, 137):
            extra = " (from outside the program: the out-of-memory killer or a scheduler)"
        return Status.CRASHED, _one_line(f"{how}{extra}: {last}")
    if metrics.summary_status and metrics.summary_status[0] != Status.OK.value:
        return Status(metrics.summary_status[0]), _one_line(metrics.summary_status[1] or "the program reported it")
    if not metrics.steps and not metrics.saw_summary:
        if tail is not None:
            where = (f"{tail.path} holds no step or summary line" if tail.exists
                     else f"{tail.path} was never created")
            return Status.NO_METRICS, _one_line(
                f"no metrics: the command exited 0 but {where}; it must write JSON lines "
                f"({{\"type\": \"step\", ...}} per step, then {{\"type\": \"summary\", ...}}) to the path "
                f"given by {{metrics_file}} (see trainables.command); {_last_lines(out_lines, err_lines)}", 1200)
        enable = f"{PRESETS[preset].enable}; " if preset is not None and PRESETS[preset].enable else ""
        return Status.NO_METRICS, _one_line(
            f"no metrics: the command exited 0 but no printed line matched {_what_read(patterns, preset)}; "
            f"{enable}{_last_lines(out_lines, err_lines)} (all of it in {log_path})", 1400)
    if "tokens_per_s" not in summary and "step_time_s" not in summary:
        if tail is not None:
            what = "neither tokens_per_s nor step_time_s in its steps or summary; report at least one of them"
        else:
            what = (f"{len(metrics.steps)} step line(s) matched {_what_read(patterns, preset)} but none gave a "
                    f"speed (tokens_per_s, step_time_s, or a figure they are derived from)")
        return Status.NO_METRICS, _one_line(
            f"no metrics: the command exited 0 but reported no throughput: {what}; "
            f"{_last_lines(out_lines, err_lines)}", 1200)
    return Status.OK, ""


def _what_read(patterns: Mapping[str, re.Pattern[str]] | None, preset: str | None) -> str:
    if preset is not None:
        return f"metrics_preset {preset} ({PRESETS[preset].reads})"
    return "metrics_regex (" + ", ".join(f"{k}: {rx.pattern}" for k, rx in sorted((patterns or {}).items())) + ")"


def _last_lines(out_lines: list[str], err_lines: list[str]) -> str:
    lines = out_lines[-TAIL_LINES:] or err_lines[-TAIL_LINES:]
    if not lines:
        return "it printed nothing"
    return "its last lines: " + " | ".join(line.strip()[:160] for line in lines)
