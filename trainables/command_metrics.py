"""A training program's metrics, from its JSON-lines file or its printed lines, in autotune's terms.

Frameworks print their speed in their own units: samples/s (Hugging Face, DeepSpeed), steps/s,
tokens/s per device (torchtitan's `tps`), milliseconds per iteration (Megatron-LM), memory in GiB
or MiB. Those figures are read under the names of `STEP_RAW` and `SUMMARY_RAW` and turned into
autotune's metrics with what autotune knows of the run (`RunShape`: sequence length, world size,
global batch), and each figure made that way is recorded in `derived` with what it came from,
so that a report can say which numbers the program printed and which autotune computed.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from autotune.schema import STEP_METRICS, SUMMARY_METRICS, Status

MAX_LINE = 1 << 20  # longer lines (stdout or metrics file) are cut / skipped

# Figures a program prints that determine autotune's metrics (name: what it is).
STEP_RAW: dict[str, str] = {
    "step_time_ms": "step time in milliseconds",
    "tokens_per_s_per_device": "tokens/s of one device (global tokens/s / world size)",
    "step_samples_per_s": "samples/s of the whole run over one step (global batch / step time)",
}
SUMMARY_RAW: dict[str, str] = {
    "steps_per_s": "optimizer steps per second over the run",
    "run_tokens_per_s": "tokens/s over the run as the program counts its tokens (the last value printed counts)",
    "peak_mem_gib": "peak memory of the worst rank in GiB (2^30 bytes)",
    "peak_mem_mib": "peak memory of the worst rank in MiB (2^20 bytes)",
}
STEP_NAMES: tuple[str, ...] = STEP_METRICS + tuple(STEP_RAW)  # a printed line matching one of these is a step
THROUGHPUT_SOURCES: tuple[str, ...] = ("samples_per_s", "steps_per_s")  # summary figures that give the speed
REGEX_NAMES: tuple[str, ...] = ("step",) + tuple(dict.fromkeys(STEP_NAMES + SUMMARY_METRICS + tuple(SUMMARY_RAW)))
_MAX_NAMES = ("peak_mem_bytes", "peak_mem_gib", "peak_mem_mib")  # several ranks print theirs: the worst counts
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes (torchtitan colours its lines on a terminal)


@dataclass(frozen=True)
class RunShape:
    """What autotune knows of a trial's run, to turn printed figures into its metrics."""

    seq_len: int | None = None
    world_size: int | None = None
    global_batch_size: int | None = None

    @property
    def tokens_per_step(self) -> float | None:
        if self.seq_len and self.global_batch_size:
            return float(self.seq_len * self.global_batch_size)
        return None


def _fmt(x: float) -> str:
    return f"{x:.6g}"


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



