"""A study's results -> a deployment report: verdict, evidence, plots and the launch command.

`build_report` takes every figure from the trial records and derives the rest in one place;
markdown, HTML and JSON are renderings of that one dict, and all of them format numbers with
the same helpers, so a figure reads the same wherever it appears.

The parts live in their own modules of this package, re-exported here so that
`autotune.report.write` is the one name callers import: format.py (numbers as text), checks.py
(validations and the verdict), data.py (`build_report`), front.py (Pareto front, stopped
trials), plots.py (PNG plots) and text.py (markdown and HTML). This module writes the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from autotune.records.results import StudyResult
from autotune.report.checks import (DROPPED_LIMIT, IMBALANCE_LIMIT, PREDICTION_TOLERANCE, SPREAD_LIMIT,
                                    TOKENS_TOLERANCE)
from autotune.report.data import CATEGORY_NAMES, MEMORY_BARS, NO_MFU, TOP_N, build_report
from autotune.report.format import (fmt_dropped, fmt_error, fmt_loss, fmt_mem, fmt_ms, fmt_num, fmt_pct,
                                    fmt_tokens, memory_unit, plural)
from autotune.report.plots import CATEGORY_COLORS, plot_memory, plot_pareto
from autotune.report.text import FAILURE_ROWS, RANK_ROWS, Block, render_html, render_markdown

__all__ = ["CATEGORY_COLORS", "CATEGORY_NAMES", "DROPPED_LIMIT", "FAILURE_ROWS", "IMBALANCE_LIMIT", "MEMORY_BARS",
           "NO_MFU", "PREDICTION_TOLERANCE", "RANK_ROWS", "SPREAD_LIMIT", "TOKENS_TOLERANCE", "TOP_N", "Block",
           "ReportFiles", "build_report", "fmt_dropped", "fmt_error", "fmt_loss", "fmt_mem", "fmt_ms", "fmt_num",
           "fmt_pct", "fmt_tokens", "memory_unit", "plot_memory", "plot_pareto", "plural", "render_html",
           "render_markdown", "write_report"]


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    html: Path
    json: Path
    pareto_png: Path
    memory_png: Path



def write_report(result: StudyResult, out_dir: Path) -> ReportFiles:
    """Write report.md, report.html, report.json, pareto.png and memory.png into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(result)
    images = {"pareto": plot_pareto(report), "memory": plot_memory(report)}
    files = ReportFiles(markdown=out_dir / "report.md", html=out_dir / "report.html", json=out_dir / "report.json",
                        pareto_png=out_dir / "pareto.png", memory_png=out_dir / "memory.png")
    files.pareto_png.write_bytes(images["pareto"])
    files.memory_png.write_bytes(images["memory"])
    files.markdown.write_text(render_markdown(report), encoding="utf-8")
    files.html.write_text(render_html(report, images), encoding="utf-8")
    files.json.write_text(json.dumps(report, indent=1, allow_nan=False, default=str) + "\n", encoding="utf-8")
    return files
