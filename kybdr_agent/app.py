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
import socket
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Final

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

if TYPE_CHECKING:
    from kybdr_agent.dr.component import DRComponent
    from kybdr_agent.telemetry.component import TelemetryComponent
    from kybdr_agent.telemetry.metrics import AgentMetrics

# --- adapters -----------------------------------------------------------------------------------


RetryObserver = Callable[[str], None]
AUDIT_SHIP_SECONDS: Final = 300.0


async def _open_store(repo: RepositorySettings, on_retry: RetryObserver | None = None) -> BlobStore:
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
            on_retry=on_retry,
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

    def __init__(self, on_retry: RetryObserver | None = None) -> None:
        self._open: dict[str, BlobStore] = {}
        self._on_retry = on_retry
        self._keyrings: list[KeyRing] = []

    async def get(self, repo: RepositorySettings) -> BlobStore:
        key = json.dumps(repo.model_dump(mode="json"), sort_keys=True)
        store = self._open.get(key)
        if store is None:
            store = self._open[key] = await _open_store(repo, self._on_retry)
        return store

    async def replica(self, settings: AgentSettings) -> ReplicaStore | None:
        repo = replica_repository(settings)
        if repo is None:
            return None
        from kybdr_agent.storage.s3 import S3Store

        store = await self.get(repo)
        assert isinstance(store, S3Store)  # replica_repository only ever names an s3:// bucket
        return store

    def close_with_stores(self, ring: KeyRing) -> None:
        """Close this key ring (its KMS client) when the stores close: it lives exactly as long as they do."""
        self._keyrings.append(ring)

    async def aclose(self) -> None:
        stores, self._open = list(self._open.values()), {}
        rings, self._keyrings = self._keyrings, []
        with anyio.CancelScope(shield=True):
            for store in stores:
                await store.aclose()
            for ring in rings:
                await ring.aclose()


@asynccontextmanager
async def open_stores(on_retry: RetryObserver | None = None) -> AsyncIterator[Stores]:
    stores = Stores(on_retry)
    try:
        yield stores
    finally:
        await stores.aclose()


def keyring(settings: AgentSettings, stores: Stores | None = None) -> KeyRing | None:
    """The configured key ring, or None when there is no current key (unencrypted backups only).

    Every key file is checked as ``config check`` and ``run`` check it (``secret_files``: regular file,
    trusted owner, mode 0600/0640, 32 bytes), so a one-shot command refuses exactly what the agent would. A
    KMS key's client opens on first use; given ``stores``, the ring is closed with them (a ring made without
    them holds no client until used, and then its user closes it: ``async with ring``).
    """
    ring = secret_files.load_keyring(settings)
    if ring is not None and stores is not None:
        stores.close_with_stores(ring)
    return ring


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
        keyring=keyring(settings, stores),
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


# --- the DR component ------------------------------------------------------------------------------


def dr_connection(settings: AgentSettings, dsn: str | None) -> Connection:
    """A DR database: ``dr.password_file`` when set, else ``database.password_file`` (or the passfile)."""
    dr, db = settings.dr, settings.database
    password_file = dr.password_file or db.password_file
    return Connection.from_settings(dsn, password_file, db.pg_bin_dir, dr.probe_timeout.total_seconds())


