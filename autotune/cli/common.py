"""What every `autotune` command shares: its two consoles, the one-line `error:` exit, the space file.

Kept apart from autotune/cli/main.py so that a command defined in its own module (autotune/cli/validate.py)
speaks and fails exactly as the others do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from autotune.space.spec import Spec, SpecError, load_spec

err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
# Piped output keeps whole rows: a log or a CI transcript is read later, not in a terminal.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def _load(path: Path, resolved: bool = False) -> Spec:
    """The space file; `resolved`: with the environment's settings applied (autotune/settings.py)."""
    try:
        spec = load_spec(path)
    except SpecError as exc:
        _fail(str(exc))
    if resolved:
        from autotune.settings import resolve

        spec = resolve(spec)
    return spec
