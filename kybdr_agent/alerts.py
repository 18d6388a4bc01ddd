"""Alerts as plain values, and the book that decides which of them are worth a message.

PURE. An operator paged every housekeeping tick for the same stale database stops reading the pages, and
one never told that the condition cleared keeps a ticket open for nothing. So conditions (a database's
backups failing, its newest good backup too old, the repository running out of room, DR lag) are keyed,
e.g. ``backup_failed:mydb``: :meth:`AlertBook.firing` answers a message only when the condition *starts*,
:meth:`AlertBook.clear` a "resolved" message only when it was firing, and one-shot events (a DR phase
change, a failover) always answer one. The book is bounded: past ``max_keys`` firing conditions the oldest
is forgotten (it may then fire again as a reminder, and clears silently), so a bug that invents keys cannot
grow the agent's memory. Nothing here does I/O or reads a clock: the notifier passes the time in and sends
what comes out, and the hypothesis tests check the de-duplication on any sequence of fires and clears.

Every message carries a machine-readable JSON body (:meth:`Message.to_json`) with a stable shape: the alert's
name, ``firing`` | ``resolved`` | ``event``, a severity, one human line that names the database or region it
concerns, the host, the time and a details object; and a short ASCII subject line for channels (SNS e-mail)
that show one.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Literal

Status = Literal["firing", "resolved", "event"]
Severity = Literal["info", "warning", "critical"]
SEVERITIES: Final[tuple[Severity, ...]] = ("info", "warning", "critical")

SCHEMA_VERSION: Final = 1
SOURCE: Final = "kybdr-agent"
SUBJECT_MAX: Final = 99  # SNS: "less than 100 characters", printable ASCII, no line breaks
SUMMARY_MAX: Final = 300
TEXT_MAX: Final = 2000  # any one string in details (an error message may carry a whole stderr)
DEFAULT_MAX_KEYS: Final = 1024


def one_line(text: str, limit: int = SUMMARY_MAX) -> str:
    """``text`` on one line (runs of whitespace, line breaks included, become one space), at most ``limit``."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: max(0, limit - 1)] + "…"


