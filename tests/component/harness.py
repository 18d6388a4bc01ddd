"""The component tests' in-process agent: the composition root's own functions (``kybdr_agent.app``) wired
the way the daemon wires them, but with a clock the test moves by hand and no daemon process.

Nothing here replaces a part of the agent. The store is the root's ``LocalStore`` on a folder repository,
PostgreSQL is the session's real cluster, the journal is a real file; the only thing a test chooses is what
the constructors are given (the clock, the event subscribers, the state directory).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio

from kybdr_agent import app
from kybdr_agent.backup.component import BackupComponent
from kybdr_agent.backup.service import BackupService
from kybdr_agent.config import AgentSettings, load_settings
from kybdr_agent.events import Event, EventHub, Subscriber
from kybdr_agent.jobs import JobManager
from kybdr_agent.journal import Journal
from kybdr_agent.postgres.cluster import Cluster

# A Tuesday far from the real date: a timestamp that came from the real clock instead of the injected one
# cannot match it by accident. The policy's nightly slot is at 02:30 UTC, an hour and a half later.
T0: Final = datetime(2031, 3, 4, 1, 0, 0, tzinfo=UTC)
POLICY: Final = "nightly"
POLICY_SCHEDULE: Final = "30 2 * * *"
IDLE_GRACE: Final = 60.0  # seconds a test waits for its jobs before giving up on them
E = TypeVar("E")


class ManualClock:
    """The agent's clock (``kybdr_agent.clock.Clock``), moved only by the test.

    ``reads`` counts the calls, so a test can wait until a loop has come round again; with ``failing`` set,
    every read raises, which makes a scheduler tick fail every time, deterministically.
    """

    def __init__(self, now: datetime = T0) -> None:
        self.now = now
        self.reads = 0
        self.failing = False

    def __call__(self) -> datetime:
        self.reads += 1
        if self.failing:
            raise RuntimeError("the test's clock is failing on purpose")
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now

    async def wait_reads(self, count: int, timeout: float = 10.0) -> None:
        """Until the clock has been read ``count`` times in all (polling: the reader gives no other sign)."""
        with anyio.fail_after(timeout):
            while self.reads < count:
                await anyio.sleep(0.01)


@dataclass
class Recorder:
    """An event subscriber that keeps what it was given, in order."""

    events: list[Event] = field(default_factory=list)

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        return [event for event in self.events if isinstance(event, kind)]


def broken_subscriber(event: Event) -> None:
    """A subscriber with a bug (or a full disk under it): it raises on every event."""
    raise RuntimeError(f"subscriber bug while handling {type(event).__name__}")


def write_settings(tmp_path: Path, cluster: Cluster, database: str) -> AgentSettings:
    """A whole agent configuration, loaded as the daemon loads it: a folder repository, the state directory
    under ``tmp_path``, one policy over ``database``, unencrypted (no key to manage), and no drill schedule
    (so the scheduler's only slot is the policy's)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    path = tmp_path / "agent.toml"
    path.write_text(
        "[backup]\n"
        "encryption = false\n"
        f'backup_dir = "{tmp_path / "state"}"\n'
        "\n[[backup.policies]]\n"
        f'name = "{POLICY}"\n'
        f'schedule = "{POLICY_SCHEDULE}"\n'
        f'databases = ["{database}"]\n'
        "\n[database]\n"
        f'dsn = "host={cluster.socket_dir} port={cluster.port} user=postgres"\n'
        "\n[repository]\n"
        f'url = "file://{repo}"\n'
        "\n[drill]\n"
        'schedule = ""\n'
    )
    return load_settings(path)


def last_journal_record(journal: Journal) -> dict[str, Any]:
    """The journal's last line, parsed: what the agent would remember of its last job after a restart."""
    lines = journal.path.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[-1])
    assert isinstance(record, dict)
    return record


@dataclass
class Agent:
    """What the root builds for a running agent, kept for the test to reach into."""

    settings: AgentSettings
    service: BackupService
    jobs: JobManager
    events: EventHub
    journal: Journal
    rebuild: Callable[[AgentSettings], Awaitable[BackupService]]

    def component(self, clock: ManualClock, *, state_dir: Path | None = None) -> BackupComponent:
        """The backup component over this agent's service and jobs (its supervisors are not started)."""
        return BackupComponent(
            self.service,
            self.jobs,
            stats=None,
            state_dir=state_dir or self.settings.backup.backup_dir,
            clock=clock,
            rebuild=self.rebuild,
        )


@asynccontextmanager
async def running_agent(
    settings: AgentSettings,
    clock: ManualClock,
    subscribers: Sequence[tuple[str, Subscriber]] = (),
    *,
    ahead_of_journal: Sequence[tuple[str, Subscriber]] = (),
) -> AsyncIterator[Agent]:
    """The daemon's wiring (``daemon.run_daemon``) without the daemon: the journal subscribes first (after
    ``ahead_of_journal``, if a test wants something before it), then ``subscribers`` in order; every finished
    job is recorded with ``via="test"``; jobs run in a task group that outlives the test body until idle."""
    journal = app.journal_path(settings)
    events = EventHub()
    for name, subscriber in ahead_of_journal:
        events.subscribe(name, subscriber)
    events.subscribe("journal", app.journal_subscriber(journal))
    for name, subscriber in subscribers:
        events.subscribe(name, subscriber)
    jobs = JobManager(max_parallel=settings.backup.max_parallel, clock=clock)
    app.record_jobs(jobs, events, via="test")
    async with app.open_stores() as stores:

        async def rebuild(new: AgentSettings) -> BackupService:
            return await app.build_backup_service(new, stores, journal=journal, events=events, clock=clock)

        service = await rebuild(settings)
        async with anyio.create_task_group() as tg:
            jobs.attach(tg)
            yield Agent(settings, service, jobs, events, journal, rebuild)
            assert await jobs.wait_idle(IDLE_GRACE), "jobs still running at the end of the test"


async def break_backup(service: BackupService, backup_id: str) -> None:
    """Delete a backup's data object but keep its manifest: it is still listed, and restoring it fails."""
    found = await service.find(backup_id)
    await service.store.delete(found.object_key)
