"""A user's own training command as a trainable: an argv template in, measured metrics out.

autotune can tune any program that trains (Megatron-LM, torchtitan, an in-house script) as long
as the layout reaches it through its command line and its speed comes back through one of the
two channels below. This module has no Ray and no torch in it: it renders the command for one
trial, runs it in a process group of its own, reads its metrics as they appear, and says how the
run ended (`autotune.schema.Status`).

The command template
--------------------
A list of strings, one argv element each. It runs **without a shell**: no quoting, globbing,
pipes or `$VARS`; a value can never become a second argument. Placeholders, filled per trial:

    whole numbers  {ep} {tp} {pp} {dp} {micro_batch_size} {global_batch_size} {seq_len}
                   {nproc} {nnodes} {node_rank} {master_port} {world_size} {seed}
    text           {precision} {recompute} {schedule} {master_addr} {metrics_file} {trial_dir}

`{{` and `}}` are literal braces. Text values may only use letters, digits and `. _ : / @ -`
and may not start with `-`. Example::

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

**Printed lines only**: `metrics_regex` maps metric names to regular expressions with exactly
one group, searched (`re.search`) in each stdout line; anchor them (`^step ...`) so that other
lines mentioning the same words are not read as steps. A line matching `step_time_s`,
`tokens_per_s` or `loss` is one step (with `step` from a `step` pattern on the same line, else
counted); a match of any other summary metric (e.g. `peak_mem_bytes`) sets that summary value
(the last match wins). The summary is then computed from the steps as above. Python programs
print unbuffered here (`PYTHONUNBUFFERED=1`), so their lines arrive as they are printed.

How a run ends
--------------
`ok`; `timeout` (the whole process group is stopped: SIGTERM, then SIGKILL after a grace);
`oom` (a non-zero exit whose output shows an out-of-memory error: `torch.OutOfMemoryError`,
`CUDA out of memory`, a Python `MemoryError`, or `Killed` with exit -9/137); `crashed` (any other
non-zero exit, with the exit code or signal and the last stderr line; or an exit 0 that reported
no metrics). Processes the command leaves behind are stopped when it exits.
"""

from __future__ import annotations

import difflib
import json
import math
import operator
import os
import queue
import re
import shlex
import signal
import statistics
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from autotune.schema import STEP_METRICS, SUMMARY_METRICS, Status

INT_PLACEHOLDERS: tuple[str, ...] = (
    "ep", "tp", "pp", "dp", "micro_batch_size", "global_batch_size", "seq_len",
    "nproc", "nnodes", "node_rank", "master_port", "world_size", "seed",
)
TEXT_PLACEHOLDERS: tuple[str, ...] = (
    "precision", "recompute", "schedule", "master_addr", "metrics_file", "trial_dir",
)
PLACEHOLDERS: tuple[str, ...] = INT_PLACEHOLDERS + TEXT_PLACEHOLDERS

SAFE_TEXT = re.compile(r"[A-Za-z0-9._:/@-]+")
SAFE_CHARS = "letters, digits and . _ : / @ -"
MAX_TEXT = 4096
MAX_LINE = 1 << 20  # longer lines (stdout or metrics file) are cut / skipped
DEFAULT_GRACE_S = 5.0
LOG_NAME = "command.log"

REGEX_NAMES: tuple[str, ...] = ("step",) + tuple(dict.fromkeys(STEP_METRICS + SUMMARY_METRICS))
# Output that means the program ran out of memory (searched in the last lines of both streams).
OOM_PATTERNS = re.compile(
    r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory|HIP out of memory"
    r"|RESOURCE_EXHAUSTED: Out of memory|std::bad_alloc|^MemoryError\b|\bMemoryError:"
)
KILLED_LINE = re.compile(r"\bKilled\b")  # a shell's report of a SIGKILLed child: "<pid> Killed  <command>"


class TemplateError(ValueError):
    """A command template or a value for it that cannot be used; one line naming the item and the fix."""


# ---------------------------------------------------------------------------------------------
# The template


_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def _where(index: int, item: str) -> str:
    shown = item if len(item) <= 60 else item[:57] + "..."
    return f"template item {index} ({shown!r})"


