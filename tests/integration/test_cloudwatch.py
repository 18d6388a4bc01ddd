"""CloudWatch publishing (kybdr_agent/telemetry/cloudwatch.py) against moto_server over HTTP.

The contract checked first is terraform's: the alarm expressions of terraform/modules/agent_alarms and the
dashboard expressions of terraform/cloudwatch.tf are read from the files (python-hcl2, then a strict
pattern over each Metrics Insights query, and every ``SELECT`` of those files must be one of them), and
after the publisher has seen one of every event that feeds a metric, moto must list exactly the metrics
those queries read, with a ``Database`` dimension wherever a dashboard groups by it. Then what keeps the
backup-age alarm honest (the age re-published on every flush, from the clock), and what keeps the agent
safe from CloudWatch (a dead or stalling endpoint is logged and retried later, never raised; the buffer
stays within its cap; requests stay within PutMetricData's limits; a last flush on shutdown).

The module runs its own moto server, so no other test file sharing the session's server can add metrics to
the namespace terraform reads.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import boto3
import botocore.session
import hcl2
import pytest
from botocore.serialize import create_serializer
from hcl2.utils import SerializationOptions
from structlog.testing import capture_logs

from kybdr_agent.events import (
    BackupCompleted,
    BackupFailed,
    DrillResult,
    DROperationFinished,
    DRProbed,
    Freshness,
    FreshnessChecked,
    ValidationVerdict,
)
from kybdr_agent.postgres.cluster import free_port
from kybdr_agent.telemetry.cloudwatch import (
    MAX_DATUMS_PER_CALL,
    MAX_REQUEST_BYTES,
    NO_BACKUP_AGE_SECONDS,
    REQUEST_OVERHEAD_BYTES,
    CloudWatchPublisher,
    Series,
    SeriesKey,
    datum,
    plan_batches,
)
from tests.faultproxy import FaultProxy, fault
from tests.support import MotoServer, SteppedClock, start_moto_server

REPO = Path(__file__).resolve().parents[2]
TF = REPO / "terraform"
ALARMS = TF / "modules" / "agent_alarms" / "main.tf"
DASHBOARDS = TF / "cloudwatch.tf"
REGION = "us-east-1"
_OPTIONS = SerializationOptions(strip_string_quotes=True, with_comments=False, explicit_blocks=False)
# A Metrics Insights query over the agent's namespace, as terraform writes them; nothing looser is accepted.
QUERY = re.compile(r"SELECT (SUM|MAX|MIN|AVG|COUNT)\((\w+)\) FROM \$\{local\.(namespace|ns)\}(?: GROUP BY (\w+))?")
NAMESPACE_LOCAL = '"${var.metrics_namespace}"'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def cw_moto() -> Iterator[MotoServer]:
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch, cw_moto: MotoServer) -> Callable[[str], None]:
    """Point botocore's standard CloudWatch endpoint variable somewhere (moto by default)."""

    def point(url: str) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL_CLOUDWATCH", url)

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    point(cw_moto.endpoint)
    return point


def recent_minute() -> datetime:
    """Half an hour ago, on a whole minute: CloudWatch takes datapoints up to two weeks old."""
    return datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)


