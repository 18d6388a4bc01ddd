"""Alerts out of the agent: events become conditions, conditions become messages, messages go to SNS and a
JSON webhook — without ever slowing down or failing the work they report on.

The split is the house's: :mod:`kybdr_agent.alerts` decides (pure, de-duplicated, bounded); this module
only maps events to its calls and moves bytes. ``Notifier.on_event`` is an ``EventHub`` subscriber, so it
runs inline in the job that published: it only updates the book and appends to one bounded queue per
channel (the oldest message goes, with a warning, when a queue is full) and never blocks or raises.
``Notifier.run`` is the dispatcher the daemon's task group owns: one worker per channel, so a channel that
hangs only delays its own queue; each attempt is cut at ``timeout``, retried with jittered, bounded
exponential backoff up to ``max_attempts``, then logged as ``notify.dropped``. Any failure but cancellation
is logged and survived: a page that cannot be sent must not take down the agent that would send the next.

Channels send :meth:`Message.body` — the same JSON document everywhere. SNS (``publish`` with a subject
and message attributes for filter policies; endpoints follow botocore's environment, e.g.
``AWS_ENDPOINT_URL_SNS``) and a webhook (POST, ``Authorization: Bearer`` when a token is configured, any 2xx
is delivered, redirects are not followed so the token never travels elsewhere). The token is never logged:
it is left out of reprs, and error texts are scrubbed of it before they are logged or shown in ``status()``.
"""

from __future__ import annotations

import random
import socket
import threading
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import anyio
from anyio.abc import TaskStatus

from kybdr_agent import __version__
from kybdr_agent.alerts import (
    Alert,
    AlertBook,
    Message,
    Severity,
    dr_phase_severity,
    human_bytes,
    human_duration,
    one_line,
    parse_severity,
    replication_lag,
)
from kybdr_agent.clock import Clock
from kybdr_agent.errors import KybdrError
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
from kybdr_agent.telemetry import get_logger

if TYPE_CHECKING:
    from aiobotocore.session import AioSession

    from kybdr_agent.config_sections import NotifySettings

log = get_logger("kybdr_agent.notify")

WAKE_POLL: Final = 1.0  # a worker looks at its queue at least this often, whoever appended to it
CLOSE_TIMEOUT: Final = 5.0
OPEN_TIMEOUT: Final = 30.0  # loading botocore's SNS model is CPU work; credentials may come from IMDS
# A channel's own timeouts are a backstop past the notifier's per-attempt bound, so the bound always wins.
BACKSTOP: Final = 1.0
FAILOVER_OPERATIONS: Final = ("failover", "failback")
_NOT_DETAILS: Final = frozenset({"kind", "seq", "at", "frozen"})  # of a DR operation record
_JITTER: Final = random.Random()  # noqa: S311 - backoff jitter needs no cryptographic randomness


class ChannelError(KybdrError):
    """A channel did not deliver a message (the text never carries a secret)."""


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


class Channel(Protocol):
    name: str

    async def open(self) -> None:
        """Make the client ready (idempotent, no network call): CPU work kept out of the attempt's bound."""
        ...

    async def send(self, message: Message) -> None:
        """Deliver one message or raise; the notifier bounds the time and retries."""
        ...

    async def aclose(self) -> None: ...


def redact_url(url: str) -> str:
    """A URL fit for a log line: no user, password, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class SnsChannel:
    """``sns:Publish`` to one topic; the client is opened on first use and kept until ``aclose``."""

    name = "sns"

    def __init__(
        self, topic_arn: str, *, region: str | None, timeout: float, session: AioSession | None = None
    ) -> None:
        self.topic_arn = topic_arn
        self.region = region
        self.timeout = timeout
        self._session = session
        self._exit: AsyncExitStack | None = None
        self._client: Any = None

    async def open(self) -> None:
        if self._client is not None:
            return
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(
            connect_timeout=self.timeout + BACKSTOP,
            read_timeout=self.timeout + BACKSTOP,
            retries={"total_max_attempts": 1},  # the notifier's retries are the only ones
        )
        stack = AsyncExitStack()
        try:
            session = self._session or get_session()
            self._client = await stack.enter_async_context(
                session.create_client("sns", region_name=self.region, config=config)
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise
        self._exit = stack

    async def send(self, message: Message) -> None:
        await self.open()
        attributes = {"alert": message.alert, "status": message.status, "severity": message.severity}
        for name in ("database", "region"):
            value = getattr(message, name)
            if value:
                attributes[name] = value
        await self._client.publish(
            TopicArn=self.topic_arn,
            Subject=message.subject(),
            Message=message.body(),
            MessageAttributes={k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()},
        )

    async def aclose(self) -> None:
        stack, self._exit, self._client = self._exit, None, None
        if stack is not None:
            await stack.aclose()


class WebhookChannel:
    """POST the JSON body to a URL; any 2xx answer is delivered, anything else (redirects included) is not."""

    def __init__(self, url: str, *, token: str | None, timeout: float, name: str = "webhook") -> None:
        self.name = name
        self.url = url
        self.where = redact_url(url)
        self.timeout = timeout
        self._token = token
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"WebhookChannel({self.where!r}, token={'set' if self._token else 'none'})"

    async def open(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout + BACKSTOP))

    async def send(self, message: Message) -> None:
        await self.open()
        assert self._session is not None
        headers = {"Content-Type": "application/json", "User-Agent": f"kybdr-agent/{__version__}"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            async with self._session.post(
                self.url, data=message.body().encode(), headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return
                status = response.status
        except aiohttp.ClientError as exc:
            raise ChannelError(f"POST {self.where} failed: {type(exc).__name__}: {exc}") from None
        raise ChannelError(f"POST {self.where} answered HTTP {status}")

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def build_channels(config: NotifyConfig) -> list[Channel]:
    """The channels ``config`` names: SNS when a topic is set, the webhook when a URL is."""
    channels: list[Channel] = []
    if config.sns_topic_arn:
        channels.append(SnsChannel(config.sns_topic_arn, region=config.region, timeout=config.timeout))
    if config.webhook_url:
        channels.append(WebhookChannel(config.webhook_url, token=config.webhook_token, timeout=config.timeout))
    return channels


@dataclass
class _Outbox:
    """One channel's bounded queue and what happened to its messages."""

    channel: Channel
    queue: deque[Message] = field(default_factory=deque)
    wake: anyio.Event | None = None
    sent: int = 0
    failed: int = 0  # attempts that failed (a message retried twice and then sent counts 2)
    dropped: int = 0  # messages given up after max_attempts, or pushed out of a full queue
    last_error: str | None = None


