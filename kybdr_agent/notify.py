"""Alerts out of the agent: events become conditions, conditions become messages, messages go to SNS and a
JSON webhook — without ever slowing down or failing the work they report on.

The split is the house's: :mod:`kybdr_agent.alerts` decides (pure, de-duplicated, bounded); this module
only maps events to its calls; :mod:`kybdr_agent.notify_channels` moves bytes (the channels, and each one's
outbox and worker: bounded attempts, jittered backoff, ``notify.dropped`` when they run out; a token never
logged). ``Notifier.on_event`` is an ``EventHub`` subscriber, so it runs inline in the job that published:
it only updates the book and appends to one bounded queue per channel (the oldest message goes, with a
warning, when a queue is full) and never blocks or raises. ``Notifier.run`` is the dispatcher the daemon's
task group owns, one worker per channel. Any failure but cancellation is logged and survived: a page that
cannot be sent must not take down the agent that would send the next.

The channel names below are re-exported from :mod:`kybdr_agent.notify_channels`, where they live.
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import anyio
from anyio.abc import TaskStatus

from kybdr_agent.alerts import (
    WAL_SPOOL_KEY,
    Alert,
    AlertBook,
    Message,
    Severity,
    dr_phase_severity,
    human_bytes,
    human_duration,
    parse_severity,
    replication_lag,
    wal_spool_alert,
)
from kybdr_agent.clock import Clock
from kybdr_agent.events import (
    BackupCompleted,
    BackupFailed,
    DRAlert,
    DrillResult,
    DROperationFinished,
    DRProbed,
    DRTransition,
    FreshnessChecked,
    ReplicaCopyFailed,
    RepositorySpace,
    ValidationVerdict,
)
from kybdr_agent.notify_channels import BACKSTOP as BACKSTOP
from kybdr_agent.notify_channels import OPEN_TIMEOUT as OPEN_TIMEOUT
from kybdr_agent.notify_channels import WAKE_POLL as WAKE_POLL
from kybdr_agent.notify_channels import Channel as Channel
from kybdr_agent.notify_channels import ChannelError as ChannelError
from kybdr_agent.notify_channels import Outbox, scrub
from kybdr_agent.notify_channels import SnsChannel as SnsChannel
from kybdr_agent.notify_channels import WebhookChannel as WebhookChannel
from kybdr_agent.notify_channels import build_channels as build_channels
from kybdr_agent.notify_channels import redact_url as redact_url
from kybdr_agent.telemetry import get_logger
from kybdr_agent.wal.status import WalSpoolChecked

if TYPE_CHECKING:
    from kybdr_agent.config_sections import NotifySettings

log = get_logger("kybdr_agent.notify")

CLOSE_TIMEOUT: Final = 5.0
FAILOVER_OPERATIONS: Final = ("failover", "failback")
_NOT_DETAILS: Final = frozenset({"kind", "seq", "at", "frozen"})  # of a DR operation record
_JITTER: Final = random.Random()  # noqa: S311 - backoff jitter needs no cryptographic randomness


@dataclass(frozen=True)
class NotifyConfig:
    """Where alerts go and when; built from ``[notify]`` by the composition root, or by hand in tests."""

    sns_topic_arn: str | None = None
    sns_region: str | None = None  # default: the topic ARN's region
    webhook_url: str | None = None
    webhook_token: str | None = field(default=None, repr=False)  # the token itself, read from its file
    min_free_bytes: int = 10 << 30
    max_lag_bytes: int | None = None  # None: no lag alert
    timeout: float = 10.0  # per attempt, per channel
    max_attempts: int = 5
    queue_size: int = 1000  # per channel
    host: str = field(default_factory=socket.gethostname)
    max_keys: int = 1024
    backoff_base: float = 1.0
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.max_attempts < 1 or self.queue_size < 1:
            raise ValueError("notify needs a positive timeout, at least one attempt and room for one message")

    @property
    def region(self) -> str | None:
        """The SNS region: configured, or the topic ARN's (``arn:aws:sns:REGION:ACCOUNT:NAME``)."""
        if self.sns_region or not self.sns_topic_arn:
            return self.sns_region
        fields = self.sns_topic_arn.split(":")
        return fields[3] or None if len(fields) >= 6 else None

    def delay(self, attempt: int) -> float:
        """Before retry ``attempt`` (1-based): exponential, capped, half of it jitter."""
        cap = min(self.backoff_max, self.backoff_base * 2.0 ** (attempt - 1))
        return cap / 2 + _JITTER.uniform(0, cap / 2)

    @classmethod
    def from_settings(
        cls,
        settings: NotifySettings,
        *,
        webhook_token: str | None,
        dr_max_lag_bytes: int | None = None,
        host: str | None = None,
    ) -> NotifyConfig:
        """From ``[notify]``; ``webhook_token`` read by the caller (``secret_files`` rules), lag bound
        defaulting to ``dr.max_lag_bytes`` when DR is on."""
        return cls(
            sns_topic_arn=settings.sns_topic_arn,
            webhook_url=settings.webhook_url,
            webhook_token=webhook_token,
            min_free_bytes=settings.min_free_bytes,
            max_lag_bytes=settings.max_lag_bytes if settings.max_lag_bytes is not None else dr_max_lag_bytes,
            timeout=settings.timeout.total_seconds(),
            max_attempts=settings.max_attempts,
            host=host or socket.gethostname(),
        )


