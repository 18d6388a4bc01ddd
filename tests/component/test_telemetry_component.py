"""Telemetry in process, wired as the daemon wires it: spans per job and stage from a real backup,
validation and drill (OpenTelemetry's in-memory exporter); the freshness report housekeeping publishes,
stale and fresh with the injected clock; and the Prometheus metrics those events and a DR probe round
produce, parsed with prometheus-client's own parser, including the rebuild from the journal."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from kybdr_agent.backup import verbs
from kybdr_agent.backup.service import BackupOverrides
from kybdr_agent.config import AgentSettings
from kybdr_agent.events import BackupFailed, DROperationFinished, DRProbed, FreshnessChecked
from kybdr_agent.jobs import JobStatus
from kybdr_agent.telemetry.metrics import AgentMetrics
from tests.component.harness import IDLE_GRACE, ManualClock, Recorder, running_agent


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans of this process, in memory. OpenTelemetry takes one provider per process: the one set here
    (or already set by an earlier module of this worker) gets the exporter."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.clear()


def samples(metrics: AgentMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


@pytest.mark.anyio
async def test_a_job_span_with_a_child_per_stage_and_no_secrets(
    settings: AgentSettings, clock: ManualClock, database: str, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    async with running_agent(settings, clock) as agent:
        [job] = verbs.submit_backups(agent.jobs, agent.service, [database], BackupOverrides(), params={}, bounded=True)
        assert await agent.jobs.wait_idle(IDLE_GRACE)
        assert job.status is JobStatus.SUCCEEDED, job.error
        validate = verbs.submit_validate(agent.jobs, agent.service, job.result["id"], "full")
        drill = verbs.submit_drill(agent.jobs, agent.service, database, params={}, bounded=True)
        assert await agent.jobs.wait_idle(IDLE_GRACE)
        assert validate.status is JobStatus.SUCCEEDED, validate.error
        assert drill.status is JobStatus.SUCCEEDED, drill.error

    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in finished:
        by_name.setdefault(span.name, []).append(span)
    assert {
        "job backup",
        "dump",
        "encode",
        "upload",
        "manifest",
        "job validate",
        "validate",
        "job test",
        "drill",
    } <= set(by_name), sorted(by_name)
    [backup_span] = by_name["job backup"]
    assert backup_span.attributes is not None
    assert backup_span.attributes["kybdr.job_id"] == job.id
    assert backup_span.attributes["kybdr.database"] == database
    assert backup_span.context is not None
    for stage in ("dump", "encode", "upload", "manifest"):
        [child] = by_name[stage]
        assert child.parent is not None
        assert child.parent.span_id == backup_span.context.span_id, stage
        assert child.context is not None
        assert child.context.trace_id == backup_span.context.trace_id
    [encode] = by_name["encode"]
    assert encode.attributes is not None
    assert int(encode.attributes["kybdr.dump_bytes"]) > 0  # type: ignore[arg-type]
    dsn = settings.database.dsn or ""
    for span in finished:
        for key, value in (span.attributes or {}).items():
            assert "password" not in key.lower()
            assert dsn not in str(value) or not dsn


@pytest.mark.anyio
async def test_housekeeping_reports_freshness_stale_then_fresh_then_stale_again(
    settings: AgentSettings, clock: ManualClock, database: str
) -> None:
    recorder = Recorder()
    metrics = AgentMetrics()
    async with running_agent(settings, clock, [("recorder", recorder), ("metrics", metrics.on_event)]) as agent:
        await agent.service.observe()
        [before] = recorder.of(FreshnessChecked)
        [state] = before.databases
        assert state.database == database
        assert state.stale
        assert state.newest_good_at is None
        assert state.window_seconds == timedelta(hours=25).total_seconds()  # daily schedule + 1 h grace

        [job] = verbs.submit_backups(agent.jobs, agent.service, [database], BackupOverrides(), params={}, bounded=True)
        assert await agent.jobs.wait_idle(IDLE_GRACE)
        assert job.status is JobStatus.SUCCEEDED, job.error
        clock.advance(timedelta(hours=24))
        await agent.service.observe()
        fresh = recorder.of(FreshnessChecked)[-1].databases[0]
        assert not fresh.stale
        assert fresh.newest_backup_id == job.result["id"]
        assert fresh.age_seconds == pytest.approx(timedelta(hours=24).total_seconds(), abs=5)

        clock.advance(timedelta(hours=1, minutes=1))
        await agent.service.observe()
        assert recorder.of(FreshnessChecked)[-1].databases[0].stale

    found = samples(metrics)
    newest = datetime.fromisoformat(job.result["finished_at"]).timestamp()
    assert found[("kybdr_backup_last_success_timestamp_seconds", frozenset({("database", database)}))] == newest


def test_dr_probe_round_and_operations_become_metrics() -> None:
    metrics = AgentMetrics()
    phase = ["steady"]
    metrics.watch_dr(lambda: phase[0])
    metrics.watch_jobs(lambda: {"backup": 2})
    at = datetime(2031, 1, 1, 12, 0, 0, tzinfo=UTC)
    observations = {
        "at": at.isoformat(),
        "health": {"primary": {"latency_s": 0.02, "ok": True}, "dr": {"latency_s": 0.03, "ok": True}},
        "db": {
            "primary": {"latency_s": 0.004, "current_lsn": 5_000_000},
            "dr": {
                "latency_s": 0.005,
                "replay_lsn": 4_000_000,
                "last_receipt": (at - timedelta(seconds=3)).isoformat(),
            },
        },
        "witnesses": [{"latency_s": 0.01}],
        "peer": None,
    }
    metrics.on_event(DRProbed(observations, primary_healthy=False))
    metrics.on_event(DROperationFinished({"kind": "operation", "operation": "failover", "outcome": "succeeded"}))
    metrics.on_event(DROperationFinished({"kind": "operation", "operation": "failover", "outcome": "halted"}))
    phase[0] = "promoting"
    found = samples(metrics)
    assert found[("kybdr_dr_primary_healthy", frozenset())] == 0
    assert found[("kybdr_dr_replication_lag_bytes", frozenset())] == 1_000_000
    assert found[("kybdr_dr_last_wal_receipt_age_seconds", frozenset())] == 3
    assert found[("kybdr_dr_probe_duration_seconds_count", frozenset({("target", "db:dr")}))] == 1
    assert found[("kybdr_dr_probe_duration_seconds_count", frozenset({("target", "witness:0")}))] == 1
    assert found[("kybdr_dr_failovers_total", frozenset({("kind", "failover")}))] == 1  # the halted one is not
    assert found[("kybdr_dr_state", frozenset({("state", "promoting")}))] == 1
    assert found[("kybdr_dr_state", frozenset({("state", "steady")}))] == 0
    assert found[("kybdr_jobs_running", frozenset({("kind", "backup")}))] == 2


def test_last_success_gauges_are_rebuilt_from_the_journal_and_only_move_forward() -> None:
    metrics = AgentMetrics()
    records = [
        {
            "kind": "backup",
            "status": "succeeded",
            "finished_at": "2031-01-01T02:10:00+00:00",
            "result": {"database": "app", "finished_at": "2031-01-01T02:09:00+00:00"},
        },
        {"kind": "backup", "status": "failed", "finished_at": "2031-01-02T02:10:00+00:00", "result": None},
        {
            "kind": "test",
            "status": "failed",
            "finished_at": "2031-01-03T05:00:00+00:00",
            "result": {"drills": [{"database": "app", "passed": True}, {"database": "crm", "passed": False}]},
        },
    ]
    metrics.rebuild_from_journal(records)
    older = FreshnessChecked(datetime(2031, 1, 4, tzinfo=UTC), ())
    metrics.on_event(older)
    found = samples(metrics)
    backup = datetime(2031, 1, 1, 2, 9, tzinfo=UTC).timestamp()
    assert found[("kybdr_backup_last_success_timestamp_seconds", frozenset({("database", "app")}))] == backup
    drill = datetime(2031, 1, 3, 5, 0, tzinfo=UTC).timestamp()
    assert found[("kybdr_restore_drill_last_success_timestamp_seconds", frozenset({("database", "app")}))] == drill
    assert ("kybdr_restore_drill_last_success_timestamp_seconds", frozenset({("database", "crm")})) not in found


def test_no_dr_gauges_without_a_measurement_and_database_labels_are_capped() -> None:
    metrics = AgentMetrics()
    text = metrics.render().decode()
    assert "kybdr_dr_primary_healthy" not in text  # DR off: no 0 that would page "primary unhealthy"
    metrics.watch_dr(lambda: "starting")
    assert "kybdr_dr_replication_lag_bytes" not in metrics.render().decode()  # DR on, nothing probed yet
    at = datetime(2031, 1, 1, tzinfo=UTC)
    for n in range(300):
        metrics.on_event(BackupFailed(f"db{n}", "no such database", 0.1, at))
    databases = {labels.get("database") for name, labels in (_labels(s) for s in samples(metrics))}
    assert len(databases - {None}) == 257  # 256 names, then "_other"
    assert "_other" in databases


def _labels(key: tuple[str, frozenset[tuple[str, str]]]) -> tuple[str, dict[str, str]]:
    return key[0], dict(key[1])
