"""``kybdr-agent audit verify|show``: check the audit trail's hash chain, and read it.

Both read the local journal under ``backup.backup_dir/audit`` directly — no agent needed, and nothing is
written (the agent is the trail's only writer). The folder is the agent's (mode 0700), so run these as the
agent's user or root. ``verify`` exits 0 when every record follows the one before it, 1 naming the first
that does not (file, line, seq and why); ``show`` prints one line per record, or JSON lines with ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kybdr_agent import audit
from kybdr_agent.clock import Clock, utc_now
from kybdr_agent.config import AgentSettings
from kybdr_agent.config_values import parse_duration
from kybdr_agent.errors import KybdrError


def parse_since(text: str) -> datetime | timedelta:
    """``--since``: a duration back from now ("90m", "1h", "2d") or a time ("2026-01-31T12:00", UTC when it
    names no zone)."""
    try:
        duration = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if isinstance(duration, timedelta):
        return duration
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (90m, 1h, 2d) nor a date and time (2026-01-31T12:00:00Z)"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("audit", help="the audit trail: verify its hash chain, show its records")
    commands = p.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    v = commands.add_parser("verify", help="check every record follows the one before it; exit 1 naming the first")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    s = commands.add_parser("show", help="print the audit records, oldest first")
    s.add_argument(
        "--since",
        type=parse_since,
        metavar="WHEN",
        help="only records from WHEN on: a duration ago (1h, 2d) or a time",
    )
    s.add_argument("--json", action="store_true", help="one JSON record per line")


def directory_of(settings: AgentSettings) -> Path:
    return settings.backup.backup_dir / "audit"


def run(settings: AgentSettings, args: argparse.Namespace, *, clock: Clock = utc_now) -> int:
    directory = directory_of(settings)
    try:
        if args.audit_command == "verify":
            return _verify(directory, args)
        return _show(directory, args, clock)
    except PermissionError:
        raise KybdrError(
            f"cannot read the audit trail in {directory}: permission denied; run this as the agent's user or root"
        ) from None


def _verify(directory: Path, args: argparse.Namespace) -> int:
    report = audit.verify(directory)
    if getattr(args, "json", False):
        print(json.dumps({"directory": str(directory), **dataclasses.asdict(report)}))
    elif report.ok and report.segments == 0:
        print(f"audit trail OK: 0 records (there is no audit trail in {directory} yet)")
    elif report.ok:
        print(f"audit trail OK: {report.records} records")
    else:
        seq = "" if report.seq is None else f" (seq {report.seq})"
        print(
            f"audit trail BROKEN at {directory / (report.file or '?')} line {report.line}{seq}: {report.reason}; "
            f"{report.records} records before it verified"
        )
    return 0 if report.ok else 1


def _show(directory: Path, args: argparse.Namespace, clock: Clock) -> int:
    since = getattr(args, "since", None)
    if isinstance(since, str):
        since = parse_since(since)
    if isinstance(since, timedelta):
        since = clock() - since
    for line in _lines(audit.read(directory, since), json_lines=getattr(args, "json", False)):
        print(line)
    return 0


def _lines(records: Iterator[dict[str, Any]], *, json_lines: bool) -> Iterator[str]:
    for record in records:
        if json_lines:
            yield json.dumps(record, separators=(",", ":"))
            continue
        fields = (record.get(name) for name in ("at", "caller", "operation", "target", "outcome"))
        yield "  ".join("-" if value is None else str(value) for value in fields)
