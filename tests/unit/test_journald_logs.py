"""journald priorities on stderr (issue 10, item 6): read the lines as journald and ``journalctl -p`` do.

Each test runs a real process whose stderr is a file, with ``JOURNAL_STREAM`` naming that file's device and
inode as systemd would name the journal's stream. journald takes a leading ``<N>`` of each line as its
priority (``SyslogLevelPrefix=``) and files every other line as info; ``journalctl -p warning`` keeps
priorities 0-4. Without ``JOURNAL_STREAM``, or with one naming another file, nothing is prefixed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import KYBDR, REPO_ROOT

INFO = 6
_PREFIX = re.compile(r"^<(\d{1,3})>")

LOGGING_SCRIPT = textwrap.dedent(
    """
    import contextvars, logging, sys
    import structlog
    from opentelemetry.sdk.trace import TracerProvider
    from kybdr_agent.telemetry import configure_logging, get_logger
    from kybdr_agent.telemetry.context import current_job_id
    from kybdr_agent.telemetry.logs import stderr_line

    log = get_logger("kybdr_agent.backup")  # at import time, before configure_logging, as modules do
    configure_logging(verbose=True)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    log.debug("probe.debug")
    log.info("probe.info", size=3)
    log.warning("probe.warning")
    log.error("probe.error")
    log.critical("probe.critical")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("probe.exception")

    def in_job():
        current_job_id.set("job-42")
        get_logger("kybdr_agent.jobs").warning("probe.in_job")

    contextvars.copy_context().run(in_job)
    with TracerProvider().get_tracer("test").start_as_current_span("stage") as span:
        context = span.get_span_context()
        log.warning("probe.in_span")
    print(format(context.trace_id, "032x"), format(context.span_id, "016x"))
    logging.getLogger("aiohttp.server").error("stdlib %s", "record")
    stderr_line("kybdr-agent: a cli message\\nits second line", 4)
    """
)


@dataclass
class Line:
    """One journal entry as journald would store it from a stream line."""

    priority: int
    prefixed: bool
    message: str

    def json(self) -> dict[str, Any]:
        value = json.loads(self.message)
        assert isinstance(value, dict)
        return value


def journal_lines(raw: str) -> list[Line]:
    lines = []
    for text in raw.splitlines():
        match = _PREFIX.match(text)
        if match:
            lines.append(Line(int(match.group(1)) & 7, True, text[match.end() :]))
        else:
            lines.append(Line(INFO, False, text))
    return lines


def stream_id(path: Path) -> str:
    info = path.stat()
    return f"{info.st_dev}:{info.st_ino}"


def run_with_stderr_file(
    argv: list[str], stderr_file: Path, journal_stream: str | None
) -> tuple[subprocess.CompletedProcess[str], str]:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    with stderr_file.open("w") as err:
        proc = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO_ROOT, timeout=60, check=False
        )
    return proc, stderr_file.read_text()


def run_script(tmp_path: Path, *, journal: str | None) -> tuple[str, list[Line]]:
    """The logging script with stderr a file; ``journal`` is "self" for that file's id, else the value."""
    stderr_file = tmp_path / "stderr"
    stderr_file.touch()
    stream = stream_id(stderr_file) if journal == "self" else journal
    proc, err = run_with_stderr_file([sys.executable, "-c", LOGGING_SCRIPT], stderr_file, stream)
    assert proc.returncode == 0, err
    return proc.stdout, journal_lines(err)


def test_every_log_line_carries_its_priority_and_logger_when_stderr_is_the_journal(tmp_path: Path) -> None:
    stdout, lines = run_script(tmp_path, journal="self")
    assert all(line.prefixed for line in lines), [line.message for line in lines if not line.prefixed]
    events = {line.json()["event"]: line for line in lines if line.message.startswith("{")}
    priorities = {event: line.priority for event, line in events.items()}
    assert priorities == {
        "probe.debug": 7,
        "probe.info": 6,
        "probe.warning": 4,
        "probe.error": 3,
        "probe.critical": 3,
        "probe.exception": 3,
        "probe.in_job": 4,
        "probe.in_span": 4,
        "stdlib record": 3,
    }
    loggers = {event: line.json()["logger"] for event, line in events.items()}
    assert loggers == {
        **{event: "kybdr_agent.backup" for event in events},
        "probe.in_job": "kybdr_agent.jobs",
        "stdlib record": "aiohttp.server",
    }
    # What `journalctl -p warning` would show: warnings and worse, nothing else.
    shown = [line.message for line in lines if line.priority <= 4]
    assert not [m for m in shown if "probe.info" in m or "probe.debug" in m]
    assert "kybdr-agent: a cli message" in shown
    assert "its second line" in shown

    assert events["probe.in_job"].json()["job_id"] == "job-42"
    assert "job_id" not in events["probe.warning"].json()  # the job's context did not leak out of it
    trace_id, span_id = stdout.split()
    in_span = events["probe.in_span"].json()
    assert (in_span["trace_id"], in_span["span_id"]) == (trace_id, span_id)
    assert len(trace_id) == 32
    assert len(span_id) == 16
    assert "trace_id" not in events["probe.warning"].json()
    assert "ValueError: boom" in events["probe.exception"].json()["exception"]


@pytest.mark.parametrize("journal", [None, "other", "not-a-stream-id", ""])
def test_no_prefix_when_stderr_is_not_the_journal(tmp_path: Path, journal: str | None) -> None:
    if journal == "other":
        other = tmp_path / "journal-elsewhere"
        other.touch()
        journal = stream_id(other)
    _, lines = run_script(tmp_path, journal=journal)
    assert lines
    assert not [line.message for line in lines if line.prefixed]
    assert {line.json()["logger"] for line in lines if line.message.startswith("{")} == {
        "kybdr_agent.backup",
        "kybdr_agent.jobs",
        "aiohttp.server",
    }


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["--config", "/nonexistent/agent.toml", "status"], 78, "kybdr-agent: configuration error:"),
        (["no-such-command"], 2, "kybdr-agent: error: argument COMMAND: invalid choice"),
    ],
)
def test_the_cli_own_messages_are_errors_in_the_journal(
    tmp_path: Path, args: list[str], status: int, says: str
) -> None:
    stderr_file = tmp_path / "stderr"
    stderr_file.touch()
    proc, err = run_with_stderr_file([*KYBDR, *args], stderr_file, stream_id(stderr_file))
    assert proc.returncode == status, err
    lines = journal_lines(err)
    assert lines
    assert all(line.prefixed and line.priority == 3 for line in lines), err
    assert any(line.message.startswith(says) for line in lines), err

    plain, plain_err = run_with_stderr_file([*KYBDR, *args], stderr_file, None)
    assert plain.returncode == status
    assert plain_err == "".join(f"{line.message}\n" for line in lines)  # the same words, nothing added


def test_console_lines_on_a_terminal_name_their_logger(tmp_path: Path) -> None:
    script = (
        "from kybdr_agent.telemetry import configure_logging, get_logger\n"
        "configure_logging(verbose=True)\n"
        "get_logger('kybdr_agent.scheduler').warning('probe.console', n=1)\n"
    )
    controller, terminal = os.openpty()
    try:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        proc = subprocess.run(
            [sys.executable, "-c", script], stderr=terminal, env=env, cwd=REPO_ROOT, timeout=60, check=False
        )
        os.close(terminal)
        terminal = -1
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other side is closed and everything was read
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert proc.returncode == 0
    text = output.decode()
    assert "probe.console" in text
    assert "kybdr_agent.scheduler" in text
    assert not text.startswith("<")
