"""`SpecError` and how values and names are shown in its one-line messages.

Every part of the space file's checking (the sections' validators, the YAML reader, the
description of pydantic's errors) words its messages with these helpers, so a value reads the
same (null, true, 'text', [1, 2]) whichever check names it; kept apart so that all of them can
use it without importing one another.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any


def _one_line(text: str) -> str:
    """Control characters (a newline in a key, a tab in a path) shown escaped, never as line breaks."""
    return re.sub(r"[\x00-\x1f\x7f\u2028\u2029]", lambda m: repr(m.group())[1:-1], text)


class SpecError(ValueError):
    """A problem with the space file, as one line that says what to change."""

    def __init__(self, message: object = "") -> None:
        super().__init__(_one_line(str(message)))


# ---------------------------------------------------------------------------------------------
# Showing values and names in messages


def _show(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it in YAML (null, true, 'text', [1, 2]), cut short if long."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() > 3 * limit:  # str() of a huge integer is slow, and refused past 4300 digits
            return f"a number of about {int(value.bit_length() * math.log10(2))} digits"
        text = str(value)
        return text if len(text) <= limit else f"a {len(text.lstrip('-'))}-digit number"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else repr(value[:limit]) + "..."
    if isinstance(value, (list, dict)):
        items = value.items() if isinstance(value, dict) else value
        parts, size = [], 2
        for item in items:
            part = f"{_key(item[0])}: {_show(item[1], limit)}" if isinstance(value, dict) else _show(item, limit)
            size += len(part) + 2
            if size > limit:
                return f"a mapping of {len(value)} keys" if isinstance(value, dict) else \
                    f"a list of {len(value)} values"
            parts.append(part)
        return ("{%s}" if isinstance(value, dict) else "[%s]") % ", ".join(parts)
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _key(part: Any) -> str:
    """A key in a field path: bare if it looks like a name, quoted otherwise."""
    if isinstance(part, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", part):
        return part
    return _show(part, 40)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _a(value: Any) -> str:
    """'a list', 'a number', but 'text' and 'null'."""
    kind = _kind(value)
    return kind if kind in ("text", "null", "true/false") else f"a {kind}"


def _num(x: Any) -> str:
    """A bound from a constraint: 0 rather than 0.0, 1000000 rather than 1e+06."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return str(x)


def _suggest(word: Any, choices: list[str]) -> str | None:
    if not isinstance(word, str) or not choices:
        return None
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def _divisors(n: int, limit: int = 8) -> str:
    found = [d for d in range(1, min(n, 10_000) + 1) if n % d == 0]
    if n > 10_000:
        found.append(n)
    shown = ", ".join(map(str, found[:limit]))
    return shown + (", ..." if len(found) > limit else "")

