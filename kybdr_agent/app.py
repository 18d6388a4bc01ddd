"""The composition root: settings in, adapters and components out. The only module that picks
implementations — which store, which key ring, how to reach PostgreSQL, which clock, who listens to events.

Two callers, one path: the daemon (``daemon.run_daemon``) at start-up and on reload, and the CLI when it
runs a command in-process (``in_process``). Both build the backup service with ``build_backup_service``
and record every finished job through the same event hub, so a backup made by ``kybdr-agent backup`` on a
host without a daemon is journaled, and counted by ``stats``, exactly like one the daemon made.

Stores are opened once and kept (``Stores``): an S3 client holds a connection pool and ~30 MiB of service
model, so one per operation was waste. A reload that leaves ``[repository]`` as it was keeps the same
store; one that changes it opens a new one, and the old one stays open until the agent stops, since a job
that started before the reload may still be using it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import anyio

from kybdr_agent import secret_files
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.service import BackupService
from kybdr_agent.backup.settings import BackupConfig
from kybdr_agent.clock import Clock, utc_now
from kybdr_agent.config import AgentSettings, RepositorySettings
from kybdr_agent.errors import ConfigError
from kybdr_agent.events import Event, EventHub, JobFinished, Subscriber
from kybdr_agent.jobs import Job, JobManager
from kybdr_agent.journal import Journal
from kybdr_agent.pathutil import NothingExists, nearest_existing
from kybdr_agent.postgres.connection import Connection
from kybdr_agent.storage.base import BlobStore, ReplicaStore
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.storage.parts import MIB
from kybdr_agent.storage.retry import RetryPolicy

# --- adapters -----------------------------------------------------------------------------------


async def _open_store(repo: RepositorySettings) -> BlobStore:
    if repo.scheme == "file":
        return LocalStore(repo.local_path)
    # Imported here: aiobotocore costs ~0.2 s and ~30 MiB, which a folder repository never needs.
    from kybdr_agent.storage.s3 import S3Options, S3Store

    return await S3Store.open(
        S3Options(
            bucket=repo.bucket,
            prefix=repo.prefix,
            region=repo.region,
            endpoint_url=repo.endpoint_url,
            addressing_style=repo.addressing_style,
            checksums=repo.checksums,
            part_size=repo.part_size_mib * MIB or None,
            min_part_size=repo.min_part_size_mib * MIB,
            max_parts=repo.max_parts,
            upload_concurrency=repo.upload_concurrency,
            connect_timeout=repo.connect_timeout_seconds,
            request_timeout=repo.request_timeout_seconds,
            retry=RetryPolicy(attempts=repo.max_attempts, attempt_deadline=repo.request_timeout_seconds),
        )
    )


def replica_repository(settings: AgentSettings) -> RepositorySettings | None:
    """The DR bucket: same prefix, endpoint and transfer settings as the repository, its own bucket/region."""
    backup = settings.backup
    if not backup.cross_region:
        return None
    if not backup.cross_region_bucket or settings.repository.scheme != "s3":
        raise ConfigError("cross-region copies need backup.cross_region_bucket and an s3:// repository")
    return settings.repository.model_copy(
        update={
            "url": f"s3://{backup.cross_region_bucket}/{settings.repository.prefix}".rstrip("/"),
            "region": backup.cross_region_region or settings.repository.region,
        }
    )


class Stores:
    """Every store opened for this process, one per distinct repository configuration, closed at the end."""

    def __init__(self) -> None:
        self._open: dict[str, BlobStore] = {}

    async def get(self, repo: RepositorySettings) -> BlobStore:
        key = json.dumps(repo.model_dump(mode="json"), sort_keys=True)
        store = self._open.get(key)
        if store is None:
            store = self._open[key] = await _open_store(repo)
        return store

    async def replica(self, settings: AgentSettings) -> ReplicaStore | None:
        repo = replica_repository(settings)
        if repo is None:
            return None
        from kybdr_agent.storage.s3 import S3Store

        store = await self.get(repo)
        assert isinstance(store, S3Store)  # replica_repository only ever names an s3:// bucket
        return store

    async def aclose(self) -> None:
        stores, self._open = list(self._open.values()), {}
        with anyio.CancelScope(shield=True):
            for store in stores:
                await store.aclose()


@asynccontextmanager
async def open_stores() -> AsyncIterator[Stores]:
    stores = Stores()
    try:
        yield stores
    finally:
        await stores.aclose()


def keyring(settings: AgentSettings) -> KeyRing | None:
    """The configured key ring, or None when no key file is set (unencrypted backups only).

    Every key file is checked as ``config check`` and ``run`` check it (``secret_files``: regular file,
    trusted owner, mode 0600/0640, 32 bytes), so a one-shot command refuses exactly what the agent would.
    """
    return secret_files.load_keyring(settings)


def connection(settings: AgentSettings) -> Connection:
    """How to reach the database; ``database.password_file`` is checked like every secret file first."""
    db = settings.database
    secret_files.check_password_files(settings, drill=False)
    return Connection.from_settings(db.dsn, db.password_file, db.pg_bin_dir, db.connect_timeout_seconds)


def drill_connection(settings: AgentSettings) -> Connection:
    """Where restore drills make their scratch databases: ``drill.dsn``, or the database server."""
    drill, db = settings.drill, settings.database
    if drill.dsn is None:
        return connection(settings)
    return Connection.from_settings(drill.dsn, drill.password_file, db.pg_bin_dir, db.connect_timeout_seconds)


def check_state_dir(settings: AgentSettings) -> None:
    """``backup.backup_dir`` is (or can become) a directory this user may write: checked by ``run`` before
    it says it is ready, since the journal of every job and the scheduler's state go there. Nothing is
    created here; the directory that exists (it, or the nearest parent) is what must be writable."""
    wanted = settings.backup.backup_dir
    try:
        probe, info = nearest_existing(wanted)
    except NothingExists:
        raise ConfigError(f"backup.backup_dir {wanted}: no directory of it exists") from None
    except OSError as exc:
        raise ConfigError(f"backup.backup_dir {wanted}: cannot inspect {exc.filename}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"backup.backup_dir {wanted}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"backup.backup_dir {wanted}: {probe} is not writable by this user")


def journal_path(settings: AgentSettings) -> Journal:
    return Journal(settings.backup.backup_dir / "journal.jsonl")


# --- the backup component's service ---------------------------------------------------------------


async def build_backup_service(
    settings: AgentSettings, stores: Stores, *, journal: Journal | None, events: EventHub, clock: Clock
) -> BackupService:
    """The backup service for these settings: the daemon's at start and on reload, and the CLI's."""
    return BackupService(
        BackupConfig.from_settings(settings),
        store=await stores.get(settings.repository),
        replica=await stores.replica(settings),
        connection=connection(settings),
        drill_connection=drill_connection(settings),
        keyring=keyring(settings),
        journal=journal,
        events=events,
        clock=clock,
    )


# --- recording jobs -------------------------------------------------------------------------------


def record_jobs(jobs: JobManager, events: EventHub, *, via: str) -> None:
    """Every finished job becomes a ``JobFinished`` event, its record exactly as the journal reads it back."""

    def finished(job: Job) -> None:
        record = json.loads(json.dumps({**job.record(), "via": via}, default=str))
        events.publish(JobFinished(record))

    jobs.on_finish.append(finished)


def journal_subscriber(journal: Journal) -> Subscriber:
    """The journal keeps every finished job. Synchronous on purpose: a job's outcome must reach the journal
    even when the job was cancelled by shutdown; one small fsynced append per finished job does not stall
    the loop noticeably."""

    def on_event(event: Event) -> None:
        if isinstance(event, JobFinished):
            journal.append(dict(event.record))

    return on_event


# --- the in-process path (the CLI without a daemon) -------------------------------------------------


@dataclass
class LocalAgent:
    service: BackupService
    jobs: JobManager


def _journal_if_writable(settings: AgentSettings) -> Journal | None:
    """The agent's journal, when this user may keep it: a one-shot command by someone else (an operator
    reading with ``list``) still works, it only does not record."""
    journal = journal_path(settings)
    parent = journal.path.parent
    writable = parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    if writable and journal.path.exists():
        writable = journal.path.is_file() and os.access(journal.path, os.W_OK)
    return journal if writable else None


@asynccontextmanager
async def in_process(settings: AgentSettings, *, clock: Clock = utc_now) -> AsyncIterator[LocalAgent]:
    """What a daemon would give a command, built in this process for its duration: the same service, jobs
    under the same limits, and the same journal record of each finished job."""
    journal = _journal_if_writable(settings)
    events = EventHub()
    if journal is not None:
        events.subscribe("journal", journal_subscriber(journal))
    jobs = JobManager(
        max_parallel=settings.backup.max_parallel,
        history=settings.control.job_history,
        clock=clock,
        log_crashes=False,
    )
    record_jobs(jobs, events, via="cli")
    async with AsyncExitStack() as stack:
        stores = await stack.enter_async_context(open_stores())
        service = await build_backup_service(settings, stores, journal=journal, events=events, clock=clock)
        tg = await stack.enter_async_context(anyio.create_task_group())
        jobs.attach(tg)
        yield LocalAgent(service, jobs)
        await jobs.wait_idle(float("inf"))