def _parse_item(index: int, item: Any) -> list[tuple[str, str]]:
    """An item as (kind, text) parts: ('text', literal) or ('field', placeholder name)."""
    if not isinstance(item, str):
        kind = "true/false" if isinstance(item, bool) else type(item).__name__
        raise TemplateError(f"template item {index} is {kind} ({item!r}), not text; write every argv element "
                            f"as a string, e.g. {str(item)!r}")
    if "\x00" in item:
        raise TemplateError(f"{_where(index, item)} holds a NUL character, which no argument can carry; remove it")
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _TOKEN.finditer(item):
        if m.start() > pos:
            parts.append(("text", item[pos:m.start()]))
        pos = m.end()
        token = m.group(0)
        if token in ("{{", "}}"):
            parts.append(("text", token[0]))
        elif token in ("{", "}"):
            raise TemplateError(f"{_where(index, item)}: unmatched {token!r} at column {m.start() + 1}; write "
                                f"{token * 2!r} for a literal brace, or a placeholder such as '{{ep}}'")
        else:
            name = m.group(1)
            if name not in PLACEHOLDERS:
                raise TemplateError(f"{_where(index, item)}: {_unknown(name)}")
            parts.append(("field", name))
    if pos < len(item):
        parts.append(("text", item[pos:]))
    return parts


def _unknown(name: str) -> str:
    if not name.strip():
        return "empty placeholder {}; write a name such as {ep}, or {{}} for literal braces"
    base = re.split(r"[:!.\[]", name, maxsplit=1)[0].strip()
    if base in PLACEHOLDERS and base != name:
        return (f"{{{name}}} has a format spec, conversion or attribute; write {{{base}}} "
                f"(the value is inserted as it is)")
    close = difflib.get_close_matches(name, PLACEHOLDERS, n=1, cutoff=0.6)
    hint = f"did you mean {{{close[0]}}}? " if close else ""
    return (f"unknown placeholder {{{name}}}; {hint}use one of "
            + " ".join("{" + p + "}" for p in PLACEHOLDERS) + " (or {{ }} for literal braces)")


def check_template(template: Sequence[str]) -> set[str]:
    """Validate a template's syntax; return the placeholders it uses."""
    if isinstance(template, (str, bytes)):
        raise TemplateError("the command template is text, not a list; give one string per argument, "
                            f"e.g. {shlex.split(template if isinstance(template, str) else template.decode())!r} "
                            f"(it runs without a shell)")
    if not isinstance(template, (list, tuple)):
        raise TemplateError(f"the command template is {type(template).__name__}, not a list of strings; "
                            f"give one string per argument")
    if not template:
        raise TemplateError("the command template is empty; give the program and its arguments, "
                            "e.g. ['python', 'train.py', '--ep', '{ep}']")
    used: set[str] = set()
    for i, item in enumerate(template):
        used.update(name for kind, name in _parse_item(i, item) if kind == "field")
    if not template[0].strip():
        raise TemplateError("template item 0 (the program) is empty; give the program to run")
    return used


def _check_value(name: str, value: Any, where: str) -> str:
    if name in INT_PLACEHOLDERS:
        try:
            if isinstance(value, bool):
                raise TypeError
            number = operator.index(value)
        except TypeError:
            raise TemplateError(f"{where}: {{{name}}} must be a whole number, got {type(value).__name__} "
                                f"{value!r}; pass an int") from None
        if number < 0:
            raise TemplateError(f"{where}: {{{name}}} is {number}; it must be 0 or more")
        return str(number)
    if not isinstance(value, str):
        raise TemplateError(f"{where}: {{{name}}} must be text, got {type(value).__name__} {value!r}; "
                            f"pass a string")
    if not value:
        raise TemplateError(f"{where}: {{{name}}} is empty; give a non-empty value")
    if len(value) > MAX_TEXT:
        raise TemplateError(f"{where}: {{{name}}} is {len(value)} characters long, over {MAX_TEXT}; shorten it")
    if not SAFE_TEXT.fullmatch(value):
        bad = next(c for c in value if not SAFE_TEXT.fullmatch(c))
        raise TemplateError(f"{where}: {{{name}}} value {value!r} holds {bad!r}; values may only use "
                            f"{SAFE_CHARS} (the command runs without a shell, each value stays one argument)")
    if value.startswith("-"):
        raise TemplateError(f"{where}: {{{name}}} value {value!r} starts with '-', which the program would read "
                            f"as an option; give a value that starts with a letter, digit, '.' or '/'")
    return value


