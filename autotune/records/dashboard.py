"""`autotune dashboard`: optuna-dashboard on a study's own Optuna storage.

The storage (journal file or RDB URL) already holds every decided trial with its layout,
status, reason and memory as user attributes (`searcher.dashboard_attrs`), so the dashboard's
history, parameter plots and trial table need nothing else. optuna-dashboard is an optional
dependency (`pip install 'autotune[ui]'`); the server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
from socketserver import ThreadingMixIn
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from autotune.records.tracking import redact
from autotune.redaction import error_line

MISSING = ("autotune dashboard needs the optional package optuna-dashboard: "
           "pip install 'autotune[ui]' (or pip install optuna-dashboard), then run it again")
log = logging.getLogger("optuna_dashboard.requests")


class DashboardError(RuntimeError):
    """The dashboard cannot start (exit code 2)."""


class _QuietHandler(WSGIRequestHandler):
    """Request lines go to the log (autotune.log), not the console."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # the page loads several API calls at once


def serve(study: str, storage_url: str, host: str, port: int, ready: Callable[[str], None]) -> None:
    """Serve until interrupted; `ready` gets the study's page URL once the port listens."""
    try:
        from optuna_dashboard import wsgi
    except ImportError:
        raise DashboardError(MISSING) from None
    from autotune.search.searcher import open_storage

    shown = redact(storage_url)
    try:
        import optuna

        storage = optuna.storages.get_storage(open_storage(storage_url))
        study_id = storage.get_study_id_from_name(study)
    except KeyError:
        raise DashboardError(f"storage {shown} holds no study named {study!r}; check the name or --storage") from None
    except Exception as exc:  # a database URL that does not connect
        raise DashboardError(f"--storage: cannot open {shown} ({error_line(exc, 200)}); check the URL, the server and "
                             f"its credentials") from None
    try:
        server = make_server(host, port, wsgi(storage), server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise DashboardError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                             f"choose another port with --port or a local address with --host") from None
    with server:
        ready(f"http://{host}:{server.server_port}/dashboard/studies/{study_id}")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
