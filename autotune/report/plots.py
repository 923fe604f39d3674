"""The report's two plots (tokens/s against peak memory, memory by category) as PNG bytes.

Drawn with matplotlib's Agg canvas from the report dict alone, like the text, with no pyplot
state or display, so that workers and threads can draw them.
"""

from __future__ import annotations

import io
from typing import Any

from autotune.report.format import fmt_mem

CATEGORY_COLORS = {"params": "#4c72b0", "grads": "#55a868", "optimizer": "#c44e52", "activations": "#8172b2",
                   "other": "#ccb974"}


def _figure(width: float = 7.5, height: float = 4.5):
    """A figure on its own Agg canvas: no pyplot state, no display, safe in workers and threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_pareto(report: dict[str, Any]) -> bytes:
    """Tokens/s against peak memory for every finished trial; the front and the cap stand out."""
    unit, study = report["unit"], report["study"]
    points = report["trials"]["points"]
    fig = _figure()
    ax = fig.add_subplot()
    scale = unit["bytes"]
    others = [p for p in points if not p["pareto"]]
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["peak_mem_bytes"])
    ax.scatter([p["peak_mem_bytes"] / scale for p in others], [p["tokens_per_s"] for p in others],
               color="#999999", label="trial", zorder=2)
    if front:
        ax.plot([p["peak_mem_bytes"] / scale for p in front], [p["tokens_per_s"] for p in front], "o-",
                color="#c44e52", label="Pareto front", zorder=3)
        for p in front:
            ax.annotate(f"#{p['number']}", (p["peak_mem_bytes"] / scale, p["tokens_per_s"]), fontsize=7,
                        color="#c44e52", xytext=(-4, -11), textcoords="offset points")
    for p in points:
        if p["best"]:
            ax.scatter([p["peak_mem_bytes"] / scale], [p["tokens_per_s"]], s=160, facecolors="none",
                       edgecolors="black", linewidths=1.5, zorder=4,
                       label="deployment pick" if report["front"]["pareto_study"] else "best")
            ax.annotate(p["label"], (p["peak_mem_bytes"] / scale, p["tokens_per_s"]), fontsize=7,
                        xytext=(6, 6), textcoords="offset points")
    ax.axvline(study["cap_bytes"] / scale, color="black", linestyle="--",
               label=f"memory cap {fmt_mem(study['cap_bytes'], unit)}")
    if not points:
        ax.text(0.5, 0.5, "no successful trial", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel(f"peak memory per rank ({unit['name']})")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{study['name']}: {len(points)} of {study['trials']} trials finished")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def plot_memory(report: dict[str, Any]) -> bytes:
    """Stacked bars per category, measured beside predicted, for the best and the next trials."""
    unit, study = report["unit"], report["study"]
    bars = report["memory_bars"]
    fig = _figure(max(6.0, 1.6 * len(bars) + 3), 4.8)
    ax = fig.add_subplot()
    scale = unit["bytes"]
    xs, labels = [], []
    for i, bar in enumerate(bars):
        for j, kind in enumerate(("measured", "predicted")):
            x = 3 * i + j
            bottom = 0.0
            for cat, value in bar[kind].items():
                height = (value or 0) / scale
                ax.bar(x, height, bottom=bottom, color=CATEGORY_COLORS[cat], width=0.9,
                       hatch="//" if kind == "predicted" else None, edgecolor="white",
                       label=cat if i == 0 and j == 0 else None)
                bottom += height
            xs.append(x)
            labels.append(f"#{bar['number']}\n{kind}")
    ax.axhline(study["cap_bytes"] / scale, color="black", linestyle="--",
               label=f"memory cap {fmt_mem(study['cap_bytes'], unit)}")
    if not bars:
        ax.text(0.5, 0.5, "no trial within the memory cap", transform=ax.transAxes, ha="center", va="center")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel(f"bytes on the worst rank ({unit['name']})")
    ax.set_title("memory by category: measured vs predicted (hatched)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)
