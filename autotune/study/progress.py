"""What a running study shows: a live rich view in a terminal, plain lines in a log."""

from __future__ import annotations

import sys
import time
from typing import Sequence, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from autotune.records.results import StudyResult
from autotune.schema import Status
from autotune.space.layout import Layout
from autotune.space.spec import Spec
from autotune.report.checks import PRIORITY_ADVICE
from autotune.trial_record import NORMAL_PRIORITY, TrialRecord

# Proposals the searcher answers without a run (autotune/search/searcher.py), by kind: the words
# the summary line uses for one of them and for several.
ANSWERED = {"repeat": ("repeat of a measured layout", "repeats of a measured layout"),
            "twin": ("twin of a running trial", "twins of a running trial"),
            "decided": ("repeat of a layout already refused", "repeats of a layout already refused"),
            "no layout": ("proposal that is no layout", "proposals that are no layout")}


def numbers_text(numbers: Sequence[int]) -> str:
    """7, 9, 14-16: trial numbers with runs of consecutive ones as ranges."""
    out: list[str] = []
    run: list[int] = []
    for n in sorted(numbers):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [n]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(out)


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


class Progress:
    """Counts and the best layout so far; `live=None` picks rich when stdout is a terminal.

    With the study's `spec`, the best is the study's answer as its report gives it
    (`StudyResult.best`: within the memory cap, each layout's runs pooled, `known` trials of
    earlier rounds and runs included), so no line names a best that the final answer contradicts."""

    def __init__(self, study: str, trials: int, wall_clock_s: float | None, live: bool | None = None,
                 stream: TextIO | None = None, spec: Spec | None = None,
                 known: Sequence[TrialRecord] = ()) -> None:
        self.study, self.trials, self.wall_clock_s = study, trials, wall_clock_s
        self.spec = spec
        self.records: list[TrialRecord] = list(known)
        self.answered: dict[str, list[int]] = {}
        self.stream = stream or sys.stdout
        self.live_enabled = self.stream.isatty() if live is None else live
        self.start = time.monotonic()
        self.running: dict[int, tuple[Layout, int]] = {}  # number -> (layout, measured steps)
        self.done = self.failed = self.pruned = self.invalid = 0
        self.best: TrialRecord | None = self._study_best()
        self._live: Live | None = None
        self._priority_said = False  # the warning on ranks below normal priority, once per round

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        if self.live_enabled:
            self._live = Live(self._render(), console=Console(file=self.stream), refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        else:
            self._line(f"study {self.study}: up to {self.trials} trials")
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None
        if self.answered:
            self._line(self.answered_line())
        self._line(self.summary_line())

    # -- events ------------------------------------------------------------------------------------
    def started(self, number: int, layout: Layout) -> None:
        self.running[number] = (layout, 0)
        self._line(f"trial {number:>3} start  {layout.key} (world {layout.world_size})")

    def step(self, number: int) -> None:
        if number in self.running:
            layout, n = self.running[number]
            self.running[number] = (layout, n + 1)
        self._refresh()

    def _study_best(self) -> TrialRecord | None:
        if self.spec is None:
            return None
        return StudyResult(self.spec.study.name, self.spec, tuple(self.records)).best()

    def answered_without_run(self, number: int, kind: str) -> None:
        """A proposal the searcher answered at once (a repeat, a twin of a running trial...):
        counted, and listed in one line when the round ends."""
        self.answered.setdefault(kind, []).append(number)

    def finished(self, record: TrialRecord) -> None:
        self.running.pop(record.number, None)
        self.records.append(record)
        if record.status in (Status.PRUNED_BY_MEMORY_MODEL, Status.INVALID):
            if record.status == Status.INVALID:
                self.invalid += 1  # a proposal that is no valid layout: refused, never launched
            else:
                self.pruned += 1
            self._line(f"trial {record.number:>3} {record.status.value}  {record.layout.key}: {record.reason}")
            return
        if record.ok or record.status == Status.EARLY_STOPPED:
            self.done += 1
            if self.spec is not None:
                self.best = self._study_best()
            elif record.ok and (self.best is None or record.tokens_per_s > self.best.tokens_per_s):
                self.best = record
            peak = record.metrics.get("peak_mem_bytes")
            self._line(f"trial {record.number:>3} {record.status.value:<7} {record.layout.key}: "
                       f"{record.tokens_per_s:,.0f} tok/s"
                       + (f", peak {peak / 1e6:.1f} MB" if peak else ""))
            if record.nice is not None and record.nice > NORMAL_PRIORITY and not self._priority_said:
                self._priority_said = True
                self._line(f"warning: trial {record.number}'s ranks ran at nice {record.nice}, below normal "
                           f"priority: {PRIORITY_ADVICE}")
        else:
            self.failed += 1
            self._line(f"trial {record.number:>3} {record.status.value:<7} {record.layout.key}: {record.reason}")

    def note(self, text: str) -> None:
        self._line(text)

    # -- output ------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def answered_line(self) -> str:
        parts = [f"{len(nums)} {ANSWERED.get(kind, (kind, kind))[len(nums) > 1]} "
                 f"(trial{'s' if len(nums) > 1 else ''} {numbers_text(nums)})" for kind, nums in self.answered.items()]
        return "proposals answered without a run: " + "; ".join(parts)

    def summary_line(self) -> str:
        best = (f"best {self.best.layout.key} at {self.best.tokens_per_s:,.0f} tok/s" if self.best
                else "no successful trial yet")
        refused = f", invalid {self.invalid}" if self.invalid else ""
        return (f"[{_fmt_s(self.elapsed())}] done {self.done}, failed {self.failed}, pruned {self.pruned}{refused}, "
                f"running {len(self.running)}; {best}")

    def _render(self) -> Group:
        table = Table(box=None, show_header=True, pad_edge=False)
        for col in ("trial", "layout", "world", "measured steps"):
            table.add_column(col)
        for number, (layout, n) in sorted(self.running.items()):
            table.add_row(str(number), layout.key, str(layout.world_size), str(n))
        budget = ""
        if self.wall_clock_s:
            budget = f", {_fmt_s(max(0.0, self.wall_clock_s - self.elapsed()))} of wall-clock budget left"
        head = Text(f"autotune study {self.study}: {self.done + self.failed} of up to {self.trials} trials run"
                    f"{budget}\n{self.summary_line()}")
        return Group(head, table)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _line(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
            self._live.update(self._render())
        else:
            print(text, file=self.stream, flush=True)
