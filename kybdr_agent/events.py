"""What happened, as frozen records, and the hub that hands them to whoever listens.

Components never call each other's services: a backup finishing is announced here, and the journal (and,
next, metrics, the audit trail and alerts) subscribe. Records are frozen so a subscriber cannot change what
the next one sees. Publishing is synchronous and in order — the journal's append must happen before the
in-memory statistics fold the same outcome — and a subscriber that raises is logged and skipped: an
observer failing (a full disk under the journal, a metrics bug) never fails the job it observes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kybdr_agent.telemetry import get_logger
from kybdr_agent.wal.status import WalSpoolChecked

log = get_logger("kybdr_agent.events")


@dataclass(frozen=True)
class JobFinished:
    """A job ended, however it ended and wherever it started (the daemon, or the CLI in-process).

    ``record`` is the job's document as the API shows it, without its live progress: what the journal
    keeps and statistics fold."""

    record: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return str(self.record.get("kind"))

    @property
    def status(self) -> str:
        return str(self.record.get("status"))


@dataclass(frozen=True)
class BackupCompleted:
    database: str
    backup_id: str
    finished_at: datetime
    seconds: float
    dump_bytes: int
    stored_bytes: int
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackupFailed:
    database: str
    error: str
    seconds: float
    at: datetime


@dataclass(frozen=True)
class ValidationVerdict:
    backup_id: str
    database: str
    level: str
    ok: bool
    corrupt: bool
    error: str | None = None


@dataclass(frozen=True)
class DrillResult:
    database: str
    backup_id: str | None
    passed: bool
    seconds: float | None
    error: str | None = None


@dataclass(frozen=True)
class RetentionDeleted:
    database: str
    backup_id: str
    stored_bytes: int


@dataclass(frozen=True)
class ReplicaCopyFailed:
    """A backup is stored in the repository but its cross-region copy failed (the backup job fails too)."""

    database: str
    backup_id: str
    error: str
    at: datetime


@dataclass(frozen=True)
class Freshness:
    """One covered database at one housekeeping tick: its newest good backup and the window it must be in.

    ``window_seconds`` is the policy's window (or an operator's ``--max-age``); ``stale`` is
    ``age_seconds is None or age_seconds > window_seconds``: no good backup at all is stale too."""

    database: str
    newest_good_at: datetime | None
    newest_backup_id: str | None
    age_seconds: float | None
    window_seconds: float
    stale: bool


@dataclass(frozen=True)
class FreshnessChecked:
    """Every housekeeping tick: how fresh each covered database's newest good backup is (from the
    repository). Drives ``BackupAgeSeconds``, the last-success gauges after a restart and the stale alert."""

    at: datetime
    databases: tuple[Freshness, ...]


@dataclass(frozen=True)
class RepositorySpace:
    """Every housekeeping tick, for a folder repository: the free bytes of its filesystem."""

    at: datetime
    location: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class ControlRequestHandled:
    """One control API request, answered (or refused). ``caller`` is ``uid:N`` for a unix-socket peer or
    ``token:NAME`` for a TCP bearer token (``anonymous`` when none was valid); ``route`` is the route's
    name (``unmatched`` when no route matched), ``target`` what it acted on when the path names it."""

    at: datetime
    method: str
    path: str
    route: str
    status: int
    caller: str
    role: str | None
    seconds: float
    target: str | None = None

    @property
    def changes(self) -> bool:
        """Whether the request asks the agent to change something (anything but GET/HEAD/OPTIONS)."""
        return self.method not in ("GET", "HEAD", "OPTIONS")

    @property
    def refused(self) -> bool:
        """Answered 401 or 403: the caller was not allowed (other 4xx are bad input, not refusals)."""
        return self.status in (401, 403)


@dataclass(frozen=True)
class DRTransition:
    """The DR state machine changed phase (``steady`` → ``suspect`` …); ``active`` is the region now active."""

    from_phase: str
    to_phase: str
    active: str
    reason: str
    at: datetime


@dataclass(frozen=True)
class DRAlert:
    """Something an operator must hear about: a refused or failed failover, a fence, a split-brain risk."""

    severity: str  # "info" | "warning" | "critical"
    message: str
    at: datetime


@dataclass(frozen=True)
class DROperationFinished:
    """A failover, failback or drill ended; ``record`` is its history entry (outcome, steps, timings)."""

    record: Mapping[str, Any]


@dataclass(frozen=True)
class DRProbed:
    """One round of probes (for metrics: primary healthy, lag, probe latency)."""

    observations: Mapping[str, Any]
    primary_healthy: bool


Event = (
    JobFinished
    | BackupCompleted
    | BackupFailed
    | ValidationVerdict
    | DrillResult
    | RetentionDeleted
    | ReplicaCopyFailed
    | FreshnessChecked
    | RepositorySpace
    | ControlRequestHandled
    | DRTransition
    | DRAlert
    | DROperationFinished
    | DRProbed
    | WalSpoolChecked
)
Subscriber = Callable[[Event], None]


@dataclass
class EventHub:
    """Subscribers in the order they subscribed; each sees every event, a failing one is logged and skipped."""

    subscribers: list[tuple[str, Subscriber]] = field(default_factory=list)

    def subscribe(self, name: str, subscriber: Subscriber) -> None:
        self.subscribers.append((name, subscriber))

    def publish(self, event: Event) -> None:
        for name, subscriber in self.subscribers:
            try:
                subscriber(event)
            except Exception:
                log.exception("event.subscriber_failed", subscriber=name, event_type=type(event).__name__)
