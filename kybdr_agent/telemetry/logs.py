"""Logging setup: structlog, JSON lines off a terminal (journald, log shippers), readable on one.

Logs go to stderr so a command's stdout stays the result a script parses. Secrets are never passed to a
logger in the first place (keys and passwords live in files and are not part of any event).

Every line says which logger wrote it (``logger``), and, when there is one, the job it works for
(``job_id``, from ``telemetry.context``) and the trace it belongs to (``trace_id``, ``span_id``), so one
job's lines can be picked out of the journal and joined to its spans.

Under systemd, stderr is a stream into the journal, which reads a leading ``<N>`` on each line as that
line's syslog priority (``SyslogLevelPrefix=``, on by default). Without it every line is "info" and
``journalctl -p warning`` shows nothing, so when stderr *is* the journal (``JOURNAL_STREAM`` names its
device and inode, as systemd documents) every line written there — log lines, the CLI's own messages
(``stderr_line``) and stdlib ``logging`` records — starts with its priority. Anywhere else (a terminal, a
file, a pipe to another program) nothing is added: a prefix there would be noise in someone else's parser.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, Final, TextIO

import structlog

from kybdr_agent.telemetry.context import current_job_id

# syslog(3) priorities, by structlog method name (``add_log_level`` turns "exception" into "error").
PRIORITY: Final = {
    "critical": 3,
    "fatal": 3,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}
ERROR: Final = 3
WARNING: Final = 4
INFO: Final = 6
_DEFAULT_NAME: Final = "kybdr_agent"

EventDict = MutableMapping[str, Any]
Renderer = Callable[[Any, str, EventDict], str | bytes]


def stream_is_journal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is the journal: ``JOURNAL_STREAM`` is "DEV:INODE" of its fd.

    systemd sets the variable for a service whose stdout or stderr it connects to the journal; a child
    whose stderr was redirected elsewhere inherits the variable but not the stream, hence the comparison.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        info = os.fstat((stream or sys.stderr).fileno())
        return int(device) == info.st_dev and int(inode) == info.st_ino
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return False


def prefixed(text: str, priority: int) -> str:
    """``text`` with ``<priority>`` before each of its lines (journald reads every line separately)."""
    return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def stderr_line(text: str, priority: int = ERROR) -> None:
    """Write one CLI message (one or more lines) to stderr, with its priority when stderr is the journal."""
    print(prefixed(text, priority) if stream_is_journal(sys.stderr) else text, file=sys.stderr)


class _NamedPrintLogger(structlog.PrintLogger):
    """A PrintLogger that knows the name it was asked for with ``get_logger(name)``."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def _logger_factory(file: TextIO) -> Callable[..., _NamedPrintLogger]:
    # structlog hands the factory the positional arguments of ``get_logger``: here, the name. A bound
    # ``logger`` key would not do: binding resolves the configuration at import time, before
    # ``configure_logging`` has run.
    def make(*args: Any) -> _NamedPrintLogger:
        return _NamedPrintLogger(file, str(args[0]) if args else _DEFAULT_NAME)

    return make


def _add_logger_name(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("logger", getattr(logger, "name", _DEFAULT_NAME))
    return event_dict


def _add_job_and_trace(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    job_id = current_job_id.get()
    if job_id is not None:
        event_dict.setdefault("job_id", job_id)
    # No span can be current unless something imported the tracing API; a command that never traces does
    # not pay for importing it here (~35 ms of the CLI's start-up).
    if "opentelemetry.trace" in sys.modules:
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
            event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


class _WithPriority:
    """The renderer, then ``<N>`` before each line of what it rendered when the stream is the journal."""

    def __init__(self, render: Renderer, journal: bool) -> None:
        self._render = render
        self._journal = journal

    def __call__(self, logger: Any, method_name: str, event_dict: EventDict) -> str:
        priority = PRIORITY.get(str(event_dict.get("level", method_name)), INFO)
        rendered = self._render(logger, method_name, event_dict)
        text = rendered.decode() if isinstance(rendered, bytes) else rendered
        return prefixed(text, priority) if self._journal else text


class _ToStructlog(logging.Handler):
    """stdlib ``logging`` records (aiohttp's, asyncio's) written as our lines: same format, same prefix.

    Without a handler they would reach stderr through logging's "last resort" as bare text, which
    journald files as info whatever their level."""

    _METHODS: Final = ((logging.CRITICAL, "critical"), (logging.ERROR, "error"), (logging.WARNING, "warning"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            method = next((name for level, name in self._METHODS if record.levelno >= level), None)
            if method is None:
                method = "info" if record.levelno >= logging.INFO else "debug"
            fields: dict[str, Any] = {}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            getattr(structlog.get_logger(record.name), method)(record.getMessage(), **fields)
        except Exception:  # noqa: BLE001 - logging's own contract: a handler reports, never raises
            self.handleError(record)


def configure_logging(*, verbose: bool = False) -> None:
    level = logging.INFO if verbose else logging.WARNING
    stream = sys.stderr
    render: Renderer
    if stream.isatty():
        render = structlog.dev.ConsoleRenderer(colors=False)
        before: list[Any] = []
    else:
        render = structlog.processors.JSONRenderer()
        before = [structlog.processors.format_exc_info]
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _add_logger_name,
            _add_job_and_trace,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *before,
            _WithPriority(render, stream_is_journal(stream)),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_logger_factory(stream),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ToStructlog)]:
        root.removeHandler(handler)
    root.addHandler(_ToStructlog())


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