async def open_dr(
    settings: AgentSettings, stores: Stores, *, jobs: JobManager, events: EventHub, clock: Clock
) -> DRComponent | None:
    """The DR component for ``[dr]``, or None when DR is off (its routes then answer 503).

    The component owns its prober and DNS clients (closed when it stops); the lease lives in the
    repository, next to the backups, because that is the one store every agent of a deployment shares."""
    dr = settings.dr
    if not dr.enabled:
        return None
    from kybdr_agent.dr.component import DRComponent, DRParts, lease_ttl
    from kybdr_agent.dr.executor import ExecutorConfig, StepExecutor
    from kybdr_agent.dr.history import History
    from kybdr_agent.dr.lease import DrLease
    from kybdr_agent.dr.observations import Region
    from kybdr_agent.dr.probes import Prober, ProbeTargets

    token = secret_files.peer_token(settings)
    dbs: dict[Region, Connection] = {"primary": dr_connection(settings, dr.primary_dsn)}
    if dr.standby_dsn:
        dbs["dr"] = dr_connection(settings, dr.standby_dsn)
    health: dict[Region, str] = {}
    if dr.health_check_url:
        health["primary"] = dr.health_check_url
    if dr.dr_health_check_url:
        health["dr"] = dr.dr_health_check_url
    maintenance = settings.database.maintenance_database
    timeout = dr.probe_timeout.total_seconds()
    prober = Prober(
        ProbeTargets(
            health=health,
            dbs=dbs,
            witnesses=tuple(dr.witness_urls),
            peer_url=dr.peer_url,
            peer_token=token,
            timeout=timeout,
            maintenance_database=maintenance,
        ),
        clock=clock,
    )
    dns = None
    if dr.role == "dr":
        from kybdr_agent.dr.dns import Route53Switcher

        # DRSettings refuses role "dr" without these; the checks narrow the types.
        if not (dr.route53_zone_id and dr.route53_domain and dr.load_balancer_arn and dr.dr_load_balancer_arn):
            raise ConfigError("dr.role 'dr' needs route53_zone_id, route53_domain and both load balancer ARNs")
        if not (dr.primary_region and dr.dr_region):
            raise ConfigError("dr.role 'dr' needs primary_region and dr_region")
        dns = await Route53Switcher.open(
            zone_id=dr.route53_zone_id,
            domain=dr.route53_domain,
            load_balancers={"primary": dr.load_balancer_arn, "dr": dr.dr_load_balancer_arn},
            regions={"primary": dr.primary_region, "dr": dr.dr_region},
            endpoint_url=dr.aws_endpoint_url,
            sync_timeout=dr.dns_sync_timeout.total_seconds(),
        )
    executor = StepExecutor(
        ExecutorConfig(
            databases=dbs,
            maintenance_database=maintenance,
            local_region="dr" if dr.role == "dr" else "primary",
            pgdata=dr.pgdata,
            pg_bin_dir=settings.database.pg_bin_dir,
            peer_url=dr.peer_url,
            peer_token=token,
            fence_command=tuple(dr.fence_command) if dr.fence_command else None,
            catchup_timeout=dr.catchup_timeout.total_seconds(),
            promote_timeout=dr.promote_timeout.total_seconds(),
            probe_timeout=timeout,
        ),
        dns,
    )
    state_dir = settings.backup.backup_dir / "dr"
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    repository = await stores.get(settings.repository)
    lease = None
    if dr.role == "dr":
        lease = DrLease(
            repository,
            holder=f"{socket.gethostname()}:{settings.control.socket}",
            ttl=timedelta(seconds=lease_ttl(dr)),
            clock=clock,
        )
    parts = DRParts(
        prober=prober,
        executor=executor,
        dns=dns,
        history=History(state_dir / "history.jsonl", clock=clock),
        lease=lease,
        repository=repository,
        state_path=state_dir / "state.json",
    )
    return DRComponent(settings, parts, jobs=jobs, events=events, clock=clock)


# --- the telemetry component -----------------------------------------------------------------------


async def open_telemetry(
    settings: AgentSettings, stores: Stores, *, metrics: AgentMetrics, events: EventHub, clock: Clock
) -> TelemetryComponent:
    """Metrics are always on (``GET /metrics``); CloudWatch, alerts and the audit trail as configured.
    Each observer subscribes to the hub here and brings its worker to the component."""
    from kybdr_agent.audit import AuditTrail, audit_subscriber, ship
    from kybdr_agent.telemetry.component import Periodic, TelemetryComponent, TelemetryParts

    parts = TelemetryParts(
        metrics=metrics,
        metrics_listen=settings.telemetry.metrics_listen,
        settings_snapshot={
            "telemetry": settings.telemetry.model_dump(mode="json"),
            "notify": settings.notify.model_dump(mode="json"),
        },
    )
    # The audit trail: always on. Shipped to the repository every few minutes and at shutdown, so a copy
    # exists that a person on this host cannot quietly rewrite.
    host = socket.gethostname()
    try:
        trail = AuditTrail(settings.backup.backup_dir / "audit", clock=clock, host=host)
    except OSError as exc:
        raise ConfigError(f"backup.backup_dir: cannot open the audit trail: {exc.strerror or exc}") from None
    events.subscribe("audit", audit_subscriber(trail))
    repository = await stores.get(settings.repository)

    async def ship_audit() -> int:
        return await ship(trail, repository)

    telemetry = settings.telemetry
    if telemetry.cloudwatch:
        from kybdr_agent.telemetry.cloudwatch import CloudWatchPublisher

        region = telemetry.cloudwatch_region or settings.repository.region or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise ConfigError("telemetry.cloudwatch needs telemetry.cloudwatch_region (or repository.region)")
        cloudwatch = CloudWatchPublisher(
            namespace=telemetry.cloudwatch_namespace,
            region=region,
            clock=clock,
            interval=telemetry.cloudwatch_interval.total_seconds(),
            host=host,
        )
        events.subscribe("cloudwatch", cloudwatch.on_event)
        parts.workers["cloudwatch"] = cloudwatch
    notify = settings.notify
    if notify.sns_topic_arn or notify.webhook_url:
        from kybdr_agent.notify import Notifier, NotifyConfig

        dr_lag = settings.dr.max_lag_bytes if settings.dr.enabled else None
        notifier = Notifier(
            NotifyConfig.from_settings(
                notify, webhook_token=secret_files.webhook_token(settings), dr_max_lag_bytes=dr_lag, host=host
            ),
            clock=clock,
        )
        events.subscribe("notify", notifier.on_event)
        parts.workers["notify"] = notifier
    interval = min(AUDIT_SHIP_SECONDS, settings.daemon.housekeeping_interval.total_seconds())
    parts.workers["audit_ship"] = Periodic("audit_ship", ship_audit, interval)
    parts.on_stop.append(ship_audit)
    return TelemetryComponent(parts)