def render_argv(template: Sequence[str], values: Mapping[str, object]) -> list[str]:
    """Fill a command template for one trial: one template item -> one argv element.

    Only the placeholders the template uses need a value; other keys of `values` are ignored.
    Raises `TemplateError` (a ValueError) naming the item and the fix.
    """
    check_template(template)
    argv: list[str] = []
    for i, item in enumerate(template):
        out = []
        for kind, text in _parse_item(i, item):
            if kind == "text":
                out.append(text)
                continue
            if text not in values:
                raise TemplateError(f"{_where(i, item)}: no value for {{{text}}}; pass it in the values "
                                    f"(or remove the placeholder)")
            out.append(_check_value(text, values[text], _where(i, item)))
        argv.append("".join(out))
    return argv


# ---------------------------------------------------------------------------------------------
# Metrics


def _number(value: Any) -> int | float | None:
    """A JSON number as it was written (byte counts stay whole); anything else is None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class _Metrics:
    """Steps and summary values as they arrive, from either channel."""

    def __init__(self, warmup_steps: int, on_step: Callable[[dict[str, Any]], None] | None) -> None:
        self.warmup_steps = warmup_steps
        self.on_step = on_step
        self.steps: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.summary_status: tuple[str, str] | None = None
        self.saw_summary = False
        self.notes: list[str] = []
        self._ignored = 0

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text)
        self._ignored += 1

    def add_step(self, raw: Mapping[str, Any], where: str) -> None:
        step: dict[str, Any] = {"type": "step"}
        number = raw.get("step")
        if isinstance(number, bool) or not isinstance(number, int):
            if number is not None:
                self.note(f"{where}: 'step' {number!r} is not a whole number; counted instead")
            number = len(self.steps)
        step["step"] = number
        phase = raw.get("phase")
        if phase not in ("warmup", "measure"):
            phase = "warmup" if len(self.steps) < self.warmup_steps else "measure"
        step["phase"] = phase
        for name in STEP_METRICS:
            if name in raw:
                value = _number(raw[name])
                if value is None:
                    self.note(f"{where}: {name} {raw[name]!r} is not a number; left out")
                else:
                    step[name] = value
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(dict(step))

    def add_summary(self, raw: Mapping[str, Any], where: str) -> None:
        self.saw_summary = True
        for name in SUMMARY_METRICS:
            if name in raw:
                value = _number(raw[name])
                if value is None:
                    self.note(f"{where}: summary {name} {raw[name]!r} is not a number; left out")
                else:
                    self.summary[name] = value
        status = raw.get("status")
        if status is not None:
            try:
                self.summary_status = (Status(status).value, str(raw.get("reason") or ""))
            except ValueError:
                self.note(f"{where}: summary status {status!r} is not one of "
                          f"{', '.join(s.value for s in Status)}; ignored")

    def record(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            self.note(f"{where}: not a JSON object; ignored")
            return
        kind = obj.get("type")
        if kind == "step":
            self.add_step(obj, where)
        elif kind == "summary":
            self.add_summary(obj, where)

    def computed(self, tokens_per_step: float | None) -> dict[str, Any]:
        """The summary: what the program reported, completed from the measured steps."""
        measured = [s for s in self.steps if s["phase"] == "measure"] or self.steps
        out: dict[str, Any] = {}
        times = [s["step_time_s"] for s in measured if "step_time_s" in s]
        if times:
            out["step_time_s"] = statistics.median(times)
            out["step_time_p90_s"] = _percentile(times, 0.9)
        rates = [s["tokens_per_s"] for s in measured if "tokens_per_s" in s]
        if tokens_per_step and times and out["step_time_s"] > 0:
            out["tokens_per_s"] = tokens_per_step / out["step_time_s"]
        elif rates:
            out["tokens_per_s"] = statistics.median(rates)
        losses = [s["loss"] for s in self.steps if "loss" in s]
        if losses:
            out["loss_first"], out["loss_last"] = losses[0], losses[-1]
        out.update(self.summary)
        if "tokens_per_s" not in out and tokens_per_step and out.get("step_time_s"):
            out["tokens_per_s"] = tokens_per_step / out["step_time_s"]
        return out

    @property
    def ignored(self) -> int:
        return self._ignored


class _FileTail:
    """A JSON-lines file another process appends to, read one complete line at a time."""

    def __init__(self, path: Path, metrics: _Metrics) -> None:
        self.path, self.metrics = path, metrics
        self.offset = 0
        self.buffer = b""
        self.lineno = 0
        self.exists = False

    def poll(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                self.exists = True
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:  # rewritten from the start
                    self.metrics.note(f"{self.path.name}: the file shrank while being read; read again from the top")
                    self.offset, self.buffer = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            self.metrics.note(f"{self.path.name}: cannot be read ({exc.strerror or exc})")
            return
        self.offset += len(data)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if final and self.buffer:
            lines.append(self.buffer)
            self.buffer = b""
        if len(self.buffer) > MAX_LINE:
            self.metrics.note(f"{self.path.name}: a line longer than {MAX_LINE} bytes was skipped")
            self.buffer = b""
        for raw in lines:
            self.lineno += 1
            if not raw.strip():
                continue
            where = f"{self.path.name}:{self.lineno}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.metrics.note(f"{where}: not JSON; ignored")
                continue
            self.metrics.record(obj, where)


def compile_metrics_regex(patterns: Mapping[str, str | re.Pattern[str]]) -> dict[str, re.Pattern[str]]:
    """Check a `metrics_regex` mapping: known metric names, one group each."""
    if not isinstance(patterns, Mapping) or not patterns:
        raise ValueError("metrics_regex must be a non-empty mapping of metric name -> regex with one group, "
                         "e.g. {'step_time_s': r'step time ([0-9.]+) s'}")
    compiled: dict[str, re.Pattern[str]] = {}
    for name, pattern in patterns.items():
        if name not in REGEX_NAMES:
            close = difflib.get_close_matches(str(name), REGEX_NAMES, n=1, cutoff=0.6)
            raise ValueError(f"metrics_regex: {name!r} is not a metric name; "
                             + (f"did you mean {close[0]!r}? " if close else "")
                             + f"use step, {', '.join(STEP_METRICS)} or a summary metric from autotune.schema")
        try:
            rx = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ValueError(f"metrics_regex: {name}: {pattern!r} is not a valid regex ({exc}); fix it") from None
        if rx.groups != 1:
            raise ValueError(f"metrics_regex: {name}: {rx.pattern!r} has {rx.groups} groups; it needs exactly one, "
                             f"around the number (use (?:...) for other groups)")
        compiled[name] = rx
    if not any(n in compiled for n in STEP_METRICS):
        raise ValueError(f"metrics_regex: no pattern for {', '.join(STEP_METRICS)}; at least one is needed to "
                         f"see steps")
    return compiled


def _match_line(patterns: dict[str, re.Pattern[str]], line: str) -> tuple[dict[str, Any], dict[str, float], list[str]]:
    """One printed line -> (step fields, summary values, problems)."""
    step: dict[str, Any] = {}
    summary: dict[str, float] = {}
    problems: list[str] = []
    for name, rx in patterns.items():
        m = rx.search(line)
        if not m or m.group(1) is None:
            continue
        text = m.group(1)
        try:
            value: int | float = int(text) if re.fullmatch(r"\s*[+-]?\d+\s*", text) else float(text)
        except ValueError:
            problems.append(f"{name} matched {text!r}, which is not a number")
            continue
        if name == "step":
            if isinstance(value, int):
                step["step"] = value
            else:
                problems.append(f"step matched {text!r}, which is not a whole number")
        elif name in STEP_METRICS:
            step[name] = value
        else:
            summary[name] = value
    if not any(n in step for n in STEP_METRICS):
        step = {}
    return step, summary, problems


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

    def __init__(self, stream, log, lock: threading.Lock, on_line: Callable[[str], None] | None) -> None:
        super().__init__(daemon=True)
        self.stream, self.log, self.lock, self.on_line = stream, log, lock, on_line
        self.tail: deque[str] = deque(maxlen=200)

    def run(self) -> None:
        try:
            for raw in iter(lambda: self.stream.readline(MAX_LINE), b""):
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


def _child_env(env: Mapping[str, str | None] | None) -> dict[str, str]:
    out = dict(os.environ)
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
    timeout_s: float,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    warmup_steps: int = 0,
    tokens_per_step: float | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    poll_s: float = 0.05,
) -> CommandOutcome:
    """Run one trial's command to its end (or its time limit) and say how it went.

    * `argv`: the rendered command (`render_argv`); it runs without a shell, in a new session
      (its own process group), stdin closed.
    * `env`: variables set on top of this process's environment (None removes one);
      `PYTHONUNBUFFERED=1` is set unless given.
    * `metrics_file` (relative to `cwd`) or `metrics_regex`: where the metrics come from, exactly
      one of them (see the module docstring). An existing metrics file is removed first, so a
      previous run's lines are never read as this one's.
    * `on_step(step)`: called in this thread for each step as it arrives, with
      `{"type": "step", "step", "phase", and any of "loss", "step_time_s", "tokens_per_s"}`.
      If it raises, the command's process group is stopped and the exception propagates.
    * `log_path`: where stdout and stderr go, line by line (default `<cwd>/command.log`).
    * `warmup_steps`: steps without a `phase` that count as warm-up (left out of the summary).
    * `tokens_per_step`: global batch x sequence length, to compute `tokens_per_s` from step times.
    * `grace_s`: between SIGTERM and SIGKILL when the process group is stopped.

    A command that cannot start returns `crashed` with the reason; nothing here raises for a
    failed run. Bad arguments (neither or both metric sources, a bad regex) raise ValueError.
    """
    if (metrics_file is None) == (metrics_regex is None):
        raise ValueError("give exactly one of metrics_file (a JSON-lines file the program writes) or "
                         "metrics_regex (patterns for its printed lines)")
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a non-empty list of strings (use render_argv on the template)")
    patterns = compile_metrics_regex(metrics_regex) if metrics_regex is not None else None
    workdir = Path(cwd) if cwd is not None else Path.cwd()
    log = Path(log_path) if log_path is not None else workdir / LOG_NAME
    log.parent.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(max(0, int(warmup_steps)), on_step)
    tail = None
    if metrics_file is not None:
        mpath = Path(metrics_file)
        mpath = mpath if mpath.is_absolute() else workdir / mpath
        mpath.parent.mkdir(parents=True, exist_ok=True)
        mpath.unlink(missing_ok=True)
        tail = _FileTail(mpath, metrics)

    printed: queue.SimpleQueue[tuple[dict[str, Any], dict[str, float], list[str], int]] = queue.SimpleQueue()
    arrived = threading.Event()
    counter = 0

    def parse_stdout(line: str) -> None:
        nonlocal counter
        counter += 1
        step, summary, problems = _match_line(patterns, line)
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

    lock = threading.Lock()
    out_pump = _Pump(proc.stdout, log_file, lock, parse_stdout if patterns is not None else None)
    err_pump = _Pump(proc.stderr, log_file, lock, None)
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
            metrics.summary.update(summary)
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
                               out_pump.tail, err_pump.tail, tail, patterns, log)
    return CommandOutcome(status, reason, summary, metrics.steps, returncode, duration, log, notes)


def _classify(returncode: int | None, timed_out: bool, killed: bool, timeout_s: float, grace_s: float,
              metrics: _Metrics, summary: dict[str, Any], out_tail: Iterable[str], err_tail: Iterable[str],
              tail: _FileTail | None, patterns: dict[str, re.Pattern[str]] | None,
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
            return Status.CRASHED, _one_line(
                f"the command exited 0 but reported no metrics: {where}; it must write JSON lines "
                f"({{\"type\": \"step\", ...}} per step, then {{\"type\": \"summary\", ...}}) to the path "
                f"given by {{metrics_file}} (see trainables.command)")
        names = ", ".join(sorted(patterns or {}))
        return Status.CRASHED, _one_line(
            f"the command exited 0 but reported no metrics: no stdout line matched metrics_regex ({names}); "
            f"check the patterns against the printed lines in {log_path.name}")
    if "tokens_per_s" not in summary and "step_time_s" not in summary:
        return Status.CRASHED, _one_line(
            "the command exited 0 but reported no throughput: neither tokens_per_s nor step_time_s in its steps "
            "or summary; report at least one of them")
    return Status.OK, ""
