"""CloudWatch: the metrics terraform's alarms and dashboards read, sent by ``PutMetricData`` off the hot path.

Why this shape. ``terraform/modules/agent_alarms`` and the dashboards in ``terraform/cloudwatch.tf`` query
namespace ``KybdrAgent`` (``telemetry.cloudwatch_namespace``) with Metrics Insights, so the metric names
here are a contract with terraform, checked by ``tests/integration/test_cloudwatch.py``:

==========================  ========  ==========  ==========================================================
metric                      unit      dimensions  from
==========================  ========  ==========  ==========================================================
``BackupFailures``          Count     Database    ``BackupFailed`` (1 each)
``BackupSucceeded``         Count     Database    ``BackupCompleted`` (1 each)
``BackupDurationSeconds``   Seconds   Database    ``BackupCompleted.seconds``
``BackupStoredBytes``       Bytes     Database    ``BackupCompleted.stored_bytes``
``BackupAgeSeconds``        Seconds   Database    every flush, from the last ``FreshnessChecked``
``RestoreDrillSeconds``     Seconds   Database    ``DrillResult.seconds`` (passed or not, when measured)
``DRPrimaryHealthy``        None      —           ``DRProbed`` (1 healthy, 0 not)
``DRFailovers``             Count     —           ``DROperationFinished``: a ``failover`` that ``succeeded``
==========================  ========  ==========  ==========================================================

With ``host`` set, every metric also carries a ``Host`` dimension; the queries aggregate over all dimensions.

``BackupAgeSeconds`` is published on EVERY flush, its age recomputed from the clock then, not only when
housekeeping ticks (it may tick hourly): the backup-age alarm treats missing data as breaching, and an age
that keeps growing while housekeeping is stuck is exactly what it must see. Each ``FreshnessChecked``
replaces the set of databases tracked (a database no longer covered stops being reported); a
``BackupCompleted`` of a tracked database moves its newest backup forward at once (the next tick corrects
it if validation later finds the backup bad). A covered database with NO good backup at all reports
``NO_BACKUP_AGE_SECONDS`` (ten years): "no restorable backup exists" is the condition the alarm is for, as
``Freshness.stale`` and the stale alert also treat it, and a constant that large is above any threshold
an operator can configure (``backup_max_age_seconds`` is hours or days), so the alarm fires whatever its
threshold and the dashboard shows the gap as an unmistakable spike.

Buffering. Subscribers must never block: ``on_event`` only folds a sample into a per-series aggregate
(``StatisticValues``: SampleCount, Sum, Minimum, Maximum) keyed by (metric, dimensions, unit), under a
lock, in microseconds. The buffer therefore grows with the number of distinct series, not with the event
rate, and is capped at ``max_series``: a new series beyond the cap is dropped and counted (logged once per
flush window). Each datum carries the time of its series' latest sample.

Sending. ``run`` flushes every ``interval`` through one aiobotocore ``cloudwatch`` client with connect and
read timeouts; its endpoint comes from botocore's standard ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_CLOUDWATCH`` environment (how tests point it at moto). Datums go in batches within
``PutMetricData``'s limits, planned by the pure :mod:`~kybdr_agent.telemetry.cloudwatch_batches` (its names
are re-exported here). Each call has a deadline and a bounded number of attempts with jittered backoff
(botocore's own retries are off). A transient failure (transport, timeout, throttling, 5xx, denied
access) is logged and the unsent series go back into the buffer, merged with what arrived since, so they
still fit the cap; a request CloudWatch rejects as malformed (400) is dropped, since resending it would
poison every later flush. On cancellation or ``aclose()`` the buffer is flushed one last time, shielded
and bounded by ``FINAL_FLUSH_TIMEOUT``. Nothing here raises out of ``run`` or ``on_event``.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus

from kybdr_agent.clock import Clock
from kybdr_agent.events import (
    BackupCompleted,
    BackupFailed,
    DrillResult,
    DROperationFinished,
    DRProbed,
    Event,
    FreshnessChecked,
)
from kybdr_agent.telemetry import get_logger
from kybdr_agent.telemetry.cloudwatch_batches import MAX_DATUM_AGE as MAX_DATUM_AGE
from kybdr_agent.telemetry.cloudwatch_batches import MAX_DATUMS_PER_CALL as MAX_DATUMS_PER_CALL
from kybdr_agent.telemetry.cloudwatch_batches import MAX_DIMENSION_VALUE as MAX_DIMENSION_VALUE
from kybdr_agent.telemetry.cloudwatch_batches import MAX_REQUEST_BYTES as MAX_REQUEST_BYTES
from kybdr_agent.telemetry.cloudwatch_batches import MAX_VALUE as MAX_VALUE
from kybdr_agent.telemetry.cloudwatch_batches import MIN_VALUE as MIN_VALUE
from kybdr_agent.telemetry.cloudwatch_batches import REQUEST_OVERHEAD_BYTES as REQUEST_OVERHEAD_BYTES
from kybdr_agent.telemetry.cloudwatch_batches import Series as Series
from kybdr_agent.telemetry.cloudwatch_batches import SeriesKey as SeriesKey
from kybdr_agent.telemetry.cloudwatch_batches import bounded
from kybdr_agent.telemetry.cloudwatch_batches import datum as datum
from kybdr_agent.telemetry.cloudwatch_batches import encoded_size as encoded_size
from kybdr_agent.telemetry.cloudwatch_batches import plan_batches as plan_batches

log = get_logger("kybdr_agent.telemetry.cloudwatch")

MAX_SERIES: Final = 10_000  # distinct series buffered (a few per database): beyond it, new ones are dropped
# Distinct Database dimension values (each a billed custom metric per metric name); beyond, "_other".
MAX_DATABASES: Final = 256
NO_BACKUP_AGE_SECONDS: Final = 10 * 365 * 86400.0  # BackupAgeSeconds of a database without any good backup
CONNECT_TIMEOUT: Final = 5.0
READ_TIMEOUT: Final = 10.0
ATTEMPTS: Final = 3  # per PutMetricData call, the first included
RETRY_BASE_DELAY: Final = 0.5
RETRY_MAX_DELAY: Final = 4.0
FINAL_FLUSH_TIMEOUT: Final = 15.0
CLOSE_TIMEOUT: Final = 5.0
MAX_ERROR_TEXT: Final = 300  # characters of an error kept for the log and /healthz
DIMENSION_DATABASE: Final = "Database"
DIMENSION_HOST: Final = "Host"

COUNT: Final = "Count"
SECONDS: Final = "Seconds"
BYTES: Final = "Bytes"
NONE: Final = "None"

_THROTTLING: Final = frozenset(
    {"Throttling", "ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded", "LimitExceeded"}
)
_JITTER: Final = random.Random()  # noqa: S311 - backoff jitter needs no cryptographic randomness


@dataclass(frozen=True)
class _Tracked:
    """A covered database as the last housekeeping tick saw it."""

    newest_good_at: datetime | None
    window_seconds: float


class _PutFailed(Exception):
    def __init__(self, message: str, *, keep: bool) -> None:
        super().__init__(message)
        self.keep = keep


def _classify(exc: BaseException) -> tuple[bool, bool, str]:
    """(retry it now?, keep the data for the next flush?, one line for the log)."""
    from botocore.exceptions import ClientError, ParamValidationError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        text = f"{code or status}: {error.get('Message', '') or ''}".rstrip(": ")
        transient = code in _THROTTLING or status >= 500 or status == 429
        # 400 (other than throttling) or 413: the request is malformed and would be refused again, forever.
        return transient, transient or status not in (400, 413), text
    if isinstance(exc, ParamValidationError):
        return False, False, str(exc)
    if isinstance(exc, TimeoutError):
        return True, True, "no answer in time"
    return True, True, f"{type(exc).__name__}: {exc}".rstrip(": ")


class CloudWatchPublisher:
    """An ``EventHub`` subscriber (``on_event``) and the task that sends what it buffered (``run``)."""

    def __init__(
        self,
        *,
        namespace: str,
        region: str,
        clock: Clock,
        interval: float = 60.0,
        host: str | None = None,
        max_series: int = MAX_SERIES,
        max_databases: int = MAX_DATABASES,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        attempts: int = ATTEMPTS,
        retry_delay: float = RETRY_BASE_DELAY,
    ) -> None:
        if interval <= 0 or max_series < 1 or attempts < 1:
            raise ValueError("interval, max_series and attempts must be positive")
        self.namespace = namespace
        self.region = region
        self._clock = clock
        self._interval = interval
        self._host = host[:MAX_DIMENSION_VALUE] if host else None
        self._databases: set[str] = set()
        self._max_databases = max_databases
        self._max_series = max_series
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._call_timeout = connect_timeout + read_timeout + 1.0
        self._attempts = attempts
        self._retry_delay = retry_delay
        self._lock = threading.Lock()  # on_event may be called from a worker thread
        self._buffer: dict[SeriesKey, Series] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._dropped = 0  # since the last flush
        self._dropped_total = 0
        self._published_total = 0
        self._in_flight = 0  # series of the flush under way, not yet sent
        self._flush_lock = anyio.Lock()
        self._exit = AsyncExitStack()
        self._client: Any = None
        self._closed = False
        self._last_flush_at: datetime | None = None
        self._last_attempt_at: datetime | None = None
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._last_ok = True

    # --- the subscriber -------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Fold ``event`` into the buffer: no I/O, no waiting, never raises."""
        try:
            self._on_event(event)
        except Exception as exc:  # noqa: BLE001 - an observer never fails the job it observes
            log.warning("cloudwatch.event_not_recorded", event_type=type(event).__name__, error=str(exc))

    def _on_event(self, event: Event) -> None:
        match event:
            case BackupFailed(database=database):
                self._record("BackupFailures", 1.0, COUNT, database)
            case BackupCompleted(database=database):
                self._record("BackupSucceeded", 1.0, COUNT, database)
                self._record("BackupDurationSeconds", event.seconds, SECONDS, database)
                self._record("BackupStoredBytes", float(event.stored_bytes), BYTES, database)
                with self._lock:
                    tracked = self._tracked.get(database)
                    if tracked is not None and (
                        tracked.newest_good_at is None or tracked.newest_good_at < event.finished_at
                    ):
                        self._tracked[database] = _Tracked(event.finished_at, tracked.window_seconds)
            case FreshnessChecked(databases=databases):
                fresh = {f.database: _Tracked(f.newest_good_at, f.window_seconds) for f in databases}
                if len(fresh) > self._max_series:
                    log.warning("cloudwatch.too_many_databases", databases=len(fresh), kept=self._max_series)
                    fresh = dict(sorted(fresh.items())[: self._max_series])
                with self._lock:
                    self._tracked = fresh
            case DrillResult(database=database, seconds=seconds) if seconds is not None:
                self._record("RestoreDrillSeconds", float(seconds), SECONDS, database)
            case DRProbed(primary_healthy=healthy):
                self._record("DRPrimaryHealthy", 1.0 if healthy else 0.0, NONE, None)
            case DROperationFinished(record=record):
                if record.get("operation") == "failover" and record.get("outcome") == "succeeded":
                    self._record("DRFailovers", 1.0, COUNT, None)
            case _:
                pass

    def _key(self, name: str, unit: str, database: str | None) -> SeriesKey:
        dimensions: list[tuple[str, str]] = []
        if database is not None:
            value = database[:MAX_DIMENSION_VALUE] or "-"
            if value not in self._databases:
                if len(self._databases) >= self._max_databases:
                    value = "_other"  # a request naming endless databases must not mint endless metrics
                else:
                    self._databases.add(value)
            dimensions.append((DIMENSION_DATABASE, value))
        if self._host:
            dimensions.append((DIMENSION_HOST, self._host))
        return name, tuple(dimensions), unit

    def _record(self, name: str, value: float, unit: str, database: str | None, at: datetime | None = None) -> None:
        if not math.isfinite(value):
            log.warning("cloudwatch.value_not_finite", metric=name, database=database)
            return
        self._merge({self._key(name, unit, database): Series.of(bounded(value), at or self._clock())})

    def _merge(self, series: Mapping[SeriesKey, Series]) -> None:
        """Fold ``series`` into the buffer; a series new to a full buffer is dropped and counted."""
        first_drop = None
        with self._lock:
            for key, one in series.items():
                held = self._buffer.get(key)
                if held is not None:
                    held.add(one)
                elif len(self._buffer) < self._max_series:
                    self._buffer[key] = Series(one.count, one.total, one.minimum, one.maximum, one.last_at)
                else:
                    if not self._dropped:
                        first_drop = key[0]
                    self._dropped += 1
                    self._dropped_total += 1
        if first_drop is not None:  # once per flush window; the flush logs how many
            log.warning("cloudwatch.buffer_full", max_series=self._max_series, metric=first_drop)

    # --- the task ---------------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Flush every ``interval`` until cancelled, then flush once more (shielded, bounded) and close."""
        if self._closed:  # run again after a stop (a supervisor's restart): a new client
            self._closed, self._exit = False, AsyncExitStack()
        try:
            await self._open()
            task_status.started()
            while True:
                await anyio.sleep(self._interval)
                await self.flush_now()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """The last flush (shielded from cancellation, at most ``FINAL_FLUSH_TIMEOUT``), then the client closes."""
        if self._closed:
            return
        try:
            with anyio.move_on_after(FINAL_FLUSH_TIMEOUT, shield=True):
                await self.flush_now()
        finally:
            self._closed = True
            self._client = None
            with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self._exit.aclose()

    async def flush_now(self) -> bool:
        """Send everything buffered, and every tracked database's age. True when all of it was sent.

        What a transient failure (or a cancellation) leaves unsent goes back into the buffer."""
        async with self._flush_lock:
            now = self._clock()
            self._last_attempt_at = now
            self._add_ages(now)
            with self._lock:
                pending, self._buffer = self._buffer, {}
                dropped, self._dropped = self._dropped, 0
            if dropped:
                log.warning("cloudwatch.series_dropped", dropped=dropped, max_series=self._max_series)
            too_old = [key for key, series in pending.items() if series.last_at < now - MAX_DATUM_AGE]
            for key in too_old:
                del pending[key]
            if too_old:
                log.warning("cloudwatch.too_old_dropped", series=len(too_old))
            keys = list(pending)
            batches = plan_batches(keys)
            done = 0  # keys[:done] are sent or rejected for good
            ok = True
            try:
                for batch in batches:
                    self._in_flight = len(keys) - done
                    try:
                        await self._put([datum(key, pending[key]) for key in batch])
                        self._published_total += len(batch)
                    except _PutFailed as exc:
                        ok = False
                        self._last_error, self._last_error_at = str(exc), now
                        if exc.keep:
                            log.warning("cloudwatch.put_failed", error=str(exc), kept=len(keys) - done)
                            break
                        log.error("cloudwatch.put_rejected", error=str(exc), dropped=len(batch))  # noqa: TRY400
                    done += len(batch)
            finally:
                self._in_flight = 0
                if done < len(keys):
                    self._merge({key: pending[key] for key in keys[done:]})
            self._last_ok = ok
            if ok:
                self._last_flush_at = now
            return ok

    def _add_ages(self, now: datetime) -> None:
        with self._lock:
            tracked = dict(self._tracked)
        for database, seen in tracked.items():
            if seen.newest_good_at is None:
                age = NO_BACKUP_AGE_SECONDS
            else:
                age = max(0.0, (now - seen.newest_good_at).total_seconds())
            self._record("BackupAgeSeconds", age, SECONDS, database, at=now)

    async def _open(self) -> Any:
        """The client, created on first use; None (logged) when it cannot be created."""
        if self._client is not None or self._closed:
            return self._client
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            retries={"total_max_attempts": 1},  # ours are the only retries
        )
        try:
            with anyio.fail_after(self._call_timeout):
                self._client = await self._exit.enter_async_context(
                    get_session().create_client("cloudwatch", region_name=self.region, config=config)
                )
        except Exception as exc:  # noqa: BLE001 - no client yet is a logged state; flushes try again
            self._last_error, self._last_error_at = f"cannot create the client: {exc}", self._clock()
            log.warning("cloudwatch.client_failed", region=self.region, error=str(exc))
        return self._client

    async def _put(self, batch: list[dict[str, Any]]) -> None:
        client = await self._open()
        if client is None:
            raise _PutFailed(self._last_error or "closed", keep=True)
        for attempt in range(1, self._attempts + 1):
            try:
                with anyio.fail_after(self._call_timeout):
                    await client.put_metric_data(Namespace=self.namespace, MetricData=batch)
            except Exception as exc:
                retry, keep, text = _classify(exc)
                text = text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"
                if not retry or attempt == self._attempts:
                    raise _PutFailed(f"PutMetricData: {text}", keep=keep) from exc
                delay = min(RETRY_MAX_DELAY, self._retry_delay * 2.0 ** (attempt - 1))
                log.info("cloudwatch.put_retry", attempt=attempt, error=text)
                await anyio.sleep(delay / 2 + _JITTER.uniform(0, delay / 2))
            else:
                return

    # --- /healthz ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For ``/healthz``: when metrics last all went out, the last error, what is waiting."""
        now = self._clock()
        with self._lock:
            buffered, tracked, dropped = len(self._buffer), list(self._tracked.values()), self._dropped_total
        buffered += self._in_flight
        stale = sum(
            1
            for t in tracked
            if t.newest_good_at is None or (now - t.newest_good_at).total_seconds() > t.window_seconds
        )
        return {
            "namespace": self.namespace,
            "region": self.region,
            "interval_seconds": self._interval,
            "last_flush_at": self._last_flush_at.isoformat() if self._last_flush_at else None,
            "last_attempt_at": self._last_attempt_at.isoformat() if self._last_attempt_at else None,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at.isoformat() if self._last_error_at else None,
            "ok": self._last_ok,
            "series_buffered": buffered,
            "series_dropped": dropped,
            "databases_tracked": len(tracked),
            "databases_stale": stale,  # by the policy windows the last housekeeping tick reported
            "datapoints_published": self._published_total,
        }
