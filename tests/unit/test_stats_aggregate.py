"""The daemon's statistics (kybdr_agent/backup/stats.py): the in-memory tally answers exactly what
``BackupService.stats`` computes from the journal, and the catalog cache reads the repository once for many
callers, again after an invalidation, a TTL or a reload — never a stale catalog for a new service.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from kybdr_agent.backup.catalog import Catalog
from kybdr_agent.backup.service import BackupService
from kybdr_agent.backup.stats import CatalogCache, DaemonStats, OutcomeTally
from kybdr_agent.config import load_settings
from kybdr_agent.events import JobFinished
from kybdr_agent.jobs import Job, JobStatus
from kybdr_agent.journal import Journal
from tests.support import folder_service


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KYBDR_CONFIG", raising=False)


def _finished(kind: str, status: JobStatus, n: int, database: str | None = "db") -> Job:
    job = Job(id=f"job-{n:012x}", kind=kind, params={"n": n}, database=database, status=status)
    job.started_at = job.finished_at = datetime(2026, 1, 1, tzinfo=UTC)
    job.result = {"drills": [{"passed": status is JobStatus.SUCCEEDED}]} if kind == "test" else {"n": n}
    job.error = None if status is JobStatus.SUCCEEDED else f"error {n}"
    return job


def _record(job: Job) -> dict[str, Any]:
    record = job.to_json()
    record.pop("progress")
    return record


@pytest.mark.anyio
async def test_the_daemons_tally_matches_the_one_built_from_the_journal(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[backup]\nencryption = false\nbackup_dir = "{tmp_path / "state"}"\n\n'
        f'[repository]\nurl = "file://{tmp_path / "repo"}"\n'
    )
    (tmp_path / "repo").mkdir()
    journal = Journal(tmp_path / "state" / "journal.jsonl", max_bytes=600, keep=2)
    now = datetime(2026, 6, 1, tzinfo=UTC)
    service = folder_service(load_settings(config), journal=journal, clock=lambda: now)
    statuses = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]
    early = [_finished("backup", statuses[n % 3], n) for n in range(10)]
    for job in early:
        journal.append(_record(job))
    daemon = await DaemonStats.load(journal)  # built at start from what the journal holds
    for n in range(10, 40):  # then updated as jobs finish, the journal rotating meanwhile
        job = _finished("test" if n % 4 == 0 else "backup", statuses[n % 3], n)
        journal.append(_record(job))
        daemon.on_event(JobFinished(json.loads(json.dumps(_record(job)))))
    from_memory = await daemon.stats(service, now)
    from_scratch = await service.stats()
    assert from_memory == from_scratch
    assert from_memory["by_outcome"] == {"succeeded": 11, "failed": 11, "cancelled": 11}
    assert from_memory["last_drill"]["params"] == {"n": 36}
    assert from_memory["last_failure"]["error"] == "error 37"


class FakeService:
    """Only what the cache calls: ``catalog()``, counted, optionally held open."""

    def __init__(self) -> None:
        self.reads = 0
        self.hold: anyio.Event | None = None

    async def catalog(self) -> Catalog:
        self.reads += 1
        if self.hold is not None:
            await self.hold.wait()
        return Catalog()


@pytest.mark.anyio
async def test_many_callers_share_one_read_until_invalidated_or_expired() -> None:
    now = [0.0]
    cache = CatalogCache(ttl=30, clock=lambda: now[0])
    service = FakeService()
    as_service = cast(BackupService, service)
    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(cache.get, as_service)
    assert service.reads == 1
    await cache.get(as_service)
    assert service.reads == 1
    cache.invalidate()  # a backup or cleanup of this agent finished
    await cache.get(as_service)
    assert service.reads == 2
    now[0] = 31.0  # another agent sharing the repository is seen after the TTL
    await cache.get(as_service)
    assert service.reads == 3
    reloaded = FakeService()  # SIGHUP swapped the service: never answer with the old one's catalog
    await cache.get(cast(BackupService, reloaded))
    assert reloaded.reads == 1


@pytest.mark.anyio
async def test_a_read_overtaken_by_an_invalidation_is_not_kept() -> None:
    cache = CatalogCache(ttl=30)
    service = FakeService()
    service.hold = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.get, cast(BackupService, service))
        await anyio.sleep(0.01)
        cache.invalidate()  # a backup finished while the listing was under way
        service.hold.set()
    service.hold = None
    await cache.get(cast(BackupService, service))
    assert service.reads == 2


def test_a_tally_counts_only_what_it_should() -> None:
    tally = OutcomeTally()
    tally.observe({"kind": "backup", "status": "weird"})
    tally.observe({"kind": "backup", "status": "failed", "database": "x"}, count=False)
    tally.observe({"kind": "validate", "status": "failed"})
    assert tally.outcomes == {"succeeded": 0, "failed": 0, "cancelled": 0}
    assert tally.last_failure == {"at": None, "database": "x", "error": None}
