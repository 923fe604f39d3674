"""Secrets masked in URLs and free text before anything is shown or written."""

from __future__ import annotations

import pytest

from autotune.redaction import error_line, redact, redact_url


@pytest.mark.parametrize("text,shown", [
    ("postgresql://user:hunter2@db/x", "postgresql://user:***@db/x"),
    ("postgresql://:hunter2@db/x", "postgresql://:***@db/x"),
    ("postgresql://db/x?sslmode=require&password=hunter2", "postgresql://db/x?sslmode=require&password=***"),
    ("http://hunter2@mlflow:5000", "http://***@mlflow:5000"),
    ("https://user:hunter2@mlflow", "https://user:***@mlflow"),
    ("cannot reach 'postgresql+psycopg://u:hunter2@db:5432/o' (refused)", "cannot reach 'postgresql+psycopg://u:***@db:5432/o' (refused)"),
    ("postgresql://user@db/x", "postgresql://user@db/x"),  # a user name is no secret
    ("http://mlflow:5000", "http://mlflow:5000"),
])
def test_credentials_are_masked_in_urls_and_text(text, shown):
    assert redact(text) == shown
    assert "hunter2" not in redact_url(text)


def test_database_urls_are_rendered_by_sqlalchemy():
    assert redact_url("postgresql+psycopg://u:p%40ss@db:5432/optuna") == "postgresql+psycopg://u:***@db:5432/optuna"


def test_values_registered_as_secrets_are_masked_in_any_text_and_short_ones_are_left():
    from autotune.redaction import mask_values

    secret = "s3cr3t-" + "9" * 12
    assert redact(f"KeyError: {secret!r} rejected") == f"KeyError: {secret!r} rejected"
    mask_values([secret, "ab", None])
    assert redact(f"KeyError: {secret!r} rejected; token={secret}") == "KeyError: '***' rejected; token=***"
    assert redact("ab ab") == "ab ab"


def test_an_errors_line_is_its_first_text_masked_and_cut_or_its_types_name():
    exc = RuntimeError("\n  \n(psycopg.OperationalError) connection to postgresql://tuner:hunter22@db:5432/x failed\n"
                       "DETAIL: the second line is not kept")
    assert error_line(exc) == "(psycopg.OperationalError) connection to postgresql://tuner:***@db:5432/x failed"
    assert error_line(exc, 20) == "(psycopg.Operational"
    assert error_line(KeyError()) == "KeyError"  # no text: its type says what it was
    assert error_line(ValueError("   "), empty="") == ""  # where the caller already names the type
