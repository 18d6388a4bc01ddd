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
    | DRTransition
    | DRAlert
    | DROperationFinished
    | DRProbed
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
