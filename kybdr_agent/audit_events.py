"""What the agent's events put in the audit trail: the event→record mapping and the hub's subscriber.

Why apart from :mod:`kybdr_agent.audit`. That module is the journal (segments, the chain on disk, reading,
shipping) and knows no event; this one decides which events are auditable actions and what their records
say, so a new event type changes this mapping and never the journal's durability code. Requests are
recorded when they change something or were refused; the agent's own actions (scheduled jobs, retention
deletes, automatic DR operations and state changes) always. Refusals are rate-limited, since they need no
credentials to cause. The trail is only typed here (``TYPE_CHECKING``): ``audit`` imports this module to
re-export its names, so a runtime import back would be a cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from kybdr_agent.events import (
    ControlRequestHandled,
    DROperationFinished,
    DRTransition,
    Event,
    JobFinished,
    RetentionDeleted,
)
from kybdr_agent.telemetry import get_logger

if TYPE_CHECKING:
    from kybdr_agent.audit import AuditTrail

log = get_logger("kybdr_agent.audit")  # the trail's own logger: one name for everything auditing logs

REFUSALS_PER_MINUTE: Final = 120
_MINUTE: Final = timedelta(minutes=1)


@dataclass(frozen=True)
class Entry:
    """What one event puts in the trail."""

    caller: str
    operation: str
    target: str | None
    outcome: str
    detail: Mapping[str, Any]
    at: datetime | None = None


def entry_for(event: Event) -> Entry | None:
    """The record an event makes, or None when it is not an auditable action.

    Requests are audited when they change something or were refused; the agent's own actions (scheduled
    jobs, retention deletes, automatic DR operations and state changes) always. A job someone asked for
    over the control API is already in the trail as that request."""
    if isinstance(event, ControlRequestHandled):
        if not (event.changes or event.refused):
            return None
        if event.route == "wal_push" and event.status < 400:
            return None  # one per WAL segment, fsynced, would double a push's cost: the WAL archive records each
        outcome = f"{event.status} refused" if event.refused else str(event.status)
        detail = {"path": event.path, "role": event.role, "seconds": round(event.seconds, 3)}
        return Entry(event.caller, f"{event.method} {event.route}", event.target, outcome, detail, event.at)
    if isinstance(event, JobFinished):
        record = event.record
        params = record.get("params")
        slot = params.get("slot") if isinstance(params, Mapping) else None
        if record.get("via") != "agent" or not slot:
            return None
        database = record.get("database")
        detail = {"job": record.get("id"), "slot": slot, "error": record.get("error")}
        return Entry("agent:schedule", event.kind, None if database is None else str(database), event.status, detail)
    if isinstance(event, RetentionDeleted):
        detail = {"database": event.database, "stored_bytes": event.stored_bytes}
        return Entry("agent", "retention.delete", event.backup_id, "deleted", detail)
    if isinstance(event, DROperationFinished):
        record = event.record
        if record.get("trigger") != "auto":
            return None
        target = record.get("target")
        detail = {key: record.get(key) for key in ("operation_id", "source", "reason", "duration_s")}
        return Entry(
            "agent:dr",
            f"dr.{record.get('operation')}",
            None if target is None else str(target),
            str(record.get("outcome")),
            detail,
        )
    if isinstance(event, DRTransition):
        outcome = f"{event.from_phase} -> {event.to_phase}"
        return Entry("agent:dr", "dr.transition", event.active, outcome, {"reason": event.reason}, event.at)
    return None


class _RefusalBudget:
    """At most ``limit`` refused requests recorded a minute; the rest counted, and one record for them."""

    def __init__(self, trail: AuditTrail, limit: int) -> None:
        self.trail, self.limit = trail, limit
        self.start: datetime | None = None
        self.recorded = self.suppressed = 0

    def roll(self) -> None:
        now = self.trail.clock()
        if self.start is not None and now - self.start < _MINUTE:
            return
        if self.suppressed:
            outcome = f"{self.suppressed} refused requests not recorded"
            self.trail.append("agent", "audit.suppressed", None, outcome, {"from": self.start, "to": now})
        self.start, self.recorded, self.suppressed = now, 0, 0

    def take(self) -> bool:
        if self.recorded < self.limit:
            self.recorded += 1
            return True
        self.suppressed += 1
        if self.suppressed == 1:
            log.warning("audit.refusals_suppressed", limit=self.limit)
        return False


def audit_subscriber(trail: AuditTrail, *, refusals_per_minute: int = REFUSALS_PER_MINUTE) -> Callable[[Event], None]:
    """The event hub's subscriber. It never raises; a record it could not write is logged as an error.

    Refused requests need no credentials to cause, so a flood of them could fill the disk and stall the event
    loop with fsyncs: past ``refusals_per_minute`` in a minute they are counted instead, and one
    ``audit.suppressed`` record says how many were left out once the minute is over."""
    budget = _RefusalBudget(trail, refusals_per_minute)

    def subscriber(event: Event) -> None:
        try:
            budget.roll()
            entry = entry_for(event)
            if entry is None:
                return
            # Every request nobody authenticated (a 401, or a 404/405 that matched no route and so never
            # reached the guard) costs the caller nothing: all of them share the refusal budget.
            unauthenticated = isinstance(event, ControlRequestHandled) and (event.refused or event.role is None)
            if unauthenticated and not budget.take():
                return
            trail.append(entry.caller, entry.operation, entry.target, entry.outcome, entry.detail, at=entry.at)
        except OSError as exc:  # the disk's own words say it all; a traceback would add nothing
            log.error(  # noqa: TRY400
                "audit.write_failed",
                directory=str(trail.directory),
                event_type=type(event).__name__,
                error=exc.strerror or str(exc),
            )
        except Exception:
            log.exception("audit.record_failed", event_type=type(event).__name__)

    return subscriber