def _plain(value: Any) -> Any:
    """``value`` as JSON can carry it: datetimes as ISO text, tuples as lists, long strings cut, the rest as text."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value if len(value) <= TEXT_MAX else value[: TEXT_MAX - 1] + "…"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return _plain(str(value))


def parse_severity(value: str) -> Severity:
    """A severity from outside (a DR alert's): one of ours, or ``critical`` when unknown (never quieter)."""
    return value if value in SEVERITIES else "critical"


_PHASE_SEVERITY: Final[Mapping[str, Severity]] = {
    "starting": "info",
    "steady": "info",
    "failback_ready": "info",
    "suspect": "warning",
    "confirming": "warning",
    "switching_back": "warning",
    "fencing": "critical",
    "promoting": "critical",
    "dns_switching": "critical",
    "isolated": "critical",
    "halted": "critical",
}


def dr_phase_severity(phase: str) -> Severity:
    """How loud entering a DR phase is: steady is news, a failover in progress or a halt wakes someone."""
    return _PHASE_SEVERITY.get(phase, "warning")


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``: sizes in summaries, for people (details keep the exact numbers)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def human_duration(seconds: float) -> str:
    """``108000`` → ``1d 6h``: the two largest units, or seconds when under a minute."""
    whole = int(max(0.0, seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m")) if v]
    return " ".join(parts[:2]) if parts else f"{secs}s"


def replication_lag(observations: Mapping[str, Any]) -> tuple[int, str] | None:
    """From a round of DR probes (``Observations.to_json()``): the lag in bytes and the lagging region —
    the writer's ``current_lsn`` minus the other's ``replay_lsn`` (primary → dr, or the reverse after a
    failover); None when either is unknown."""
    db = observations.get("db") or {}
    for writer, standby in (("primary", "dr"), ("dr", "primary")):
        current = (db.get(writer) or {}).get("current_lsn")
        replay = (db.get(standby) or {}).get("replay_lsn")
        if isinstance(current, int) and isinstance(replay, int):
            return max(0, current - replay), standby
    return None


@dataclass(frozen=True)
class Alert:
    """What a condition or an event says; the book turns it into messages."""

    name: str  # machine name: "backup_failed", "stale", "dr_state" …
    severity: Severity
    summary: str  # one human line naming the database or region
    database: str | None = None
    region: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "summary", one_line(self.summary))
        object.__setattr__(self, "details", MappingProxyType(_plain(dict(self.details))))


@dataclass(frozen=True)
class Message:
    """One message to send: an alert firing, resolved, or a one-shot event, as of ``at`` on ``host``."""

    alert: str
    status: Status
    severity: Severity
    summary: str
    host: str
    at: datetime
    key: str | None = None  # the condition's key (None for events): firing and resolved share it
    database: str | None = None
    region: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "summary", one_line(self.summary))
        object.__setattr__(self, "details", MappingProxyType(_plain(dict(self.details))))

    def to_json(self) -> dict[str, Any]:
        """The body every channel sends; ``database``, ``region`` and ``key`` only when they apply."""
        body: dict[str, Any] = {
            "source": SOURCE,
            "version": SCHEMA_VERSION,
            "alert": self.alert,
            "status": self.status,
            "severity": self.severity,
            "summary": self.summary,
        }
        for name in ("key", "database", "region"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        body.update(host=self.host, at=self.at.isoformat(), details=dict(self.details))
        return body

    def body(self) -> str:
        """:meth:`to_json` as compact JSON text."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"), sort_keys=False)

    def subject(self) -> str:
        """A subject line: ``[FIRING] summary``, printable ASCII, under 100 characters."""
        text = f"[{self.status.upper()}] {self.summary}"
        ascii_only = "".join(c if " " <= c <= "~" else "?" for c in " ".join(text.split()))
        return ascii_only if len(ascii_only) <= SUBJECT_MAX else ascii_only[: SUBJECT_MAX - 3] + "..."


@dataclass
class _Firing:
    alert: Alert
    since: datetime
    repeats: int = 0  # how many times it was reported again while firing


class AlertBook:
    """The conditions firing now, by key; at most ``max_keys`` of them (the oldest is forgotten first)."""

    def __init__(self, *, host: str, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("an alert book holds at least one key")
        self.host = host
        self.max_keys = max_keys
        self.evicted = 0
        self._firing: OrderedDict[str, _Firing] = OrderedDict()

    def __len__(self) -> int:
        return len(self._firing)

    def __contains__(self, key: object) -> bool:
        return key in self._firing

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys firing now, oldest first."""
        return tuple(self._firing)

    def since(self, key: str) -> datetime | None:
        firing = self._firing.get(key)
        return firing.since if firing else None

    def firing(self, key: str, alert: Alert, at: datetime) -> tuple[Message, ...]:
        """The condition ``key`` holds as of ``at``: one "firing" message if it just started, else none."""
        current = self._firing.get(key)
        if current is not None:
            current.repeats += 1
            return ()
        while len(self._firing) >= self.max_keys:
            self._firing.popitem(last=False)
            self.evicted += 1
        self._firing[key] = _Firing(alert, at)
        return (self._message(alert, "firing", at, key, alert.summary, alert.details),)

    def clear(
        self, key: str, at: datetime, *, summary: str | None = None, details: Mapping[str, Any] | None = None
    ) -> tuple[Message, ...]:
        """The condition ``key`` no longer holds: one "resolved" message if it was firing, else none.

        The message keeps the firing alert's name, database and region; ``summary`` (default: "resolved: "
        and the firing summary) says what cleared it, and details add how long it fired."""
        current = self._firing.pop(key, None)
        if current is None:
            return ()
        alert = current.alert
        extra = {
            "firing_since": current.since,
            "firing_seconds": max(0.0, (at - current.since).total_seconds()),
            "repeats": current.repeats,
            **(details or {}),
        }
        text = summary if summary is not None else f"resolved: {alert.summary}"
        return (self._message(alert, "resolved", at, key, text, extra),)

    def event(self, alert: Alert, at: datetime) -> tuple[Message, ...]:
        """A one-shot event (a DR phase change, a failover): always one message, nothing remembered."""
        return (self._message(alert, "event", at, None, alert.summary, alert.details),)

    def _message(
        self, alert: Alert, status: Status, at: datetime, key: str | None, summary: str, details: Mapping[str, Any]
    ) -> Message:
        return Message(
            alert=alert.name,
            status=status,
            severity=alert.severity,
            summary=summary,
            host=self.host,
            at=at,
            key=key,
            database=alert.database,
            region=alert.region,
            details=details,
        )


WAL_SPOOL_KEY: Final = "wal_spool_full"


def wal_spool_alert(
    *,
    host: str,
    spool_dir: str,
    spool_bytes: int,
    max_spool_bytes: int,
    files: int,
    oldest: str | None,
    last_error: str | None,
) -> tuple[bool, Alert]:
    """The WAL spool against its bound: whether ``wal_spool_full`` holds, and the alert (firing) or the line
    that says it cleared. Over the bound means WAL is not reaching the repository — the recovery point is
    falling behind and, in stream mode, the replication slot is holding WAL on the server — so it is
    critical; the last shipping error says why."""
    details = {
        "spool_dir": spool_dir,
        "spool_bytes": spool_bytes,
        "max_spool_bytes": max_spool_bytes,
        "files": files,
        "oldest": oldest,
        "last_error": last_error,
    }
    if spool_bytes <= max_spool_bytes:
        summary = f"WAL spool {spool_dir} on {host} is back under its bound ({human_bytes(spool_bytes)})"
        return False, Alert(WAL_SPOOL_KEY, "info", summary, details=details)
    summary = (
        f"WAL is not being archived on {host}: {human_bytes(spool_bytes)} in {files} file(s) waiting in {spool_dir}, "
        f"over {human_bytes(max_spool_bytes)}" + (f"; last error: {last_error}" if last_error else "")
    )
    return True, Alert(WAL_SPOOL_KEY, "critical", summary, details=details)