class Metrics:
    """Steps and summary values as they arrive, from either channel."""

    def __init__(self, warmup_steps: int, on_step: Callable[[dict[str, Any]], None] | None,
                 shape: RunShape | None = None, unique_steps: bool = False) -> None:
        self.warmup_steps = warmup_steps
        self.on_step = on_step
        self.shape = shape or RunShape()
        self.unique_steps = unique_steps  # a step number seen before is another rank's copy of that step
        self.steps: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.summary_status: tuple[str, str] | None = None
        self.saw_summary = False
        self.notes: list[str] = []
        self.derived: dict[str, str] = {}  # metric -> how it was computed from what the program printed
        self._ignored = 0
        self._seen_numbers: set[int] = set()

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text)
        self._ignored += 1

    def _from_raw(self, raw: Mapping[str, Any], step: dict[str, Any], where: str) -> None:
        """Step figures in a framework's units -> step_time_s / tokens_per_s of this step."""
        seq, world, gbs = self.shape.seq_len, self.shape.world_size, self.shape.global_batch_size
        values = {name: _number(raw[name]) for name in STEP_RAW if name in raw}
        for name, value in values.items():
            if value is None:
                self.note(f"{where}: {name} {raw[name]!r} is not a number; left out")
        ms, per_device, samples = (values.get(n) for n in STEP_RAW)
        if ms is not None and ms > 0 and "step_time_s" not in step:
            step["step_time_s"] = ms / 1000.0
            self.derived.setdefault("step_time_s", "step_time_ms / 1000 (each step)")
        if per_device is not None and "tokens_per_s" not in step:
            if world:
                step["tokens_per_s"] = per_device * world
                self.derived.setdefault("tokens_per_s", f"tokens_per_s_per_device x world size {world} (each step)")
            else:
                self.note(f"{where}: tokens_per_s_per_device needs the world size; left out")
        if samples is not None and samples > 0:
            if "tokens_per_s" not in step and seq:
                step["tokens_per_s"] = samples * seq
                self.derived.setdefault("tokens_per_s", f"step_samples_per_s x seq_len {seq} (each step)")
            if "step_time_s" not in step and gbs:
                step["step_time_s"] = gbs / samples
                self.derived.setdefault("step_time_s",
                                        f"global batch {gbs} / step_samples_per_s (each step)")
        rate = _positive(step.get("tokens_per_s"))
        if rate is not None and "step_time_s" not in step and seq and gbs:
            # A program that prints only its throughput (torchtitan's tps): the step's time follows.
            step["step_time_s"] = seq * gbs / rate
            self.derived.setdefault("step_time_s", f"global batch x seq_len {seq * gbs:g} / tokens_per_s (each step)")

    def add_step(self, raw: Mapping[str, Any], where: str) -> None:
        step: dict[str, Any] = {"type": "step"}
        number = raw.get("step")
        copy = False
        if isinstance(number, bool) or not isinstance(number, int):
            if number is not None:
                self.note(f"{where}: 'step' {number!r} is not a whole number; counted instead")
            number = len(self.steps)
        elif self.unique_steps:
            copy = number in self._seen_numbers
            self._seen_numbers.add(number)
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
        if self.unique_steps and step.get("loss", 0) < 0:
            # A rank without the last pipeline stage prints a sentinel, not a loss (torchtitan: -1 per
            # data-parallel rank): cross entropy is never negative.
            del step["loss"]
        self._from_raw(raw, step, where)
        if copy:
            self._merge(step)
            return
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(dict(step))

    def _merge(self, copy: dict[str, Any]) -> None:
        """Another rank's line for a step already read: the step lasts as long as its slowest rank
        (the longest time, the lowest rate), the loss is whichever rank printed one, the memory
        the largest."""
        step = next(s for s in reversed(self.steps) if s["step"] == copy["step"])
        for name, value in copy.items():
            if name in ("type", "step", "phase"):
                continue
            if name not in step:
                step[name] = value
            elif name == "step_time_s":
                step[name] = max(step[name], value)
            elif name in ("tokens_per_s", "samples_per_s"):
                step[name] = min(step[name], value)
            elif name in _MAX_NAMES:
                step[name] = max(step[name], value)

    def set_summary(self, name: str, value: int | float) -> None:
        """One summary figure; for peak memory the largest seen wins (each rank may print its own)."""
        if name in _MAX_NAMES and name in self.summary:
            self.summary[name] = max(self.summary[name], value)
        else:
            self.summary[name] = value

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

    def computed(self, tokens_per_step: float | None = None) -> dict[str, Any]:
        """The summary: what the program reported, completed from the measured steps and the
        figures it printed in other units."""
        tokens_per_step = tokens_per_step or self.shape.tokens_per_step
        measured = [s for s in self.steps if s["phase"] == "measure"] or self.steps
        out: dict[str, Any] = {}
        times = [s["step_time_s"] for s in measured if "step_time_s" in s]
        if times:
            out["step_time_s"] = statistics.median(times)
            out["step_time_p90_s"] = _percentile(times, 0.9)
        rates = [s["tokens_per_s"] for s in measured if "tokens_per_s" in s]
        if tokens_per_step and times and out["step_time_s"] > 0:
            out["tokens_per_s"] = tokens_per_step / out["step_time_s"]
            if "step_time_s" in self.derived:
                self.derived.setdefault("tokens_per_s", f"global batch x seq_len {tokens_per_step:g} / step_time_s")
        elif rates:
            out["tokens_per_s"] = statistics.median(rates)
        losses = [s["loss"] for s in self.steps if "loss" in s]
        if losses:
            out["loss_first"], out["loss_last"] = losses[0], losses[-1]
        raw = {k: self.summary.pop(k) for k in list(self.summary) if k in SUMMARY_RAW}
        out.update(self.summary)
        self.summary.update(raw)
        self._from_summary_raw(out, raw, tokens_per_step)
        if "tokens_per_s" not in out and tokens_per_step and out.get("step_time_s"):
            out["tokens_per_s"] = tokens_per_step / out["step_time_s"]
        return out

    def _from_summary_raw(self, out: dict[str, Any], raw: dict[str, Any], tokens_per_step: float | None) -> None:
        """Whole-run figures (samples/s, steps/s, memory in GiB/MiB) -> autotune's summary metrics."""
        seq, gbs = self.shape.seq_len, self.shape.global_batch_size
        samples, steps = _positive(out.get("samples_per_s")), _positive(raw.get("steps_per_s"))
        counted = _positive(raw.get("run_tokens_per_s"))
        if counted is not None and "tokens_per_s" not in out:
            out["tokens_per_s"] = counted
            self.derived["tokens_per_s"] = f"run_tokens_per_s {_fmt(counted)} (the program's own count of tokens)"
        if steps is not None and "step_time_s" not in out:
            out["step_time_s"] = 1.0 / steps
            self.derived["step_time_s"] = f"1 / steps_per_s {_fmt(steps)}"
        if samples is not None:
            if "tokens_per_s" not in out and seq:
                out["tokens_per_s"] = samples * seq
                self.derived["tokens_per_s"] = f"samples_per_s {_fmt(samples)} x seq_len {seq}"
            if "step_time_s" not in out and gbs:
                out["step_time_s"] = gbs / samples
                self.derived["step_time_s"] = f"global batch {gbs} / samples_per_s {_fmt(samples)}"
        if steps is not None and "tokens_per_s" not in out and tokens_per_step:
            out["tokens_per_s"] = tokens_per_step * steps
            self.derived["tokens_per_s"] = f"global batch x seq_len {tokens_per_step:g} x steps_per_s {_fmt(steps)}"
        for name, scale, unit in (("peak_mem_gib", 1 << 30, "GiB"), ("peak_mem_mib", 1 << 20, "MiB")):
            value = raw.get(name)
            if value is not None and "peak_mem_bytes" not in out:
                out["peak_mem_bytes"] = int(round(value * scale))
                self.derived["peak_mem_bytes"] = f"{name} {_fmt(value)} x 2^{scale.bit_length() - 1} ({unit} printed)"

    @property
    def ignored(self) -> int:
        return self._ignored


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


