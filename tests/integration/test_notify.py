"""Alerts against real parts: SNS on moto_server (read back through an SQS queue subscribed to the topic),
and webhook receivers this test serves over HTTP on loopback — one that records, one that fails before it
answers, one that hangs.

What matters: a condition that persists is sent once and its clearing once; every body is JSON that names
the database or region; a failing channel is retried with a bound and a hanging one is cut at the timeout
while the other channel delivers and the dispatcher keeps going; the bearer token reaches the receiver and
no log line. Timeouts are small (tenths of a second) so the file runs in seconds; deadlines in ``until`` are
generous bounds for a busy machine, not timing assertions.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import structlog
from aiohttp import web

from kybdr_agent.events import (
    BackupCompleted,
    BackupFailed,
    DRAlert,
    DrillResult,
    DROperationFinished,
    DRProbed,
    DRTransition,
    EventHub,
    Freshness,
    FreshnessChecked,
    ReplicaCopyFailed,
    RepositorySpace,
    RetentionDeleted,
    ValidationVerdict,
)
from kybdr_agent.notify import Notifier, NotifyConfig, SnsChannel, WebhookChannel, build_channels, redact_url
from tests.support import MotoServer, SteppedClock

T0 = datetime(2030, 1, 2, 3, 0, tzinfo=UTC)
DAY = 86400.0
TIMEOUT = 0.3  # where a test waits for the cut; elsewhere a generous bound, so a busy machine never cuts
ROOMY = 10.0
TOKEN = "tok-" + secrets.token_hex(16)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(**overrides: Any) -> NotifyConfig:
    values: dict[str, Any] = {
        "timeout": ROOMY,
        "max_attempts": 3,
        "backoff_base": 0.05,
        "backoff_max": 0.1,
        "host": "db-host-1",
    }
    return NotifyConfig(**{**values, **overrides})


@dataclass
class Receiver:
    """A webhook endpoint: answers ``statuses`` in order (then 200), or holds every request until released."""

    statuses: list[int] = field(default_factory=list)
    hang: bool = False
    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    delivered: list[dict[str, Any]] = field(default_factory=list)  # bodies answered 2xx
    release: anyio.Event = field(default_factory=anyio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization"))
        body = await request.json()
        self.bodies.append(body)
        if self.hang:
            await self.release.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.delivered.append(body)
        return web.Response(status=status)


@asynccontextmanager
async def serve(receiver: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    receiver.url = f"http://{host}:{port}/hook"
    try:
        yield receiver
    finally:
        receiver.release.set()
        await runner.cleanup()


async def until(predicate: Callable[[], bool], deadline: float = 10.0) -> None:
    with anyio.fail_after(deadline):
        while not predicate():
            await anyio.sleep(0.01)


def webhook(receiver: Receiver, name: str = "webhook") -> WebhookChannel:
    return WebhookChannel(receiver.url, token=None, timeout=TIMEOUT, name=name)


# --- SNS ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sns_gets_one_firing_and_one_resolved_message_naming_the_database(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SNS", moto_server.endpoint)
    sns, sqs = moto_server.client("sns"), moto_server.client("sqs")
    topic = sns.create_topic(Name=f"kybdr-alerts-{secrets.token_hex(4)}")["TopicArn"]
    queue_url = sqs.create_queue(QueueName=f"kybdr-alerts-{secrets.token_hex(4)}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)

    notifier = Notifier(config(sns_topic_arn=topic), clock=SteppedClock(T0))
    assert [type(o.channel) for o in notifier.outboxes] == [SnsChannel]
    hub = EventHub()
    hub.subscribe("notify", notifier.on_event)
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        hub.publish(BackupFailed("mydb", "pg_dump: connection refused", 1.5, T0))
        hub.publish(BackupFailed("mydb", "pg_dump: connection refused", 1.2, T0 + timedelta(hours=1)))
        hub.publish(BackupCompleted("mydb", "20300102T050000Z-ab12", T0 + timedelta(hours=2), 3.0, 100, 40))
        await until(lambda: notifier.status()["sent"] + notifier.status()["dropped"] == 2)
        tg.cancel_scope.cancel()
    assert notifier.status()["sent"] == 2

    received: list[dict[str, Any]] = []
    while batch := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", []):
        received += [json.loads(m["Body"]) for m in batch]
    assert len(received) == 2
    bodies = [json.loads(envelope["Message"]) for envelope in received]
    assert [(b["alert"], b["status"], b["database"]) for b in bodies] == [
        ("backup_failed", "firing", "mydb"),
        ("backup_failed", "resolved", "mydb"),
    ]
    assert all("mydb" in b["summary"] and b["host"] == "db-host-1" for b in bodies)
    assert bodies[0]["details"]["error"] == "pg_dump: connection refused"
    assert bodies[1]["details"]["backup_id"] == "20300102T050000Z-ab12"
    assert received[0]["Subject"].startswith("[FIRING] backup of database mydb failed")
    attributes = received[0]["MessageAttributes"]
    assert {k: v["Value"] for k, v in attributes.items()} == {
        "alert": "backup_failed",
        "status": "firing",
        "severity": "critical",
        "database": "mydb",
    }


@pytest.mark.anyio
async def test_an_sns_topic_that_does_not_exist_is_retried_then_dropped(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SNS", moto_server.endpoint)
    notifier = Notifier(config(sns_topic_arn="arn:aws:sns:us-east-1:123456789012:missing"), clock=SteppedClock(T0))
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        notifier.on_event(BackupFailed("mydb", "boom", 1.0, T0))
        await until(lambda: notifier.status()["dropped"] == 1)
        tg.cancel_scope.cancel()
    channel = notifier.status()["channels"]["sns"]
    assert (channel["sent"], channel["failed"], channel["dropped"]) == (0, 3, 1)
    assert "NotFound" in channel["last_error"]


# --- webhooks ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_webhook_that_fails_first_gets_the_message_on_a_retry_with_the_token_never_logged() -> None:
    async with serve(Receiver(statuses=[500])) as receiver:
        notifier = Notifier(config(webhook_url=receiver.url, webhook_token=TOKEN), clock=SteppedClock(T0))
        (channel,) = notifier.outboxes
        assert TOKEN not in repr(channel.channel)
        assert TOKEN not in repr(notifier.config)
        with structlog.testing.capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                await tg.start(notifier.run)
                notifier.on_event(ReplicaCopyFailed("mydb", "b1", "AccessDenied", T0))
                await until(lambda: notifier.status()["sent"] == 1)
                tg.cancel_scope.cancel()
    assert len(receiver.bodies) == 2
    assert receiver.auth == [f"Bearer {TOKEN}"] * 2
    (body,) = receiver.delivered
    assert (body["alert"], body["status"], body["database"], body["region"]) == (
        "replica_copy_failed",
        "firing",
        "mydb",
        "dr",
    )
    status = notifier.status()
    assert (status["sent"], status["failed"], status["dropped"]) == (1, 1, 0)
    assert "HTTP 500" in status["channels"]["webhook"]["last_error"]
    assert [e["event"] for e in logs if e["event"].startswith("notify.s")] == ["notify.send_failed", "notify.sent"]
    assert TOKEN not in repr(logs)
    assert TOKEN not in json.dumps(status)


def sent(notifier: Notifier, channel: str) -> int:
    return int(notifier.status()["channels"][channel]["sent"])


def distinct(bodies: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(alert, status) of each body in order, an attempt cut after the receiver answered counted once."""
    seen: list[tuple[str, str]] = []
    for body in bodies:
        if (body["alert"], body["status"]) not in seen:
            seen.append((body["alert"], body["status"]))
    return seen


