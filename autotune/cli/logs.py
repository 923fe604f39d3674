"""Where other libraries' messages go: a log file beside the study, not the console.

Ray, MLflow, Optuna, alembic, uvicorn and Python warnings each print their own lines (a database
migration log, experimental-feature warnings, Ray's token-authentication banner, Tune's
checkpoint notes). They are useful when something goes wrong and noise otherwise, so the
console shows autotune's own lines only; everything else goes to `<study dir>/autotune.log`,
and `--verbose` shows it on the console too. A library's ERROR still reaches the console, as
one `error:` line that names the log.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

LOG_NAME = "autotune.log"
OWN = ("autotune", "trainables")  # loggers whose lines are autotune's own
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _own(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in OWN)


class _ErrorLine(logging.Handler):
    """A library's error as one console line: what failed, and where the details are."""

    def __init__(self, stream: TextIO, log_path: Path) -> None:
        super().__init__(logging.ERROR)
        self.stream, self.log_path = stream, log_path

    def emit(self, record: logging.LogRecord) -> None:
        if _own(record.name):
            return
        try:
            text = record.getMessage().strip().splitlines()
            first = text[0][:300] if text else record.levelname.lower()
            self.stream.write(f"error: {record.name}: {first} (details in {self.log_path})\n")
            self.stream.flush()
        except Exception:  # a console that went away must not stop the study
            self.handleError(record)


class _NotOwn(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _own(record.name)


@dataclass
class LogRouting:
    """The routing in force; `close()` puts the logging configuration back as it was."""

    path: Path
    verbose: bool
    handlers: list[logging.Handler] = field(default_factory=list)
    _saved: dict[str, tuple[list[logging.Handler], bool]] = field(default_factory=dict)
    _root_level: int = logging.WARNING
    _captured_warnings: bool = False

    def adopt(self) -> None:
        """Send every library logger's lines to the root logger (our handlers).

        Libraries attach their own console handlers when imported or started (Ray at import,
        MLflow at import, Optuna at its first logger): call this again after such a step.
        File handlers a library keeps for itself stay.
        """
        manager = logging.Logger.manager
        for name in list(manager.loggerDict):
            logger = manager.loggerDict[name]
            if not isinstance(logger, logging.Logger) or _own(name):
                continue
            keep = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
            if keep == logger.handlers and logger.propagate:
                continue
            self._saved.setdefault(name, (list(logger.handlers), logger.propagate))
            logger.handlers = keep
            logger.propagate = True
        root = logging.getLogger()
        mine = [h for h in root.handlers if h in self.handlers]
        others = [h for h in root.handlers if h not in self.handlers]
        if any(not isinstance(h, logging.FileHandler) for h in others):
            self._saved.setdefault("", (list(root.handlers), True))
            root.handlers = mine + [h for h in others if isinstance(h, logging.FileHandler)]

    def close(self) -> None:
        root = logging.getLogger()
        for h in self.handlers:
            if h in root.handlers:
                root.removeHandler(h)
            h.close()
        manager = logging.Logger.manager
        for name, (handlers, propagate) in self._saved.items():
            logger = root if name == "" else manager.loggerDict.get(name)
            if isinstance(logger, logging.Logger):
                logger.handlers = handlers
                if name:
                    logger.propagate = propagate
        root.setLevel(self._root_level)
        logging.captureWarnings(self._captured_warnings)
        self._saved.clear()
        self.handlers.clear()

    def __enter__(self) -> "LogRouting":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def route_to_file(path: Path, verbose: bool = False, console: TextIO | None = None) -> LogRouting:
    """Route library logs and Python warnings to `path` (appended); the console keeps only
    autotune's lines, library errors as one line each, and everything when `verbose`."""
    console = console or sys.stderr
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    routing = LogRouting(path=path, verbose=verbose, _root_level=root.level,
                         _captured_warnings=_warnings_captured())
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(_FORMAT))
    to_file.addFilter(_NotOwn())
    if verbose:
        shown: logging.Handler = logging.StreamHandler(console)
        shown.setFormatter(logging.Formatter(_FORMAT))
        shown.addFilter(_NotOwn())
    else:
        shown = _ErrorLine(console, path)
    routing.handlers += [to_file, shown]
    for h in routing.handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the `py.warnings` logger -> the file
    routing.adopt()
    return routing


def _warnings_captured() -> bool:
    import warnings

    return getattr(warnings.showwarning, "__name__", "") == "_showwarning"