class Notifier:
    """Events in (``on_event``, sync, never blocks), messages out (``run``, one worker per channel)."""

    def __init__(self, config: NotifyConfig, *, clock: Clock, channels: list[Channel] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.book = AlertBook(host=config.host, max_keys=config.max_keys)
        self.outboxes = [Outbox(c) for c in (build_channels(config) if channels is None else channels)]
        self._loop_thread: int | None = None
        self._handlers: dict[type, Callable[[Any], tuple[Message, ...]]] = {
            BackupFailed: self._backup_failed,
            BackupCompleted: self._backup_completed,
            ValidationVerdict: self._validation,
            DrillResult: self._drill,
            FreshnessChecked: self._freshness,
            RepositorySpace: self._space,
            ReplicaCopyFailed: self._replica_copy_failed,
            DRTransition: self._dr_transition,
            DROperationFinished: self._dr_operation,
            DRAlert: self._dr_alert,
            DRProbed: self._dr_probed,
            WalSpoolChecked: self._wal_spool,
        }

    # --- the subscriber -------------------------------------------------------------------------------

    def on_event(self, event: object) -> None:
        """An ``EventHub`` subscriber: turn the event into messages and queue them; never blocks or raises."""
        handler = self._handlers.get(type(event))
        if handler is None:
            return
        try:
            evicted = self.book.evicted
            messages = handler(event)
            if self.book.evicted != evicted:
                log.warning("notify.book_full", max_keys=self.book.max_keys, forgotten=self.book.evicted - evicted)
            for message in messages:
                self._enqueue(message)
        except Exception:
            log.exception("notify.event_failed", event_type=type(event).__name__)

    def _enqueue(self, message: Message) -> None:
        log.info("notify.alert", alert=message.alert, status=message.status, key=message.key, summary=message.summary)
        wake_now = threading.get_ident() == self._loop_thread  # else the worker's poll picks it up
        for outbox in self.outboxes:
            outbox.put(message, self.config.queue_size, wake_now=wake_now)

    # --- events to conditions ---------------------------------------------------------------------------

    def _backup_failed(self, e: BackupFailed) -> tuple[Message, ...]:
        alert = Alert(
            "backup_failed",
            "critical",
            f"backup of database {e.database} failed on {self.config.host}: {e.error}",
            database=e.database,
            details={"error": e.error, "seconds": e.seconds},
        )
        return self.book.firing(f"backup_failed:{e.database}", alert, e.at)

    def _backup_completed(self, e: BackupCompleted) -> tuple[Message, ...]:
        details = {"backup_id": e.backup_id}
        return self.book.clear(
            f"backup_failed:{e.database}",
            e.finished_at,
            summary=f"backup of database {e.database} succeeded again on {self.config.host} ({e.backup_id})",
            details=details,
        ) + self.book.clear(
            f"replica_copy_failed:{e.database}",
            e.finished_at,
            summary=f"backup {e.backup_id} of database {e.database} is complete, cross-region copy included",
            details=details,
        )

    def _replica_copy_failed(self, e: ReplicaCopyFailed) -> tuple[Message, ...]:
        alert = Alert(
            "replica_copy_failed",
            "warning",
            f"cross-region copy of backup {e.backup_id} of database {e.database} to the dr region failed: {e.error}",
            database=e.database,
            region="dr",
            details={"backup_id": e.backup_id, "error": e.error},
        )
        return self.book.firing(f"replica_copy_failed:{e.database}", alert, e.at)

    def _validation(self, e: ValidationVerdict) -> tuple[Message, ...]:
        key = f"validation_failed:{e.database}"
        if e.ok:
            return self.book.clear(
                key, self.clock(), summary=f"backup {e.backup_id} of database {e.database} validated ({e.level})"
            )
        what = "is corrupt" if e.corrupt else "could not be validated"
        alert = Alert(
            "validation_failed",
            "critical" if e.corrupt else "warning",
            f"backup {e.backup_id} of database {e.database} {what} ({e.level}): {e.error or 'no detail'}",
            database=e.database,
            details={"backup_id": e.backup_id, "level": e.level, "corrupt": e.corrupt, "error": e.error},
        )
        return self.book.firing(key, alert, self.clock())

    def _drill(self, e: DrillResult) -> tuple[Message, ...]:
        key = f"drill_failed:{e.database}"
        if e.passed:
            return self.book.clear(
                key, self.clock(), summary=f"restore drill of database {e.database} passed ({e.backup_id})"
            )
        alert = Alert(
            "drill_failed",
            "critical",
            f"restore drill of database {e.database} failed: {e.error or 'no detail'}",
            database=e.database,
            details={"backup_id": e.backup_id, "seconds": e.seconds, "error": e.error},
        )
        return self.book.firing(key, alert, self.clock())

    def _freshness(self, e: FreshnessChecked) -> tuple[Message, ...]:
        messages: list[Message] = []
        covered = set()
        for f in e.databases:
            covered.add(f.database)
            key = f"stale:{f.database}"
            details = {
                "newest_good_at": f.newest_good_at,
                "newest_backup_id": f.newest_backup_id,
                "age_seconds": f.age_seconds,
                "window_seconds": f.window_seconds,
            }
            if not f.stale:
                age = human_duration(f.age_seconds or 0.0)
                summary = f"database {f.database} has a good backup again ({age} old)"
                messages += self.book.clear(key, e.at, summary=summary, details=details)
                continue
            window = human_duration(f.window_seconds)
            if f.age_seconds is None:
                summary = f"database {f.database} has no good backup (window {window})"
            else:
                age = human_duration(f.age_seconds)
                summary = f"database {f.database}: newest good backup is {age} old, over {window}"
            alert = Alert("stale", "critical", summary, database=f.database, details=details)
            messages += self.book.firing(key, alert, e.at)
        for key in self.book.keys:
            database = key.removeprefix("stale:")
            if key.startswith("stale:") and database not in covered:
                summary = f"database {database} is no longer covered by a backup policy"
                messages += self.book.clear(key, e.at, summary=summary)
        return tuple(messages)

    def _space(self, e: RepositorySpace) -> tuple[Message, ...]:
        minimum = self.config.min_free_bytes
        details = {"location": e.location, "free_bytes": e.free_bytes, "total_bytes": e.total_bytes}
        details["min_free_bytes"] = minimum
        free = f"{human_bytes(e.free_bytes)} free of {human_bytes(e.total_bytes)}"
        if e.free_bytes >= minimum:
            return self.book.clear("repository_low", e.at, summary=f"repository {e.location}: {free}", details=details)
        summary = f"repository {e.location} is running low: {free}, under {human_bytes(minimum)}"
        return self.book.firing("repository_low", Alert("repository_low", "warning", summary, details=details), e.at)

    def _dr_transition(self, e: DRTransition) -> tuple[Message, ...]:
        summary = f"DR state {e.from_phase} -> {e.to_phase} on {self.config.host}, active region {e.active}"
        alert = Alert(
            "dr_state",
            dr_phase_severity(e.to_phase),
            summary + (f": {e.reason}" if e.reason else ""),
            region=e.active,
            details={"from": e.from_phase, "to": e.to_phase, "active": e.active, "reason": e.reason},
        )
        return self.book.event(alert, e.at)

    def _dr_operation(self, e: DROperationFinished) -> tuple[Message, ...]:
        record = e.record
        operation = str(record.get("operation") or "")
        if operation not in FAILOVER_OPERATIONS:
            return ()
        outcome = str(record.get("outcome") or "unknown")
        source, target = record.get("source"), record.get("target")
        severity: Severity = "critical"  # a failover, whatever its outcome: the database moved, or failed to
        if operation == "failback":
            severity = "info" if outcome == "succeeded" else "warning"
        trigger = record.get("trigger") or "unknown"
        alert = Alert(
            f"dr_{operation}",
            severity,
            f"DR {operation} from {source} to {target} {outcome} ({trigger}) on {self.config.host}",
            region=str(target) if target else None,
            details={k: v for k, v in record.items() if k not in _NOT_DETAILS},
        )
        return self.book.event(alert, _when(record.get("at"), self.clock))

    def _dr_alert(self, e: DRAlert) -> tuple[Message, ...]:
        return self.book.event(Alert("dr_alert", parse_severity(e.severity), f"DR: {e.message}"), e.at)

    def _dr_probed(self, e: DRProbed) -> tuple[Message, ...]:
        bound = self.config.max_lag_bytes
        lag = replication_lag(e.observations)
        if bound is None or lag is None:
            return ()
        lag_bytes, region = lag
        at = _when(e.observations.get("at"), self.clock)
        details = {"lag_bytes": lag_bytes, "max_lag_bytes": bound}
        if lag_bytes <= bound:
            summary = f"DR replication lag to the {region} region is back under the bound ({human_bytes(lag_bytes)})"
            return self.book.clear("dr_lag", at, summary=summary, details=details)
        summary = f"DR replication lag to the {region} region is {human_bytes(lag_bytes)}, over {human_bytes(bound)}"
        return self.book.firing("dr_lag", Alert("dr_lag", "warning", summary, region=region, details=details), at)

    def _wal_spool(self, e: WalSpoolChecked) -> tuple[Message, ...]:
        over, alert = wal_spool_alert(
            host=self.config.host,
            spool_dir=e.spool_dir,
            spool_bytes=e.spool_bytes,
            max_spool_bytes=e.max_spool_bytes,
            files=e.files,
            oldest=e.oldest,
            last_error=e.last_error,
        )
        if not over:
            return self.book.clear(WAL_SPOOL_KEY, e.at, summary=alert.summary, details=alert.details)
        return self.book.firing(WAL_SPOOL_KEY, alert, e.at)

    # --- the dispatcher ---------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver queued messages until cancelled; closes the channels on the way out."""
        self._loop_thread = threading.get_ident()
        try:
            async with anyio.create_task_group() as tg:
                for outbox in self.outboxes:
                    tg.start_soon(outbox.work, self.config, name=f"notify-{outbox.channel.name}")
                task_status.started()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                await self.aclose()

    async def aclose(self) -> None:
        """Close every channel's client (idempotent; a channel reopens on its next send)."""
        for outbox in self.outboxes:
            try:
                await outbox.channel.aclose()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                log.warning("notify.close_failed", channel=outbox.channel.name, error=scrub(str(exc), self.config))

    # --- for /healthz -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Firing conditions and delivery counts, totals and per channel."""
        channels = {o.channel.name: o.counts() for o in self.outboxes}
        return {
            "firing": list(self.book.keys),
            "queued": sum(len(o.queue) for o in self.outboxes),
            "sent": sum(o.sent for o in self.outboxes),
            "failed": sum(o.failed for o in self.outboxes),
            "dropped": sum(o.dropped for o in self.outboxes),
            "channels": channels,
        }


def _when(value: object, clock: Clock) -> datetime:
    """An ISO time from a record, or now."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    return clock()