@pytest.mark.anyio
async def test_a_channel_that_does_not_answer_does_not_hold_up_the_other() -> None:
    async with serve(Receiver(hang=True)) as hanging, serve(Receiver()) as good:
        notifier = Notifier(
            config(), clock=SteppedClock(T0), channels=[webhook(hanging, "hanging"), webhook(good, "good")]
        )
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run)
            notifier.on_event(BackupFailed("mydb", "boom", 1.0, T0))
            # The hanging channel's request is held (it would be, up to its timeout) while the other delivers.
            await until(lambda: len(hanging.bodies) == 1 and sent(notifier, "good") == 1)
            assert sent(notifier, "hanging") == 0
            hanging.release.set()
            await until(lambda: sent(notifier, "hanging") == 1)
            tg.cancel_scope.cancel()
    assert hanging.delivered == good.delivered
    assert notifier.status()["failed"] == 0


@pytest.mark.anyio
async def test_a_hanging_webhook_is_cut_at_the_timeout_and_run_goes_on() -> None:
    async with serve(Receiver(hang=True)) as hanging, serve(Receiver()) as good:
        notifier = Notifier(
            config(max_attempts=2, timeout=TIMEOUT),
            clock=SteppedClock(T0),
            channels=[webhook(hanging, "hanging"), webhook(good, "good")],
        )
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run)
            notifier.on_event(DrillResult("mydb", "b1", passed=False, seconds=12.0, error="restore failed"))
            await until(lambda: notifier.status()["channels"]["hanging"]["dropped"] == 1)
            # The dispatcher is still running: the next message reaches the good channel, and the hanging
            # one is tried again (and cut again).
            notifier.on_event(DrillResult("mydb", "b2", passed=True, seconds=10.0))
            await until(lambda: notifier.status()["channels"]["hanging"]["dropped"] == 2)
            await until(lambda: sent(notifier, "good") == 2)
            tg.cancel_scope.cancel()
    assert distinct(good.delivered) == [("drill_failed", "firing"), ("drill_failed", "resolved")]
    assert len(hanging.bodies) == 4  # two messages, two attempts each, none answered
    hung = notifier.status()["channels"]["hanging"]
    assert (hung["sent"], hung["failed"], hung["dropped"]) == (0, 4, 2)
    assert hung["last_error"] == f"no answer within {TIMEOUT:g} s"