def cloudwatch(moto: MotoServer) -> Any:
    return boto3.client(
        "cloudwatch",
        endpoint_url=moto.endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def listed(moto: MotoServer, namespace: str) -> list[dict[str, Any]]:
    pages = cloudwatch(moto).get_paginator("list_metrics").paginate(Namespace=namespace)
    return [metric for page in pages for metric in page["Metrics"]]


def datapoints(
    moto: MotoServer, namespace: str, name: str, clock: SteppedClock, dimensions: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    answer = cloudwatch(moto).get_metric_statistics(
        Namespace=namespace,
        MetricName=name,
        Dimensions=[{"Name": k, "Value": v} for k, v in (dimensions or {}).items()],
        StartTime=clock.now - timedelta(hours=2),
        EndTime=clock.now + timedelta(hours=2),
        Period=60,
        Statistics=["SampleCount", "Sum", "Minimum", "Maximum"],
    )
    return sorted(answer["Datapoints"], key=lambda p: p["Timestamp"])


def publisher(namespace: str, clock: SteppedClock, **options: Any) -> CloudWatchPublisher:
    return CloudWatchPublisher(namespace=namespace, region=REGION, clock=clock, **options)


def fresh_namespace() -> str:
    return f"KybdrTest/{secrets.token_hex(4)}"


# --------------------------------------------------------------------------------------------------
# What terraform reads
# --------------------------------------------------------------------------------------------------


def parse(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        parsed: dict[str, Any] = hcl2.load(f, serialization_options=_OPTIONS)
    return parsed


def _locals(doc: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for block in doc.get("locals", []):
        found.update(block)
    return found


def terraform_queries() -> list[tuple[str, str, str | None]]:
    """(where, metric, GROUP BY dimension) of every Metrics Insights query of the alarms and dashboards."""
    queries: list[tuple[str, str]] = []
    alarms = parse(ALARMS)
    assert _locals(alarms)["namespace"] == NAMESPACE_LOCAL
    for block in alarms["resource"]:
        for name, body in block.get("aws_cloudwatch_metric_alarm", {}).items():
            queries += [(f"alarm {name}", q["expression"]) for q in body["metric_query"] if "expression" in q]
    dashboards = _locals(parse(DASHBOARDS))
    assert dashboards["ns"] == NAMESPACE_LOCAL
    for name in ("backup_dashboard", "dr_dashboard", "performance_dashboard"):
        # python-hcl2 keeps a concat(...) of widgets as one expression string: the queries are inside it.
        text = str(dashboards[name])
        queries += [(name, q) for q in re.findall(r'expression = "(SELECT [^"]*)"', text)]
    code = [
        line
        for path in (ALARMS, DASHBOARDS)
        for line in path.read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith("#")
    ]
    assert sum(line.count("SELECT ") for line in code) == len(queries), "a SELECT in terraform/ escaped the parser"
    parsed: list[tuple[str, str, str | None]] = []
    for where, query in queries:
        match = QUERY.fullmatch(query)
        assert match, f"{where}: {query!r} is not a query this test understands"
        parsed.append((where, match.group(2), match.group(4)))
    return parsed


def terraform_namespace() -> str:
    for block in parse(TF / "variables.tf")["variable"]:
        if "metrics_namespace" in block:
            namespace: str = block["metrics_namespace"]["default"]
            return namespace
    raise AssertionError("variable metrics_namespace not found")


T_GOOD = timedelta(hours=1)


def one_of_everything(clock: SteppedClock) -> list[Any]:
    """A succeeded and a failed backup, a housekeeping tick (one database fresh, one never backed up), a
    drill, a round of DR probes each way, a completed failover — and events that must not count."""
    now = clock()
    return [
        BackupCompleted("app", "app-1", now, 12.5, 4096, 1024),
        BackupFailed("billing", "pg_dump failed", 3.0, now),
        FreshnessChecked(
            now,
            (
                Freshness("app", now - T_GOOD, "app-1", T_GOOD.total_seconds(), 86400.0, False),
                Freshness("never", None, None, None, 86400.0, True),
            ),
        ),
        DrillResult("app", "app-1", True, 42.0),
        DrillResult("billing", None, False, None, "no backup"),  # not measured: no RestoreDrillSeconds
        ValidationVerdict("app-1", "app", "full", True, False),  # feeds no CloudWatch metric
        DRProbed({"db": {}}, primary_healthy=True),
        DRProbed({"db": {}}, primary_healthy=False),
        DROperationFinished({"kind": "operation", "operation": "failover", "trigger": "auto", "outcome": "succeeded"}),
        DROperationFinished({"kind": "operation", "operation": "failover", "trigger": "manual", "outcome": "failed"}),
        DROperationFinished({"kind": "operation", "operation": "test-failover", "outcome": "passed"}),
        DROperationFinished({"kind": "operation", "operation": "failback", "outcome": "succeeded"}),
    ]


@pytest.mark.anyio
async def test_every_metric_terraform_queries_is_published(cw_moto: MotoServer, endpoint: Any) -> None:
    queries = terraform_queries()
    assert {metric for _, metric, _ in queries} >= {"BackupAgeSeconds", "BackupFailures", "DRPrimaryHealthy"}
    namespace = terraform_namespace()
    assert namespace == "KybdrAgent"
    clock = SteppedClock(recent_minute())
    cw = publisher(namespace, clock)
    for event in one_of_everything(clock):
        cw.on_event(event)
    assert await cw.flush_now()
    published_datapoints = cw.status()["datapoints_published"]
    await cw.aclose()

    metrics = listed(cw_moto, namespace)
    published = {m["MetricName"] for m in metrics}
    queried = {metric for _, metric, _ in queries}
    # Exactly what terraform reads: nothing it queries is missing, nothing is sent that nobody reads.
    assert published == queried, (sorted(queried - published), sorted(published - queried))
    for where, metric, group_by in queries:
        if group_by:
            dims = [{d["Name"] for d in m["Dimensions"]} for m in metrics if m["MetricName"] == metric]
            assert any(group_by in d for d in dims), f"{where} groups {metric} by {group_by}: {dims}"

    def stats(name: str, **dimensions: str) -> dict[str, Any]:
        (point,) = datapoints(cw_moto, namespace, name, clock, dimensions)
        return point

    assert stats("BackupSucceeded", Database="app")["Sum"] == 1
    assert stats("BackupFailures", Database="billing")["Sum"] == 1
    assert stats("BackupDurationSeconds", Database="app")["Maximum"] == 12.5
    assert stats("BackupStoredBytes", Database="app")["Maximum"] == 1024
    assert stats("RestoreDrillSeconds", Database="app")["Maximum"] == 42.0
    assert stats("BackupAgeSeconds", Database="app")["Maximum"] == T_GOOD.total_seconds()
    assert stats("BackupAgeSeconds", Database="never")["Maximum"] == NO_BACKUP_AGE_SECONDS
    healthy = stats("DRPrimaryHealthy")
    assert (healthy["Minimum"], healthy["Maximum"], healthy["SampleCount"]) == (0, 1, 2)
    assert stats("DRFailovers")["Sum"] == 1  # the failed failover, the drill and the failback do not count
    assert not [m for m in metrics if m["MetricName"] == "RestoreDrillSeconds" and m["Dimensions"][0]["Value"] != "app"]
    assert published_datapoints == len(metrics)


# --------------------------------------------------------------------------------------------------
# The backup age, on every flush
# --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_backup_age_is_republished_on_every_flush_from_the_clock(cw_moto: MotoServer, endpoint: Any) -> None:
    namespace = fresh_namespace()
    clock = SteppedClock(recent_minute())
    cw = publisher(namespace, clock, host="db-1")
    start = clock()
    cw.on_event(
        FreshnessChecked(
            start,
            (
                Freshness("app", start - T_GOOD, "app-1", T_GOOD.total_seconds(), 7200.0, False),
                Freshness("never", None, None, None, 7200.0, True),
            ),
        )
    )
    assert cw.status()["databases_stale"] == 1
    assert await cw.flush_now()
    clock.advance(180)  # no housekeeping tick in between
    assert await cw.flush_now()
    app = {"Database": "app", "Host": "db-1"}
    assert [p["Maximum"] for p in datapoints(cw_moto, namespace, "BackupAgeSeconds", clock, app)] == [3600, 3780]
    never = {"Database": "never", "Host": "db-1"}
    assert [p["Maximum"] for p in datapoints(cw_moto, namespace, "BackupAgeSeconds", clock, never)] == [
        NO_BACKUP_AGE_SECONDS
    ] * 2

    # A new backup of a tracked database moves its age back at once, before the next tick.
    clock.advance(60)
    cw.on_event(BackupCompleted("app", "app-2", clock(), 5.0, 10, 10))
    clock.advance(60)
    assert await cw.flush_now()
    assert [p["Maximum"] for p in datapoints(cw_moto, namespace, "BackupAgeSeconds", clock, app)][-1] == 60

    # A tick that no longer covers "never" stops its series; "app" goes on.
    cw.on_event(FreshnessChecked(clock(), (Freshness("app", clock(), "app-3", 0.0, 7200.0, False),)))
    clock.advance(120)
    assert await cw.flush_now()
    assert len(datapoints(cw_moto, namespace, "BackupAgeSeconds", clock, never)) == 3  # three flushes before
    assert [p["Maximum"] for p in datapoints(cw_moto, namespace, "BackupAgeSeconds", clock, app)][-1] == 120
    assert cw.status()["databases_tracked"] == 1
    await cw.aclose()


# --------------------------------------------------------------------------------------------------
# A failing CloudWatch never fails the agent
# --------------------------------------------------------------------------------------------------


async def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)
    assert condition(), what


@pytest.mark.anyio
async def test_a_dead_endpoint_is_logged_and_its_data_sent_once_it_recovers(
    cw_moto: MotoServer, endpoint: Callable[[str], None]
) -> None:
    namespace = fresh_namespace()
    clock = SteppedClock(recent_minute())
    with FaultProxy(cw_moto.endpoint) as proxy:
        endpoint(proxy.endpoint)
        reset = proxy.add(fault("*", "reset_request", every=1))
        cw = publisher(
            namespace, clock, interval=0.05, attempts=2, retry_delay=0.01, connect_timeout=0.5, read_timeout=0.3
        )
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                await tg.start(cw.run)
                cw.on_event(BackupFailed("app", "boom", 1.0, clock()))
                await _until(lambda: cw.status()["last_error"] is not None, "a failed flush")
                status = cw.status()
                assert not status["ok"]
                assert status["series_buffered"] == 1  # kept for the next flush
                assert "PutMetricData" in status["last_error"]

                # A stalled answer is cut by the read timeout, and the data is still kept.
                proxy.remove(reset)
                stall = proxy.add(fault("*", "stall", every=1))
                stalled = proxy.injected[stall.name]
                await _until(lambda: proxy.injected[stall.name] >= stalled + 2, "two stalled calls")
                assert cw.status()["series_buffered"] >= 1

                proxy.remove(stall)
                await _until(lambda: cw.status()["ok"] and cw.status()["datapoints_published"] >= 1, "recovery")
                tg.cancel_scope.cancel()
        assert proxy.injected[reset.name] >= 2
    failures = [line for line in logs if line["event"] == "cloudwatch.put_failed"]
    assert failures
    assert all(line["log_level"] == "warning" for line in failures)
    (point,) = datapoints(cw_moto, namespace, "BackupFailures", clock, {"Database": "app"})
    assert point["Sum"] == 1  # sent once, after the failures, not lost and not doubled


@pytest.mark.anyio
async def test_a_refused_request_is_dropped_and_a_server_error_kept(
    cw_moto: MotoServer, endpoint: Callable[[str], None]
) -> None:
    """A 400 would be refused again forever (it would block every later flush): dropped. A 5xx is kept."""
    namespace = fresh_namespace()
    clock = SteppedClock(recent_minute())
    with FaultProxy(cw_moto.endpoint) as proxy:
        endpoint(proxy.endpoint)
        cw = publisher(namespace, clock, attempts=2, retry_delay=0.01)
        with capture_logs() as logs:
            refused = proxy.add(fault("*", "error", every=1, status=400, code="InvalidParameterValue"))
            cw.on_event(BackupFailed("refused", "boom", 1.0, clock()))
            assert not await cw.flush_now()
            assert proxy.injected[refused.name] == 1  # not retried
            assert cw.status()["series_buffered"] == 0
            proxy.remove(refused)

            unavailable = proxy.add(fault("*", "error", every=1, status=503, code="ServiceUnavailable"))
            cw.on_event(BackupFailed("kept", "boom", 1.0, clock()))
            assert not await cw.flush_now()
            assert proxy.injected[unavailable.name] == 2  # retried, within its bound
            assert cw.status()["series_buffered"] == 1
            proxy.remove(unavailable)
            assert await cw.flush_now()
            await cw.aclose()
    assert [line["event"] for line in logs if line["log_level"] in ("warning", "error")] == [
        "cloudwatch.put_rejected",
        "cloudwatch.put_failed",
    ]
    assert {m["Dimensions"][0]["Value"] for m in listed(cw_moto, namespace)} == {"kept"}


@pytest.mark.anyio
async def test_a_closed_port_never_raises_out_of_run_or_aclose(endpoint: Callable[[str], None]) -> None:
    endpoint(f"http://127.0.0.1:{free_port()}")
    clock = SteppedClock(recent_minute())
    cw = publisher(fresh_namespace(), clock, interval=0.05, attempts=2, retry_delay=0.01)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(cw.run)
            cw.on_event(BackupFailed("app", "boom", 1.0, clock()))
            await _until(lambda: cw.status()["last_error"] is not None, "a failed flush")
            tg.cancel_scope.cancel()
        assert not await cw.flush_now()  # after the final flush too, a failure is an answer, not a raise
    assert any(line["event"] == "cloudwatch.put_failed" for line in logs)
    assert cw.status()["series_buffered"] == 1


@pytest.mark.anyio
async def test_the_buffer_holds_its_cap_through_failed_flushes(endpoint: Callable[[str], None]) -> None:
    endpoint(f"http://127.0.0.1:{free_port()}")
    clock = SteppedClock(recent_minute())
    cw = publisher(fresh_namespace(), clock, max_series=5, attempts=1)
    with capture_logs() as logs:
        for n in range(20):
            cw.on_event(BackupFailed(f"db{n}", "boom", 1.0, clock()))
        for _ in range(100):  # the same series again: folded, not added
            cw.on_event(BackupFailed("db0", "boom", 1.0, clock()))
        assert cw.status()["series_buffered"] == 5
        assert cw.status()["series_dropped"] == 15
        assert [line["event"] for line in logs].count("cloudwatch.buffer_full") == 1  # once per flush window

        cw.on_event(
            FreshnessChecked(clock(), tuple(Freshness(f"t{n}", None, None, None, 60.0, True) for n in range(50)))
        )
        assert cw.status()["databases_tracked"] == 5  # the tracked set is capped too
        assert not await cw.flush_now()  # the ages cannot join a full buffer; the retained series stay within it
        assert cw.status()["series_buffered"] == 5
        cw.on_event(BackupCompleted("other", "o-1", clock(), 1.0, 1, 1))
        assert cw.status()["series_buffered"] == 5
    assert any(line["event"] == "cloudwatch.series_dropped" for line in logs)
    await cw.aclose()


def test_on_event_never_raises() -> None:
    clock = SteppedClock(recent_minute())
    cw = publisher(fresh_namespace(), clock)
    with capture_logs() as logs:
        cw.on_event(BackupCompleted("app", "a", clock(), float("nan"), 1, 1))
        cw.on_event(DROperationFinished({}))
        cw.on_event(DrillResult("app", "a", True, float("inf")))
        cw.on_event(FreshnessChecked(clock(), ()))
    assert [line["event"] for line in logs].count("cloudwatch.value_not_finite") == 2
    assert cw.status()["series_buffered"] == 2  # BackupSucceeded, BackupStoredBytes


# --------------------------------------------------------------------------------------------------
# PutMetricData's limits, and the last flush
# --------------------------------------------------------------------------------------------------


def wire_sizes(batch: list[dict[str, Any]]) -> dict[str, int]:
    """The body of one PutMetricData request in each protocol botocore may speak to CloudWatch."""
    operation = botocore.session.get_session().get_service_model("cloudwatch").operation_model("PutMetricData")
    params = {"Namespace": "KybdrAgent", "MetricData": batch}
    sizes = {}
    for protocol in ("query", "json", "smithy-rpc-v2-cbor"):
        body = create_serializer(protocol).serialize_to_request(params, operation)["body"]
        sizes[protocol] = len(urlencode(body) if isinstance(body, dict) else body)
    return sizes


def test_batches_stay_within_putmetricdata_limits() -> None:
    at = datetime.now(UTC)
    series = Series(3.0, -1.2345678901234567e100, -1.2345678901234567e-70, 1.2345678901234567e100, at)
    small: list[SeriesKey] = [(f"M{n}", (("Database", f"d{n}"),), "Count") for n in range(2500)]
    assert [len(b) for b in plan_batches(small)] == [MAX_DATUMS_PER_CALL, MAX_DATUMS_PER_CALL, 500]
    # Dimension values of 1024 characters (CloudWatch's maximum) make the byte limit the binding one.
    wide: list[SeriesKey] = [
        ("BackupAgeSeconds", (("Database", f"{n:04d}" + "é" * 1020), ("Host", "h" * 1024)), "Seconds")
        for n in range(300)
    ]
    for keys in (small, wide):
        batches = plan_batches(keys)
        assert [key for batch in batches for key in batch] == keys
        for batch in batches:
            assert len(batch) <= MAX_DATUMS_PER_CALL
            sizes = wire_sizes([datum(key, series) for key in batch])
            assert max(sizes.values()) <= MAX_REQUEST_BYTES - REQUEST_OVERHEAD_BYTES, sizes
    assert len(plan_batches(wide)) > 1


@pytest.mark.anyio
async def test_many_series_go_out_in_several_calls(cw_moto: MotoServer, endpoint: Any) -> None:
    namespace = fresh_namespace()
    clock = SteppedClock(recent_minute())
    cw = publisher(namespace, clock, max_databases=2000)
    for n in range(1500):
        cw.on_event(BackupFailed(f"db{n:04d}", "boom", 1.0, clock()))
    assert await cw.flush_now()
    assert cw.status()["datapoints_published"] == 1500
    assert len(listed(cw_moto, namespace)) == 1500
    await cw.aclose()


@pytest.mark.anyio
async def test_cancelling_run_flushes_what_is_buffered(cw_moto: MotoServer, endpoint: Any) -> None:
    namespace = fresh_namespace()
    clock = SteppedClock(recent_minute())
    cw = publisher(namespace, clock, interval=3600)
    async with anyio.create_task_group() as tg:
        await tg.start(cw.run)
        cw.on_event(DRProbed({}, primary_healthy=False))
        tg.cancel_scope.cancel()
    (point,) = datapoints(cw_moto, namespace, "DRPrimaryHealthy", clock)
    assert point["Maximum"] == 0
    assert cw.status()["ok"]


@pytest.mark.anyio
async def test_database_names_beyond_the_cap_share_one_series(cw_moto: MotoServer, endpoint: Any) -> None:
    """A request may name databases nobody configured; each would be a billed custom metric."""
    namespace = fresh_namespace()
    clock = SteppedClock(recent_minute())
    cw = publisher(namespace, clock, max_databases=3)
    for n in range(10):
        cw.on_event(BackupFailed(f"db{n}", "boom", 1.0, clock()))
    assert await cw.flush_now()
    metrics = cw_moto.client("cloudwatch").list_metrics(Namespace=namespace, MetricName="BackupFailures")["Metrics"]
    names = {d["Value"] for m in metrics for d in m["Dimensions"] if d["Name"] == "Database"}
    assert names == {"db0", "db1", "db2", "_other"}
