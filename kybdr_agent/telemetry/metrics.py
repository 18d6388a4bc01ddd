"""The agent's Prometheus metrics: one registry per agent, fed by the event hub, rendered by ``GET /metrics``.

prometheus-client directly rather than OpenTelemetry's Prometheus reader: the issue fixes the exposed
names (``kybdr_backups_total{database,outcome}`` …) and OpenTelemetry's exporter adds ``otel_scope_*``
labels and unit suffixes of its own. Tracing stays OpenTelemetry's (``telemetry.tracing``).

Everything here is a subscriber or a callback: ``on_event`` folds each finished backup, validation, drill,
retention deletion, control request and DR probe into counters and gauges in microseconds, on the event
loop, never doing I/O. What the agent is doing right now (jobs running per kind, the DR phase) is read at
scrape time from callbacks, so it cannot drift from the truth. After a restart the "last success" gauges
are rebuilt: from the journal (``rebuild_from_journal``, backups and drills) at start, and from the
repository at the first housekeeping tick (``FreshnessChecked``), never left at zero.

Label values are bounded: routes and DR targets come from the configuration, and database names — which
a request may name (a backup of a database nobody configured fails, and is counted) — are capped at
``MAX_DATABASES`` distinct values, beyond which they are counted as ``_other``. The DR gauges exist only
on an agent with DR on, and only once a probe round has measured them: a 0 that nobody measured would
page ("primary unhealthy") or reassure ("no lag") falsely.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, Final, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from kybdr_agent.alerts import replication_lag
from kybdr_agent.dr.machine_types import Phase
from kybdr_agent.events import (
    BackupCompleted,
    BackupFailed,
    ControlRequestHandled,
    DrillResult,
    DROperationFinished,
    DRProbed,
    Event,
    FreshnessChecked,
    RetentionDeleted,
    ValidationVerdict,
)

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
MAX_DATABASES: Final = 256
OTHER_DATABASE: Final = "_other"
# Backups take seconds to hours; drills and restores alike.
DURATION_BUCKETS: Final = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
PROBE_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# The DR machine's phases, and the primary-side agent's two ("peer", "fenced": ``DRComponent.phase``).
DR_PHASES: Final = (*get_args(Phase), "peer", "fenced")

DR_GAUGES: Final = {
    "kybdr_dr_primary_healthy": "1 while the primary passes its probes, 0 while it fails them",
    "kybdr_dr_replication_lag_bytes": "The writer's WAL position minus the standby's replay position",
    "kybdr_dr_last_wal_receipt_age_seconds": "Seconds since the standby last heard from the writer",
}

WAL_GAUGES: Final = {
    "kybdr_wal_spool_bytes": "Unarchived WAL in the agent's spool (bytes)",
    "kybdr_wal_last_shipped_timestamp": "When the last complete WAL file was archived (Unix time)",
    "kybdr_wal_slot_retained_bytes": "WAL the agent's replication slot holds on the server (stream mode)",
}
WAL_COUNTERS: Final = {"kybdr_wal_files_shipped": "Complete WAL files archived since the agent started"}

# Prometheus' *_created series double every counter's output for a value no alert uses.
disable_created_metrics()  # type: ignore[no-untyped-call]


def _ts(value: datetime | str | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    return value.timestamp()


class _Live(Collector):
    """Gauges read at scrape time: jobs running per kind, and the DR phase (one series per phase, 1 for the
    current one), from callbacks the composition root hands over."""

    def __init__(self) -> None:
        self.jobs: Callable[[], Mapping[str, int]] | None = None
        self.dr_phase: Callable[[], str] | None = None
        self.dr_values: dict[str, float] = {}  # the last probe round's measurements, by metric name
        self.wal: Callable[[], Mapping[str, float]] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.jobs is not None:
            running = GaugeMetricFamily("kybdr_jobs_running", "Jobs running now, per kind", labels=["kind"])
            for kind, count in sorted(self.jobs().items()):
                running.add_metric([kind], count)
            yield running
        if self.dr_phase is not None:
            current = self.dr_phase()
            state = GaugeMetricFamily(
                "kybdr_dr_state", "The DR state machine's phase (1 for the current one)", labels=["state"]
            )
            for phase in (*DR_PHASES, *(() if current in DR_PHASES else (current,))):
                state.add_metric([phase], 1.0 if phase == current else 0.0)
            yield state
            for name, help_text in DR_GAUGES.items():
                if name in self.dr_values:
                    yield GaugeMetricFamily(name, help_text, value=self.dr_values[name])
        if self.wal is not None:
            # Only what was measured: no slot gauge in archive_command mode, no "last shipped" before the first.
            values = self.wal()
            for name, help_text in WAL_GAUGES.items():
                if name in values:
                    yield GaugeMetricFamily(name, help_text, value=values[name])
            for name, help_text in WAL_COUNTERS.items():
                if name in values:
                    yield CounterMetricFamily(name, help_text, value=values[name])


class AgentMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.backups = Counter("kybdr_backups", "Backup jobs by outcome", ["database", "outcome"], registry=r)
        self.backup_duration = Histogram(
            "kybdr_backup_duration_seconds",
            "Wall time of each backup",
            ["database"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.dump_bytes = Gauge("kybdr_backup_dump_bytes", "Dump size of the last backup", ["database"], registry=r)
        self.stored_bytes = Gauge(
            "kybdr_backup_stored_bytes",
            "Stored (compressed, encrypted) size of the last backup",
            ["database"],
            registry=r,
        )
        self.last_success = Gauge(
            "kybdr_backup_last_success_timestamp_seconds",
            "When the newest good backup finished (Unix time)",
            ["database"],
            registry=r,
        )
        self.throughput = Gauge(
            "kybdr_backup_throughput_bytes_per_second",
            "Dump bytes per second of the last backup",
            ["database"],
            registry=r,
        )
        self.validations = Counter(
            "kybdr_validations", "Validations by verdict", ["database", "level", "verdict"], registry=r
        )
        self.drills = Counter("kybdr_restore_drills", "Restore drills by outcome", ["database", "outcome"], registry=r)
        self.drill_duration = Gauge(
            "kybdr_restore_drill_duration_seconds",
            "Time of the last restore drill: the measured recovery time",
            ["database"],
            registry=r,
        )
        self.drill_last_success = Gauge(
            "kybdr_restore_drill_last_success_timestamp_seconds",
            "When the last passing restore drill finished (Unix time)",
            ["database"],
            registry=r,
        )
        self.retention_deleted = Counter(
            "kybdr_retention_deleted", "Backups deleted by retention", ["database"], registry=r
        )
        self.storage_retries = Counter(
            "kybdr_storage_retries", "Repository requests retried", ["operation"], registry=r
        )
        self.control_requests = Counter(
            "kybdr_control_requests", "Control API requests answered", ["route", "status"], registry=r
        )
        self.dr_failovers = Counter(
            "kybdr_dr_failovers", "Completed failovers and failbacks, by kind", ["kind"], registry=r
        )
        self.dr_probe_duration = Histogram(
            "kybdr_dr_probe_duration_seconds", "DR probe latency", ["target"], buckets=PROBE_BUCKETS, registry=r
        )
        self._live = _Live()
        r.register(self._live)
        self._highest: dict[tuple[int, str], float] = {}
        self._databases: set[str] = set()

    def _db(self, name: str) -> str:
        """The label for a database: itself, until ``MAX_DATABASES`` distinct names were seen."""
        if name in self._databases:
            return name
        if len(self._databases) >= MAX_DATABASES:
            return OTHER_DATABASE
        self._databases.add(name)
        return name

    # --- wiring ------------------------------------------------------------------------------------

    def watch_jobs(self, running: Callable[[], Mapping[str, int]]) -> None:
        self._live.jobs = running

    def watch_dr(self, phase: Callable[[], str]) -> None:
        self._live.dr_phase = phase

    def watch_wal(self, values: Callable[[], Mapping[str, float]]) -> None:
        """The WAL component's gauges and counters by metric name, read at scrape time (``WAL_GAUGES``)."""
        self._live.wal = values

    def storage_retry(self, operation: str) -> None:
        self.storage_retries.labels(operation).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- events ------------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        if isinstance(event, BackupCompleted):
            db = self._db(event.database)
            self.backups.labels(db, "succeeded").inc()
            self.backup_duration.labels(db).observe(event.seconds)
            self.dump_bytes.labels(db).set(event.dump_bytes)
            self.stored_bytes.labels(db).set(event.stored_bytes)
            self._raise(self.last_success, db, event.finished_at.timestamp())
            if event.seconds > 0:
                self.throughput.labels(db).set(event.dump_bytes / event.seconds)
        elif isinstance(event, BackupFailed):
            db = self._db(event.database)
            self.backups.labels(db, "failed").inc()
            self.backup_duration.labels(db).observe(event.seconds)
        elif isinstance(event, ValidationVerdict):
            verdict = "ok" if event.ok else ("corrupt" if event.corrupt else "inconclusive")
            self.validations.labels(self._db(event.database), event.level, verdict).inc()
        elif isinstance(event, DrillResult):
            db = self._db(event.database)
            self.drills.labels(db, "passed" if event.passed else "failed").inc()
            if event.seconds is not None:
                self.drill_duration.labels(db).set(event.seconds)
            if event.passed:
                self._raise(self.drill_last_success, db, time.time())
        elif isinstance(event, RetentionDeleted):
            self.retention_deleted.labels(self._db(event.database)).inc()
        elif isinstance(event, ControlRequestHandled):
            self.control_requests.labels(event.route, str(event.status)).inc()
        elif isinstance(event, FreshnessChecked):
            for fresh in event.databases:
                if fresh.newest_good_at is not None:
                    self._raise(self.last_success, self._db(fresh.database), fresh.newest_good_at.timestamp())
        elif isinstance(event, DRProbed):
            self._dr_probed(event)
        elif isinstance(event, DROperationFinished):
            record = event.record
            operation = record.get("operation")
            if operation in ("failover", "failback") and record.get("outcome") == "succeeded":
                self.dr_failovers.labels(str(operation)).inc()

    def _raise(self, gauge: Gauge, database: str, value: float) -> None:
        """A last-success gauge only moves forward: the repository's view never undoes a newer backup."""
        key = (id(gauge), database)
        if value > self._highest.get(key, float("-inf")):
            self._highest[key] = value
            gauge.labels(database).set(value)

    def _dr_probed(self, event: DRProbed) -> None:
        obs: Mapping[str, Any] = event.observations
        values = self._live.dr_values
        values["kybdr_dr_primary_healthy"] = 1.0 if event.primary_healthy else 0.0
        for region, probe in (obs.get("health") or {}).items():
            self._latency(f"health:{region}", probe)
        dbs = obs.get("db") or {}
        for region, probe in dbs.items():
            self._latency(f"db:{region}", probe)
        for index, probe in enumerate(obs.get("witnesses") or ()):
            self._latency(f"witness:{index}", probe)
        # Whichever way replication runs now (primary → dr, or the reverse after a failover).
        lag = replication_lag(obs)
        if lag is None:
            values.pop("kybdr_dr_replication_lag_bytes", None)
            values.pop("kybdr_dr_last_wal_receipt_age_seconds", None)
            return
        values["kybdr_dr_replication_lag_bytes"] = float(lag[0])
        standby = dbs.get(lag[1]) or {}
        receipt, at = _ts(standby.get("last_receipt")), _ts(obs.get("at"))
        if receipt is not None and at is not None:
            values["kybdr_dr_last_wal_receipt_age_seconds"] = max(0.0, at - receipt)
        else:
            values.pop("kybdr_dr_last_wal_receipt_age_seconds", None)

    def _latency(self, target: str, probe: Mapping[str, Any]) -> None:
        latency = probe.get("latency_s") if isinstance(probe, Mapping) else None
        if isinstance(latency, int | float):
            self.dr_probe_duration.labels(target).observe(latency)

    # --- after a restart -----------------------------------------------------------------------------

    def rebuild_from_journal(self, records: Iterable[Mapping[str, Any]]) -> None:
        """The last-success gauges from the journal's finished jobs (run off the loop: it reads a file)."""
        for record in records:
            if record.get("status") not in ("succeeded", "failed"):
                continue
            finished = _ts(record.get("finished_at"))
            result = record.get("result")
            if record.get("kind") == "backup" and record.get("status") == "succeeded" and isinstance(result, dict):
                database, done = result.get("database"), _ts(result.get("finished_at")) or finished
                if isinstance(database, str) and done is not None:
                    self._raise(self.last_success, self._db(database), done)
            elif record.get("kind") == "test" and finished is not None and isinstance(result, dict):
                drills = result.get("drills")
                for entry in drills if isinstance(drills, list) else ():
                    if isinstance(entry, dict) and entry.get("passed") and isinstance(entry.get("database"), str):
                        self._raise(self.drill_last_success, self._db(entry["database"]), finished)
