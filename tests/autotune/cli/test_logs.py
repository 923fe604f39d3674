"""Library messages go to the log file; the console keeps autotune's lines and one line per error."""

from __future__ import annotations

import io
import logging
import warnings

from autotune.cli.logs import route_to_file


def test_library_lines_go_to_the_file_and_errors_to_one_console_line(tmp_path):
    library = logging.getLogger("somelib.db")
    own_handler = logging.StreamHandler(io.StringIO())  # a library's own console handler
    library.addHandler(own_handler)
    library.propagate = False
    console = io.StringIO()
    path = tmp_path / "study" / "autotune.log"
    with route_to_file(path, console=console):
        library.info("Creating initial database tables...")
        warnings.warn("an experimental argument", UserWarning)
        library.error("connection refused\nTraceback (most recent call last): ...")
        logging.getLogger("autotune.study").error("autotune's own, printed by autotune itself")
        assert library.handlers == [] and library.propagate
    text = path.read_text()
    assert "Creating initial database tables" in text and "an experimental argument" in text
    assert "Traceback" in text and "autotune's own" not in text
    assert console.getvalue() == f"error: somelib.db: connection refused (details in {path})\n"
    assert own_handler.stream.getvalue() == ""
    # Closed: the library's own configuration is back.
    assert library.handlers == [own_handler] and not library.propagate
    library.handlers.clear()
    library.propagate = True


def test_verbose_shows_everything_on_the_console(tmp_path):
    console = io.StringIO()
    with route_to_file(tmp_path / "autotune.log", verbose=True, console=console):
        logging.getLogger("otherlib").info("Uvicorn running on http://127.0.0.1:5000")
    assert "INFO otherlib: Uvicorn running" in console.getvalue()
    assert "Uvicorn running" in (tmp_path / "autotune.log").read_text()
