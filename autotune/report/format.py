"""The report's number formatting: the only place a figure becomes text.

Markdown, HTML, the plots' labels, the verdict's reasons and the checks' details all format
through these helpers, so that a figure reads the same wherever the report shows it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def memory_unit(values: Iterable[float | None]) -> dict[str, Any]:
    """One unit for the whole report: MB when every value is under 1 GB (tiny CPU runs), else GB."""
    largest = max((v for v in values if v is not None), default=0)
    if largest < 1e9:
        return {"name": "MB", "bytes": 1e6, "decimals": 2}
    return {"name": "GB", "bytes": 1e9, "decimals": 3}


def fmt_mem(n: float | None, unit: dict[str, Any], with_unit: bool = True) -> str:
    if n is None:
        return "-"
    text = f"{n / unit['bytes']:.{unit['decimals']}f}"
    return f"{text} {unit['name']}" if with_unit else text


def fmt_tokens(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def fmt_pct(x: float | None, decimals: int = 1) -> str:
    return "-" if x is None else f"{x * 100:.{decimals}f}%"


def fmt_dropped(x: float | None) -> str:
    """Dropped tokens are usually 0 or tiny: enough decimals that 0.04% does not read as 0.0%."""
    return fmt_pct(x, 3)


def fmt_num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if math.isfinite(x) else str(x)


def fmt_error(predicted: float | None, measured: float | None) -> str:
    """Prediction error relative to the measurement, signed: + means the model over-predicts."""
    if predicted is None or not measured:
        return "-"
    return f"{(predicted - measured) / measured:+.1%}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt_loss(x: float | None) -> str:
    """Six significant digits: a short run's loss moves in the third decimal."""
    return fmt_num(x, 6)
