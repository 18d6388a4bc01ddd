"""Logging setup: structlog, JSON lines off a terminal (journald, log shippers), readable on one.

Logs go to stderr so a command's stdout stays the result a script parses. Secrets are never passed to a
logger in the first place (keys and passwords live in files and are not part of any event)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure_logging(*, verbose: bool = False) -> None:
    level = logging.INFO if verbose else logging.WARNING
    renderer: list[Any] = (
        [structlog.dev.ConsoleRenderer(colors=False)]
        if sys.stderr.isatty()
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