@pytest.mark.anyio
async def test_the_stale_alert_fires_once_and_resolves_on_housekeeping_ticks() -> None:
    clock = SteppedClock(T0)
    last_backup = clock()

    def tick() -> FreshnessChecked:
        age = (clock() - last_backup).total_seconds()
        fresh = Freshness("mydb", last_backup, "b1", age, DAY, stale=age > DAY)
        other = Freshness("otherdb", None, None, None, DAY, stale=True)
        return FreshnessChecked(clock(), (fresh, other) if clock() < T0 + timedelta(days=3) else (fresh,))

    async with serve(Receiver()) as receiver:
        notifier = Notifier(config(), clock=clock, channels=[webhook(receiver)])
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run)
            notifier.on_event(tick())  # otherdb has never had a good backup: stale at once
            for _ in range(3):  # mydb stays fresh for a day, then stale for hours: one firing
                clock.advance(10 * 3600)
                notifier.on_event(tick())
            assert notifier.book.keys == ("stale:otherdb", "stale:mydb")
            last_backup = clock.now = clock() + timedelta(hours=1)
            notifier.on_event(tick())  # a good backup: resolved
            clock.advance(2 * DAY)
            last_backup = clock()
            notifier.on_event(tick())  # otherdb is no longer covered: resolved
            await until(lambda: notifier.status()["sent"] == 4)
            tg.cancel_scope.cancel()
    seen = [(b["alert"], b["status"], b["database"], b["at"]) for b in receiver.delivered]
    assert seen == [
        ("stale", "firing", "otherdb", T0.isoformat()),
        ("stale", "firing", "mydb", (T0 + timedelta(hours=30)).isoformat()),
        ("stale", "resolved", "mydb", (T0 + timedelta(hours=31)).isoformat()),
        ("stale", "resolved", "otherdb", (T0 + timedelta(hours=79)).isoformat()),
    ]
    assert receiver.delivered[0]["summary"] == "database otherdb has no good backup (window 1d)"
    assert receiver.delivered[1]["summary"] == "database mydb: newest good backup is 1d 6h old, over 1d"
    assert receiver.delivered[1]["details"]["window_seconds"] == DAY
    assert receiver.delivered[2]["details"]["firing_seconds"] == 3600.0
    assert "no longer covered" in receiver.delivered[3]["summary"]
    assert notifier.book.keys == ()


# --- events to messages (queued, not sent: no dispatcher runs) ---------------------------------------


def queued(notifier: Notifier) -> list[dict[str, Any]]:
    (outbox,) = notifier.outboxes
    messages = [m.to_json() for m in outbox.queue]
    outbox.queue.clear()
    return messages


def offline(**overrides: Any) -> Notifier:
    return Notifier(config(webhook_url="http://127.0.0.1:9/hook", **overrides), clock=SteppedClock(T0))


def test_validation_repository_and_ignored_events() -> None:
    notifier = offline(min_free_bytes=1 << 30)
    notifier.on_event(ValidationVerdict("b1", "mydb", "full", ok=False, corrupt=True, error="checksum mismatch"))
    notifier.on_event(ValidationVerdict("b1", "mydb", "full", ok=False, corrupt=True, error="checksum mismatch"))
    notifier.on_event(ValidationVerdict("b2", "mydb", "quick", ok=True, corrupt=False))
    notifier.on_event(RepositorySpace(T0, "/srv/backups", 100 << 20, 10 << 30))
    notifier.on_event(RepositorySpace(T0, "/srv/backups", 200 << 20, 10 << 30))
    notifier.on_event(RepositorySpace(T0, "/srv/backups", 5 << 30, 10 << 30))
    notifier.on_event(RetentionDeleted("mydb", "b0", 10))
    notifier.on_event(BackupCompleted("mydb", "b3", T0, 1.0, 1, 1))  # nothing was firing: nothing to resolve
    messages = queued(notifier)
    assert [(m["alert"], m["status"], m["severity"]) for m in messages] == [
        ("validation_failed", "firing", "critical"),
        ("validation_failed", "resolved", "critical"),
        ("repository_low", "firing", "warning"),
        ("repository_low", "resolved", "warning"),
    ]
    assert "mydb" in messages[0]["summary"]
    assert "corrupt" in messages[0]["summary"]
    assert messages[2]["summary"] == (
        "repository /srv/backups is running low: 100.0 MiB free of 10.0 GiB, under 1.0 GiB"
    )
    assert messages[2]["details"]["free_bytes"] == 100 << 20


