"""Logs never carry secrets: no local variables in tracebacks, secret-named fields redacted."""

from __future__ import annotations

import structlog

from authgate.config import load_settings
from authgate.logging import configure_logging

SENTINEL = "hunter2-sentinel-password"


def _fail_with_a_secret_in_scope() -> None:
    password = SENTINEL  # noqa: F841 - a local a rich traceback would print
    raise ValueError("boom")


def test_tracebacks_and_fields_never_show_secrets(capsys, tmp_path):
    for log_format in ("console", "json"):
        configure_logging(load_settings(data_dir=tmp_path, log_format=log_format))
        log = structlog.get_logger("test")
        try:
            _fail_with_a_secret_in_scope()
        except ValueError as exc:
            log.error("unhandled error", exc_info=exc, password=SENTINEL, token=SENTINEL)
        out = capsys.readouterr()
        text = out.out + out.err
        assert "boom" in text and "ValueError" in text
        assert SENTINEL not in text
        assert "[redacted]" in text
