"""Structured logging (structlog): console for development, JSON lines for production.

Nothing in Authgate logs request bodies, headers, tokens or passwords; the processors below also
drop any event field whose name says it is a secret, as a second fence.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

from authgate.config import Settings

SECRET_FIELDS = frozenset({"password", "token", "access_token", "refresh_token", "id_token",
                           "secret", "authorization", "pin", "code", "cookie"})


def _drop_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if key.lower() in SECRET_FIELDS:
            event[key] = "[redacted]"
    return event


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper())
    logging.basicConfig(level=level, format="%(message)s")
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))
    # Tracebacks are plain: never the rich formatter, which prints local variables (a
    # password or a token can be one).
    renderer: Any = (structlog.processors.JSONRenderer() if settings.log_format == "json"
                     else structlog.dev.ConsoleRenderer(
                         exception_formatter=structlog.dev.plain_traceback))
    processors: list[Any] = [structlog.contextvars.merge_contextvars,
                             structlog.processors.add_log_level,
                             structlog.processors.TimeStamper(fmt="iso", utc=True), _drop_secrets]
    if settings.log_format == "json":
        processors.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