def test_dr_events_are_sent_every_time_and_lag_is_deduplicated() -> None:
    notifier = offline(max_lag_bytes=1000)
    notifier.on_event(DRTransition("steady", "suspect", "primary", "primary health check failed", T0))
    notifier.on_event(DRTransition("steady", "suspect", "primary", "primary health check failed", T0))
    notifier.on_event(DRAlert("critical", "split-brain risk: both regions writable", T0))
    record = {"operation": "failover", "outcome": "succeeded", "source": "primary", "target": "dr", "trigger": "auto"}
    notifier.on_event(DROperationFinished({**record, "at": T0.isoformat(), "duration_s": 42.0, "seq": 7}))
    notifier.on_event(DROperationFinished({**record, "operation": "failback", "source": "dr", "target": "primary"}))
    notifier.on_event(DROperationFinished({**record, "operation": "fence"}))  # not an alert of its own

    def probed(current: int | None, replay: int | None) -> DRProbed:
        db = {"primary": {"current_lsn": current}, "dr": {"replay_lsn": replay}}
        return DRProbed({"at": T0.isoformat(), "db": db}, primary_healthy=True)

    for current, replay in ((5000, 1000), (6000, 2000), (None, 2000), (7000, 6500), (8000, 1000)):
        notifier.on_event(probed(current, replay))
    messages = queued(notifier)
    assert [(m["alert"], m["status"], m["severity"], m.get("region")) for m in messages] == [
        ("dr_state", "event", "warning", "primary"),
        ("dr_state", "event", "warning", "primary"),
        ("dr_alert", "event", "critical", None),
        ("dr_failover", "event", "critical", "dr"),
        ("dr_failback", "event", "info", "primary"),
        ("dr_lag", "firing", "warning", "dr"),
        ("dr_lag", "resolved", "warning", "dr"),
        ("dr_lag", "firing", "warning", "dr"),
    ]
    assert messages[0]["summary"] == (
        "DR state steady -> suspect on db-host-1, active region primary: primary health check failed"
    )
    failover = messages[3]
    assert failover["summary"] == "DR failover from primary to dr succeeded (auto) on db-host-1"
    assert failover["details"]["duration_s"] == 42.0
    assert "seq" not in failover["details"]
    assert messages[5]["details"] == {"lag_bytes": 4000, "max_lag_bytes": 1000}


def test_without_a_lag_bound_there_is_no_lag_alert() -> None:
    notifier = offline()
    notifier.on_event(DRProbed({"db": {"primary": {"current_lsn": 9 << 30}, "dr": {"replay_lsn": 0}}}, True))
    assert queued(notifier) == []


def test_a_full_queue_drops_the_oldest_and_a_bad_event_never_raises() -> None:
    notifier = offline(queue_size=2, max_lag_bytes=1)
    for database in ("a", "b", "c"):
        notifier.on_event(BackupFailed(database, "boom", 1.0, T0))
    with structlog.testing.capture_logs() as logs:
        notifier.on_event(DRProbed({"db": "not a mapping"}, primary_healthy=False))  # logged, not raised
    assert [e["event"] for e in logs] == ["notify.event_failed"]
    assert [m["database"] for m in queued(notifier)] == ["b", "c"]
    status = notifier.status()
    assert status["dropped"] == 1
    assert status["firing"] == ["backup_failed:a", "backup_failed:b", "backup_failed:c"]


def test_channels_follow_the_configuration() -> None:
    assert build_channels(NotifyConfig()) == []
    both = build_channels(
        NotifyConfig(sns_topic_arn="arn:aws:sns:eu-west-1:123456789012:alerts", webhook_url="https://h/x")
    )
    assert [c.name for c in both] == ["sns", "webhook"]
    assert isinstance(both[0], SnsChannel)
    assert both[0].region == "eu-west-1"
    assert NotifyConfig(sns_topic_arn="arn:aws:sns:eu-west-1:1:a", sns_region="us-east-1").region == "us-east-1"
    assert redact_url("https://user:pw@hooks.example.com:8443/a/b?token=x#f") == "https://hooks.example.com:8443/…"