class FileTail:
    """A JSON-lines file another process appends to, read one complete line at a time."""

    def __init__(self, path: Path, metrics: Metrics) -> None:
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
                             + f"use step, {', '.join(STEP_NAMES)}, a summary metric from autotune.schema "
                             f"or {', '.join(SUMMARY_RAW)}")
        try:
            rx = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ValueError(f"metrics_regex: {name}: {pattern!r} is not a valid regex ({exc}); fix it") from None
        if rx.groups != 1:
            raise ValueError(f"metrics_regex: {name}: {rx.pattern!r} has {rx.groups} groups; it needs exactly one, "
                             f"around the number (use (?:...) for other groups)")
        compiled[name] = rx
    if not any(n in compiled for n in STEP_NAMES + THROUGHPUT_SOURCES):
        raise ValueError(f"metrics_regex: no pattern for {', '.join(STEP_NAMES + THROUGHPUT_SOURCES)}; at least "
                         f"one is needed to see the program's speed")
    return compiled



def match_line(patterns: dict[str, re.Pattern[str]], line: str) -> tuple[dict[str, Any], dict[str, float], list[str]]:
    """One printed line -> (step fields, summary values, problems). Colour codes are ignored and
    thousands separators (`12,345`) are read as part of the number."""
    step: dict[str, Any] = {}
    summary: dict[str, float] = {}
    problems: list[str] = []
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    for name, rx in patterns.items():
        m = rx.search(line)
        if not m or m.group(1) is None:
            continue
        text = m.group(1).replace(",", "")
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
        elif name in STEP_NAMES:
            step[name] = value
        else:
            summary[name] = value
    if not any(n in step for n in STEP_NAMES):
        step = {}
    return step, summary, problems
