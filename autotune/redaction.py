"""Secrets never leave in text: passwords and tokens in URLs are masked before anything is shown
or written (MLflow, Optuna, reports, job files, manifests, logs, the console).

Database URLs go through SQLAlchemy's own rendering (`URL.render_as_string(hide_password=True)`),
which knows its URL grammar; free text (an error message that quotes a URL) is masked by pattern:
`user:secret@`, `:secret@` (no user), a bare `token@` in an http(s) URL, and `password=` /
`token=`-like query parameters.
"""

from __future__ import annotations

import re

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s'\"]*)@")
_QUERY_SECRET = re.compile(r"(?i)(?P<key>[?&;](?:password|passwd|pwd|pass|token|access_token|secret|api_key|apikey)=)"
                           r"[^&;#\s'\"]+")
_WEB = ("http://", "https://")


def _userinfo(m: re.Match) -> str:
    scheme, info = m["scheme"], m["info"]
    user, colon, secret = info.partition(":")
    if colon:
        return f"{scheme}{user}:{MASK}@" if secret else m.group(0)
    if scheme.lower() in _WEB and info:  # http://TOKEN@host: the user part is the credential
        return f"{scheme}{MASK}@"
    return m.group(0)  # postgresql://user@host: a user name, nothing secret


_VALUES: set[str] = set()  # secrets known by value in this process (`mask_values`)
_BY_VALUE: re.Pattern[str] | None = None


def mask_values(values) -> None:
    """From now on `redact` masks each of these values wherever it appears (a program's env_from
    value, the Ray token, a database or tracking password), whatever text holds it. Values under
    4 characters are left alone: they would blank ordinary text."""
    global _BY_VALUE
    _VALUES.update(v for v in values if isinstance(v, str) and len(v) >= 4)
    if _VALUES:
        _BY_VALUE = re.compile("|".join(re.escape(v) for v in sorted(_VALUES, key=len, reverse=True)))


def redact(text: str) -> str:
    """Every URL credential in `text` masked (`postgresql://u:***@h`, `http://***@h`, `?password=***`),
    and every value registered with `mask_values`."""
    if _BY_VALUE is not None:
        text = _BY_VALUE.sub(MASK, text)
    return _QUERY_SECRET.sub(lambda m: m["key"] + MASK, _USERINFO.sub(_userinfo, text))


def redact_url(url: str) -> str:
    """One URL as it may be shown: SQLAlchemy's rendering for database URLs, the patterns for the rest."""
    if "://" in url and not url.lower().startswith(_WEB + ("file:",)):
        try:
            from sqlalchemy.engine import make_url

            return redact(make_url(url).render_as_string(hide_password=True))
        except Exception:  # not a URL SQLAlchemy reads: the patterns still apply
            pass
    return redact(url)


def has_secret(url: str | None) -> bool:
    return bool(url) and redact(url) != url


def error_line(exc: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """What a message, a record or the console keeps of an error: its first non-blank line, masked
    and cut to `limit` characters; an error without text gives `empty` (default: its type's name)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__ if empty is None else empty
    return redact(lines[0].strip())[:limit]
