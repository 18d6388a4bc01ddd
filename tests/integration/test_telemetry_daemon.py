"""What SREs see, from the agent as a real process: ``/metrics`` on the control socket, on TCP with a token
and on the token-free scrape listener (parsed with prometheus-client's own parser) after a real backup, a
failed backup and a drill; alerts reaching a webhook the test serves and SNS (moto, read back through an
SQS subscription); CloudWatch datapoints in moto; OTLP traces (protobuf, as a collector receives them)
with a span per job and per stage; the audit trail verified by the CLI; and the last-success gauges
rebuilt after a restart."""

from __future__ import annotations

import http.server
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from kybdr_agent.postgres.cluster import Cluster, free_port
from tests.daemon_support import Daemon, UnixHTTPConnection, start_daemon
from tests.support import MotoServer, create_mixed_database, run_cli, unique_db


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A loopback HTTP server that records every POST: the alert webhook and the OTLP collector."""

    port: int
    got: list[Received] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    def posts(self, path: str) -> list[Received]:
        return [r for r in list(self.got) if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    recv = Receiver(free_port())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            recv.got.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    recv.server = http.server.ThreadingHTTPServer(("127.0.0.1", recv.port), Handler)
    thread = threading.Thread(target=recv.server.serve_forever, daemon=True)
    thread.start()
    yield recv
    recv.server.shutdown()
    recv.server.server_close()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def scrape_unix(daemon: Daemon) -> tuple[int, str, str]:
    conn = UnixHTTPConnection(str(daemon.socket_path))
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def scrape_tcp(port: int, path: str = "/metrics", token: str | None = None) -> tuple[int, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def spans_of(recv: Receiver) -> list[Any]:
    spans: list[Any] = []
    for post in recv.posts("/v1/traces"):
        request = ExportTraceServiceRequest()
        request.ParseFromString(post.body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                spans.extend(scope.spans)
    return spans


def test_metrics_alerts_cloudwatch_traces_and_audit(
    pg: Cluster, moto_server: MotoServer, tmp_path: Path, key_file: Path, receiver: Receiver
) -> None:
    app_db, missing = unique_db("tel"), unique_db("gone")
    create_mixed_database(pg, app_db, rows=800)
    tcp_port, scrape_port = free_port(), free_port()
    viewer = secrets.token_urlsafe(24)
    (tmp_path / "viewer.token").write_text(viewer + "\n")
    (tmp_path / "viewer.token").chmod(0o600)
    hook_token = secrets.token_urlsafe(24)
    (tmp_path / "hook.token").write_text(hook_token + "\n")
    (tmp_path / "hook.token").chmod(0o600)
    sns, sqs = moto_server.client("sns"), moto_server.client("sqs")
    topic = sns.create_topic(Name=f"alerts-{secrets.token_hex(4)}")["TopicArn"]
    queue = sqs.create_queue(QueueName=f"alerts-{secrets.token_hex(4)}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn, Attributes={"RawMessageDelivery": "true"})
    namespace = f"KybdrTest{secrets.token_hex(4)}"

    socket_path = tmp_path / "control.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[backup]\nbackup_dir = "{tmp_path / "state"}"\n\n'
        f'[database]\ndsn = "host={pg.socket_dir} port={pg.port} user=postgres"\n'
        f"databases = {json.dumps([app_db, missing])}\n\n"
        f'[encryption]\nkey_file = "{key_file}"\n\n[repository]\nurl = "file://{tmp_path / "repo"}"\n\n'
        f'[control]\nsocket = "{socket_path}"\ntcp_listen = "127.0.0.1:{tcp_port}"\n\n'
        f'[[control.tokens]]\nrole = "viewer"\nname = "grafana"\ntoken_file = "{tmp_path / "viewer.token"}"\n\n'
        f'[drill]\nschedule = ""\n\n[daemon]\nshutdown_grace_seconds = 2\nhousekeeping_interval = "2s"\n\n'
        f'[telemetry]\nmetrics_listen = "127.0.0.1:{scrape_port}"\ncloudwatch = true\n'
        f'cloudwatch_namespace = "{namespace}"\ncloudwatch_region = "us-east-1"\ncloudwatch_interval = "1s"\n'
        f'otlp_endpoint = "http://127.0.0.1:{receiver.port}"\n\n'
        f'[notify]\nsns_topic_arn = "{topic}"\nwebhook_url = "http://127.0.0.1:{receiver.port}/hook"\n'
        f'webhook_token_file = "{tmp_path / "hook.token"}"\ntimeout = "2s"\n'
    )
    env = {
        "AWS_ENDPOINT_URL": moto_server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    agent = start_daemon(config, socket_path, tmp_path, env=env)
    try:
        made = agent.request("POST", "/v1/backup?wait=true", {"database": app_db})
        assert made.status == 200, made.body
        assert made.body["jobs"][0]["status"] == "succeeded", made.body
        failed = agent.request("POST", "/v1/backup?wait=true", {"database": missing})
        assert failed.body["jobs"][0]["status"] == "failed", failed.body
        drilled = agent.request("POST", "/v1/backup/test?wait=true", {})
        assert drilled.body["jobs"][0]["status"] == "succeeded", drilled.body

        # --- Prometheus, three ways in ---------------------------------------------------------------
        status, content_type, text = scrape_unix(agent)
        assert status == 200
        assert content_type.startswith("text/plain")
        found = samples(text)
        assert value(found, "kybdr_backups_total", database=app_db, outcome="succeeded") == 1
        assert value(found, "kybdr_backups_total", database=missing, outcome="failed") == 1
        assert value(found, "kybdr_backup_duration_seconds_count", database=app_db) == 1
        assert (value(found, "kybdr_backup_dump_bytes", database=app_db) or 0) > 0
        assert (value(found, "kybdr_backup_stored_bytes", database=app_db) or 0) > 0
        assert (value(found, "kybdr_backup_throughput_bytes_per_second", database=app_db) or 0) > 0
        assert (value(found, "kybdr_backup_last_success_timestamp_seconds", database=app_db) or 0) > time.time() - 600
        assert value(found, "kybdr_restore_drills_total", database=app_db, outcome="passed") == 1
        assert (value(found, "kybdr_restore_drill_duration_seconds", database=app_db) or 0) > 0
        assert (value(found, "kybdr_restore_drill_last_success_timestamp_seconds", database=app_db) or 0) > 0
        assert value(found, "kybdr_control_requests_total", route="create_backup", status="200") == 2
        assert value(found, "kybdr_control_requests_total", route="test_backups", status="200") == 1
        assert "# TYPE kybdr_jobs_running gauge" in text
        assert "kybdr_storage_retries_total" in text or "kybdr_storage_retries" in text

        status, scraped = scrape_tcp(scrape_port)
        assert status == 200
        assert "kybdr_backups_total" in scraped
        assert scrape_tcp(scrape_port, "/v1/backup")[0] == 404  # the scrape listener serves nothing else
        assert scrape_tcp(tcp_port)[0] == 401  # the control API's /metrics needs a token on TCP
        status, via_token = scrape_tcp(tcp_port, token=viewer)
        assert status == 200
        assert "kybdr_backups_total" in via_token

        # --- alerts: the webhook (with its bearer token) and SNS -----------------------------------------
        def hook_alerts() -> list[dict[str, Any]]:
            return [json.loads(r.body) for r in receiver.posts("/hook")]

        def failed_alert() -> list[dict[str, Any]]:
            return [a for a in hook_alerts() if a.get("database") == missing and "fail" in str(a.get("alert"))]

        wait_for("the backup-failed alert on the webhook", failed_alert)
        assert all(r.headers.get("authorization") == f"Bearer {hook_token}" for r in receiver.posts("/hook"))
        # De-duplicated: however often housekeeping sees the missing database stale, one firing alert.
        time.sleep(3)
        stale = [a for a in hook_alerts() if a.get("database") == missing and "stale" in str(a.get("alert"))]
        assert len([a for a in stale if a.get("status") == "firing"]) == 1, stale

        def sns_messages() -> list[dict[str, Any]]:
            got = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
            return [json.loads(m["Body"]) for m in got]

        from_sns = wait_for("an alert through SNS", sns_messages)
        assert any(m.get("database") in (app_db, missing) for m in from_sns), from_sns

        # --- CloudWatch: what the terraform alarms read --------------------------------------------------
        cloudwatch = moto_server.client("cloudwatch")

        def published() -> set[str]:
            names = {m["MetricName"] for m in cloudwatch.list_metrics(Namespace=namespace)["Metrics"]}
            wanted = {"BackupSucceeded", "BackupFailures", "BackupAgeSeconds", "BackupDurationSeconds"}
            return names if wanted <= names and "RestoreDrillSeconds" in names else set()

        wait_for("the agent's metrics in CloudWatch", published)
    finally:
        assert agent.stop() == 0, agent.log()

    # --- traces: a span per job, a child per stage ---------------------------------------------------------
    spans = wait_for("OTLP traces", lambda: spans_of(receiver), timeout=15)
    by_name: dict[str, list[Any]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert {"job backup", "dump", "encode", "upload", "manifest", "job test", "drill"} <= set(by_name), sorted(by_name)
    job_ids = {span.span_id for span in by_name["job backup"]}
    for stage_name in ("dump", "encode", "upload", "manifest"):
        assert all(span.parent_span_id in job_ids for span in by_name[stage_name]), stage_name
    for span in spans:
        for attribute in span.attributes:
            assert key_file.name not in str(attribute.value)
            assert "password" not in attribute.key.lower()

    # --- the audit trail: requests that changed something, by whom ---------------------------------------
    verified = run_cli(config, "audit", "verify")
    assert verified.returncode == 0, verified.stderr
    shown = run_cli(config, "audit", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    records = [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]
    assert any(r["caller"].startswith("uid:") and "POST" in r["operation"] for r in records), records[:5]

    # --- after a restart the last-success gauges come back from the journal and the repository -------------
    plain = config.read_text().split("[telemetry]")[0]
    config.write_text(plain)
    again = start_daemon(config, socket_path, tmp_path)
    try:
        found = samples(scrape_unix(again)[2])
        assert (value(found, "kybdr_backup_last_success_timestamp_seconds", database=app_db) or 0) > 0
        assert (value(found, "kybdr_restore_drill_last_success_timestamp_seconds", database=app_db) or 0) > 0
        assert value(found, "kybdr_backups_total", database=app_db, outcome="succeeded") is None  # counters restart
    finally:
        assert again.stop() == 0, again.log()