class Notifier:
    """Events in (``on_event``, sync, never blocks), messages out (``run``, one worker per channel)."""

    def __init__(self, config: NotifyConfig, *, clock: Clock, channels: list[Channel] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.book = AlertBook(host=config.host, max_keys=config.max_keys)
        self.outboxes = [_Outbox(c) for c in (build_channels(config) if channels is None else channels)]
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
            if len(outbox.queue) >= self.config.queue_size:
                lost = outbox.queue.popleft()
                outbox.dropped += 1
                log.warning("notify.queue_full", channel=outbox.channel.name, dropped_alert=lost.alert, key=lost.key)
            outbox.queue.append(message)
            if wake_now and outbox.wake is not None:
                outbox.wake.set()

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

    # --- the dispatcher ---------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver queued messages until cancelled; closes the channels on the way out."""
        self._loop_thread = threading.get_ident()
        try:
            async with anyio.create_task_group() as tg:
                for outbox in self.outboxes:
                    tg.start_soon(self._worker, outbox, name=f"notify-{outbox.channel.name}")
                task_status.started()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                await self.aclose()

    async def _worker(self, outbox: _Outbox) -> None:
        while True:
            if not outbox.queue:
                outbox.wake = anyio.Event()
                with anyio.move_on_after(WAKE_POLL):
                    await outbox.wake.wait()
                continue
            message = outbox.queue.popleft()
            try:
                await self._deliver(outbox, message)
            except Exception:  # a bug here must not end the dispatcher, nor the daemon's task group
                log.exception("notify.worker_failed", channel=outbox.channel.name, alert=message.alert)

    async def _deliver(self, outbox: _Outbox, message: Message) -> None:
        """Bounded attempts, each bounded in time; anything but cancellation is logged and survived."""
        name = outbox.channel.name
        for attempt in range(1, self.config.max_attempts + 1):
            bound = OPEN_TIMEOUT
            try:
                with anyio.fail_after(bound):
                    await outbox.channel.open()
                bound = self.config.timeout
                with anyio.fail_after(bound):
                    await outbox.channel.send(message)
            except TimeoutError:
                error = f"no answer within {bound:g} s"
            except Exception as exc:  # noqa: BLE001 - a broken channel is logged, never fatal
                error = self._scrub(f"{type(exc).__name__}: {exc}")
            else:
                outbox.sent += 1
                log.info("notify.sent", channel=name, alert=message.alert, status=message.status, key=message.key)
                return
            outbox.failed += 1
            outbox.last_error = error
            log.warning(
                "notify.send_failed", channel=name, alert=message.alert, key=message.key, attempt=attempt, error=error
            )
            if attempt < self.config.max_attempts:
                await anyio.sleep(self.config.delay(attempt))
        outbox.dropped += 1
        log.error(
            "notify.dropped",
            channel=name,
            alert=message.alert,
            status=message.status,
            key=message.key,
            summary=message.summary,
            attempts=self.config.max_attempts,
        )

    def _scrub(self, text: str) -> str:
        token = self.config.webhook_token
        if token:
            text = text.replace(token, "***")
        if self.config.webhook_url:
            text = text.replace(self.config.webhook_url, redact_url(self.config.webhook_url))
        return one_line(text, 500)

    async def aclose(self) -> None:
        """Close every channel's client (idempotent; a channel reopens on its next send)."""
        for outbox in self.outboxes:
            try:
                await outbox.channel.aclose()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                log.warning("notify.close_failed", channel=outbox.channel.name, error=self._scrub(str(exc)))

    # --- for /healthz -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Firing conditions and delivery counts, totals and per channel."""
        channels = {
            o.channel.name: {
                "queued": len(o.queue),
                "sent": o.sent,
                "failed": o.failed,
                "dropped": o.dropped,
                "last_error": o.last_error,
            }
            for o in self.outboxes
        }
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
