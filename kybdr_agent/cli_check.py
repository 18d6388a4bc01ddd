"""``kybdr-agent check``: the monitoring probe — does every covered database have a good, recent backup?

It answers in the Nagios plugin convention, which cron wrappers, Icinga, Zabbix, Sensu and most others
read: exit 0 OK, 1 WARNING, 2 CRITICAL, and one line on stdout, ``KYBDR <STATUS> - <what>`` then, after a
``|``, one performance value per database (``age_<db>=<seconds>s;;<window>``: its newest good backup's
age with the window as the critical threshold, ``U`` when it has none).

The answer is read from the repository in this process (``BackupService.freshness``), not asked of the
daemon: the probe must say "no backups" even when the daemon is the thing that stopped making them. It
only reads. Nothing escapes as the CLI's usual statuses: a configuration that does not load, or a
repository that cannot be read, is CRITICAL with one line — a probe that exits 78 or 1 reads to a
monitoring system as "the plugin is broken" (UNKNOWN or WARNING), not as "you have no backups".

CRITICAL: a checked database is stale (no good backup younger than its window, ``--max-age`` if given), or
the check could not be made. WARNING: nothing to check (no database covered, or ``--database`` names one no
policy covers), or all are fresh but some manifests in the repository cannot be read. OK otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

from kybdr_agent.asyncutil import primary_error
from kybdr_agent.backup.freshness import DatabaseFreshness
from kybdr_agent.backup.manifest import BACKUPS_PREFIX, database_key
from kybdr_agent.config import load_settings
from kybdr_agent.config_values import parse_duration
from kybdr_agent.errors import ConfigError, KybdrError, StoreError
from kybdr_agent.telemetry.logs import stderr_line

OK: Final = 0
WARNING: Final = 1
CRITICAL: Final = 2
_NAMES: Final = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL"}
_MAX_DETAIL: Final = 400
_PLAIN_LABEL: Final = re.compile(r"[A-Za-z0-9_.-]+")


def _max_age(text: str) -> timedelta:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(value, timedelta) or value <= timedelta(0):
        raise argparse.ArgumentTypeError(f'{text!r} is not a positive duration (e.g. "90m", "26h", "2d")')
    return value


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "check",
        help="monitoring probe (Nagios convention): every covered database has a good backup within its window",
        description="Exit 0 OK, 1 WARNING, 2 CRITICAL, with one status line and performance data on stdout.",
    )
    p.add_argument(
        "--max-age",
        type=_max_age,
        metavar="DURATION",
        help="hold every database to this age (e.g. 26h) instead of its policy's window",
    )
    p.add_argument(
        "--database", action="append", metavar="NAME", help="check only this database (repeatable; default: all)"
    )


@dataclass
class Verdict:
    """What the probe found: its status, the sentence after it, and the performance data."""

    status: int
    text: str
    perfdata: list[str] = field(default_factory=list)

    def line(self) -> str:
        head = f"KYBDR {_NAMES[self.status]} - {_one_line(self.text)}"
        return f"{head} | {' '.join(self.perfdata)}" if self.perfdata else head


async def run(args: argparse.Namespace) -> int:
    """Check, print the one status line, return its exit status. Only an interruption escapes."""
    verdict = await probe(args)
    print(verdict.line())
    sys.stdout.flush()
    return verdict.status


async def probe(args: argparse.Namespace) -> Verdict:
    # Imported here, not at the top: the CLI builds this command's parser on every start (``add_parser``).
    from kybdr_agent import app

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return Verdict(CRITICAL, f"configuration error: {exc}")
    databases: list[str] | None = args.database
    try:
        async with app.in_process(settings) as agent:
            found = await agent.service.freshness(max_age=args.max_age)
            unreadable = (await agent.service.catalog()).unreadable
    except Exception as exc:  # noqa: BLE001 - a probe answers CRITICAL with the reason, whatever failed
        cause = primary_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if args.verbose:
            stderr_line("".join(traceback.format_exception(cause)).rstrip("\n"))
        return Verdict(CRITICAL, _failure(cause, verbose=args.verbose))
    if databases is not None:
        wanted = set(databases)
        found = [f for f in found if f.database in wanted]
        keys = {f"{BACKUPS_PREFIX}/{database_key(name)}/" for name in wanted if name}
        unreadable = [(key, why) for key, why in unreadable if key.startswith(tuple(keys))]
    missing = [name for name in dict.fromkeys(databases or ()) if name not in {f.database for f in found}]
    return judge(found, missing=missing, unreadable=len(unreadable), max_age=args.max_age)


def judge(found: list[DatabaseFreshness], *, missing: list[str], unreadable: int, max_age: timedelta | None) -> Verdict:
    """The verdict for what ``freshness`` found among the checked databases (pure, for reading)."""
    perfdata = [_perf(f) for f in found]
    stale = [f for f in found if f.stale]
    notes: list[str] = []
    if missing:
        notes.append(f"not covered by any policy or database.databases: {', '.join(map(_name, missing))}")
    if unreadable:
        notes.append(f"{_count(unreadable, 'manifest')} in the repository cannot be read (see `kybdr-agent list`)")
    if stale:
        described = ", ".join(_stale(f) for f in stale)
        text = f"{len(stale)} of {_count(len(found), 'database')} without a good recent backup: {described}"
        return Verdict(CRITICAL, "; ".join([text, *notes]), perfdata)
    if not found:
        if not missing:
            notes.append("no database is covered by a backup policy or database.databases")
        return Verdict(WARNING, "nothing to check: " + "; ".join(notes), perfdata)
    within = f"younger than {_human(max_age)}" if max_age is not None else "within its window"
    have = "has" if len(found) == 1 else "have"
    text = f"{_count(len(found), 'database')} {have} a good backup {within}"
    return Verdict(WARNING if notes else OK, "; ".join([text, *notes]), perfdata)


def _stale(f: DatabaseFreshness) -> str:
    if f.age is None:
        return f"{_name(f.database)} (no good backup, window {_human(f.window)})"
    return f"{_name(f.database)} (newest good backup {_human(f.age)} old, window {_human(f.window)})"


def _perf(f: DatabaseFreshness) -> str:
    """``'label'=value[uom];warn;crit``; a label of other than plain characters is quoted, a quote doubled,
    and ``=`` (which no parser accepts in a label) replaced."""
    label = "age_" + f.database.replace("=", "_")
    if not _PLAIN_LABEL.fullmatch(label):
        label = "'" + _one_line(label).replace("|", "_").replace("'", "''") + "'"
    value = "U" if f.age is None else f"{int(f.age.total_seconds())}s"
    return f"{label}={value};;{int(f.window.total_seconds())}"


def _failure(exc: BaseException, *, verbose: bool) -> str:
    """Why the check could not be made, in the words ``cli`` would use for the same error."""
    if isinstance(exc, ConfigError):
        return f"configuration error: {exc}"
    if isinstance(exc, StoreError):
        return f"cannot read the repository: {exc}"
    if isinstance(exc, OSError):
        return f"cannot read the repository: {exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"
    if isinstance(exc, KybdrError | TimeoutError):
        return f"check failed: {str(exc) or type(exc).__name__}"
    return f"check failed: internal error: {type(exc).__name__}{'' if verbose else ' (run with -v for details)'}"


def _one_line(text: str) -> str:
    """Everything on one line without ``|`` (which would start the performance data), kept short."""
    flat = " ".join(text.replace("|", "/").split())
    return flat if len(flat) <= _MAX_DETAIL else flat[: _MAX_DETAIL - 1] + "…"


def _name(database: str) -> str:
    return database if _PLAIN_LABEL.fullmatch(database) else repr(database)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _human(span: timedelta | None) -> str:
    if span is None:
        return "?"
    seconds = int(span.total_seconds())
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 90 * 60:
        return f"{seconds // 60}m"
    hours, minutes = divmod(seconds // 60, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"
