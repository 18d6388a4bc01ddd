"""``kybdr-agent run``: the long-running agent. With ``app`` it is the composition root: ``app`` builds the
adapters and the backup service; this module assembles the components, owns the root task group, the
control server, signals and systemd notifications.

Under one task group: the control server, every component's supervisors (the backup component's scheduler
and housekeeping), and the systemd watchdog, fed only while every component reports itself healthy.
READY=1 is sent once the control socket listens and every component has reported its supervisors up. SIGTERM stops
taking work, gives running jobs ``daemon.shutdown_grace_seconds``, then cancels them (which aborts their
uploads and drops scratch databases) and exits 0. SIGHUP re-reads the configuration; an invalid one is
logged and the running one kept.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pwd
import signal
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
from aiohttp import web

from kybdr_agent import __version__, app, sdnotify
from kybdr_agent.backup.component import BackupComponent
from kybdr_agent.backup.routes import backup_routes
from kybdr_agent.backup.service import BackupService
from kybdr_agent.backup.settings import BackupConfig
from kybdr_agent.backup.slots import next_wakeups
from kybdr_agent.backup.stats import DaemonStats
from kybdr_agent.clock import Clock, utc_now
from kybdr_agent.component import Component, Health
from kybdr_agent.config import AgentSettings, load_settings
from kybdr_agent.control.client import check_socket_location
from kybdr_agent.control.routes import RouteTable
from kybdr_agent.control.server import ControlContext, Role, build_app
from kybdr_agent.dr.routes import dr_routes
from kybdr_agent.errors import ConfigError, KybdrError
from kybdr_agent.events import EventHub
from kybdr_agent.jobs import JobManager
from kybdr_agent.secret_files import check_all as check_secret_files
from kybdr_agent.secret_files import load_tokens, trusted_owners
from kybdr_agent.telemetry import get_logger
from kybdr_agent.telemetry.metrics import AgentMetrics
from kybdr_agent.telemetry.routes import metrics_routes
from kybdr_agent.telemetry.tracing import configure_tracing
from kybdr_agent.wal.component import WalComponent
from kybdr_agent.wal.routes import WalPushTarget, wal_routes
from kybdr_agent.wal.status_routes import wal_status_routes

# A burst of clients larger than aiohttp's default 128 would see EAGAIN on a unix socket (a refused
# connect, not a wait); the kernel caps this at net.core.somaxconn.
CONTROL_BACKLOG: Final = 1024

log = get_logger("kybdr_agent.daemon")


def _tokens(settings: AgentSettings) -> tuple[dict[str, Role], dict[str, str]]:
    """The control tokens (token → role), each file checked like every secret (mode, owner, UTF-8,
    length), and who each one is (token → name) for the audit trail."""
    entries = settings.control.tokens
    tokens = load_tokens([(t.role, t.token_file) for t in entries], trusted_owners(settings.daemon.service_user))
    # load_tokens keeps the entries' order and refuses duplicates, so the two lists line up.
    return tokens, {token: entry.caller for token, entry in zip(tokens, entries, strict=True)}


def _wal_push_uids(settings: AgentSettings) -> frozenset[int]:
    """PostgreSQL's OS user in archive_command mode (``wal.push_user``): the socket's group lets it connect to
    hand over WAL, and that is all it may do there. No such user: nobody is limited (it cannot connect)."""
    if not (settings.wal.enabled and settings.wal.mode == "archive_command"):
        return frozenset()
    try:
        return frozenset({pwd.getpwnam(settings.wal.push_user).pw_uid})
    except KeyError:
        log.warning("wal.push_user_unknown", user=settings.wal.push_user)
        return frozenset()


# --- the control socket -------------------------------------------------------------------------


def _claim_socket_path(path: Path, owners: frozenset[int]) -> None:
    """A socket file left by a crashed agent is removed; one a live agent answers on is an error;
    anything else at that path (a file, a symlink) is never touched.

    The directory is checked first (``check_socket_location``): in a directory others may write, "another
    agent is already listening" would be whoever got there first, and removing or reusing the name there
    would race them."""
    check_socket_location(path, owners)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"control.socket {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ConfigError(f"another agent is already listening on {path}")


async def start_control(ctx: ControlContext, settings: AgentSettings, tables: list[RouteTable]) -> web.AppRunner:
    control = settings.control
    owners = trusted_owners(settings.daemon.service_user)
    path = control.socket
    check_socket_location(path, owners)  # before anything is created
    runner = web.AppRunner(build_app(ctx, tables), handle_signals=False, access_log=None)
    await runner.setup()
    listening = f"cannot listen on {path}"
    bound = False
    try:
        # Owner-only: a directory the agent creates must pass the same check it just made of its parent.
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        _claim_socket_path(path, owners)
        # The socket is created with the umask's mode: make that as strict as the target mode, so there
        # is no moment at which it is more open than configured.
        old_umask = os.umask(0o777 & ~control.socket_mode)
        try:
            await web.UnixSite(runner, str(path), backlog=CONTROL_BACKLOG).start()
            bound = True
        finally:
            os.umask(old_umask)
        os.chmod(path, control.socket_mode)
        if control.tcp_listen:
            listening = f"control.tcp_listen {control.tcp_listen}: cannot listen"
            host, _, port = control.tcp_listen.rpartition(":")
            await web.TCPSite(runner, host.strip("[]"), int(port), backlog=CONTROL_BACKLOG).start()
    except BaseException as exc:
        await runner.cleanup()
        if bound:  # the socket file is ours: a refused start leaves no stale socket behind
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(exc, OSError):
            raise ConfigError(f"{listening}: {exc.strerror or exc}") from None
        if isinstance(exc, ValueError):  # a host getaddrinfo/IDNA refuses (UnicodeError, a ValueError: too long)
            raise ConfigError(f"{listening}: {exc}") from None
        raise
    log.info("control.listening", socket=str(path), tcp=control.tcp_listen)
    return runner


# --- lifecycle ----------------------------------------------------------------------------------


@dataclass
class Agent:
    """The running agent: what a reload swaps (settings, tokens) and the components it supervises."""

    config_path: Path | None
    settings: AgentSettings
    ctx: ControlContext
    components: list[Component]

    def health(self) -> list[tuple[Component, Health]]:
        return [(component, component.health()) for component in self.components]

    def healthy(self) -> bool:
        """For the watchdog: every component healthy (the backup scheduler's ticks succeeding)."""
        unhealthy = [(c.name, h.reason) for c, h in self.health() if not h.ok]
        if unhealthy:
            log.warning("agent.unhealthy", components=dict(unhealthy))
        return not unhealthy

    def health_fields(self) -> dict[str, Any]:
        """``/healthz``'s component part: each component's fields, and which components are healthy."""
        fields: dict[str, Any] = {}
        states: dict[str, str] = {}
        for component, health in self.health():
            fields.update(health.fields)
            states[component.name] = "ok" if health.ok else f"unhealthy: {health.reason}"
        return {**fields, "components": states}

    async def reload(self) -> None:
        try:
            settings = load_settings(self.config_path)
            check_secret_files(settings)  # a reload must not swap in keys or passwords start-up would refuse
            tokens, token_names = _tokens(settings)
        except ConfigError as exc:
            log.warning("config.reload_rejected", error=str(exc), note="keeping the running configuration")
            sdnotify.status(f"reload rejected: {exc}"[:200])
            return
        if settings.control.socket != self.settings.control.socket or (
            settings.control.tcp_listen != self.settings.control.tcp_listen
        ):
            log.warning("config.reload_listen_unchanged", note="listen addresses change only on restart")
        try:
            for component in self.components:
                await component.reload(settings)
        except KybdrError as exc:
            log.warning("config.reload_failed", error=str(exc), note="components not yet reloaded keep theirs")
            sdnotify.status(f"reload failed: {exc}"[:200])
            return
        self.settings = settings
        self.ctx.tokens = tokens
        self.ctx.token_names = token_names
        self.ctx.max_body_bytes = settings.control.max_body_bytes
        log.info("config.reloaded", path=str(self.config_path))


async def run_daemon(config_path: Path | None, now: Clock = utc_now) -> int:
    settings = load_settings(config_path)
    # Every secret file is read and checked before anything else happens: a key, password or token that
    # would fail every backup (or leak) stops the start here, with exit 78, not at 02:00 after READY=1.
    check_secret_files(settings)
    check_socket_location(settings.control.socket, trusted_owners(settings.daemon.service_user))
    app.check_state_dir(settings)
    journal = app.journal_path(settings)
    events = EventHub()
    events.subscribe("journal", app.journal_subscriber(journal))
    # Outcome statistics from memory, built once from the journal and updated as jobs finish (not re-read
    # from the journal on every GET /v1/backup/stats); after the journal: same record, same order.
    stats = await DaemonStats.load(journal)
    events.subscribe("stats", stats.on_event)
    # Metrics after the journal too; their "last success" gauges start from what the journal remembers
    # (the repository's view follows at the first housekeeping tick).
    metrics = AgentMetrics()
    await anyio.to_thread.run_sync(metrics.rebuild_from_journal, journal.records())
    events.subscribe("metrics", metrics.on_event)
    configure_tracing(settings.telemetry.otlp_endpoint, version=__version__)
    jobs = JobManager(max_parallel=settings.backup.max_parallel, history=settings.control.job_history, clock=now)
    app.record_jobs(jobs, events, via="agent")
    metrics.watch_jobs(lambda: collections.Counter(job.kind for job in jobs.running()))

    async with app.open_stores(on_retry=metrics.storage_retry) as stores:

        async def build(new: AgentSettings) -> BackupService:
            return await app.build_backup_service(new, stores, journal=journal, events=events, clock=now)

        backup = BackupComponent(
            await build(settings),
            jobs,
            stats=stats,
            state_dir=settings.backup.backup_dir,
            clock=now,
            rebuild=build,
        )
        dr = await app.open_dr(settings, stores, jobs=jobs, events=events, clock=now)
        if dr is not None:
            metrics.watch_dr(dr.phase)
        telemetry = await app.open_telemetry(settings, stores, metrics=metrics, events=events, clock=now)
        components: list[Component] = [backup] if dr is None else [backup, dr]
        components.append(telemetry)
        wal = await _open_wal(settings, stores, metrics=metrics, events=events, clock=now)
        if wal is not None:
            components.append(wal)
        tokens, token_names = _tokens(settings)
        ctx = ControlContext(
            jobs=jobs,
            tokens=tokens,
            token_names=token_names,
            max_body_bytes=settings.control.max_body_bytes,
            events=events,
            clock=now,
            wal_push_uids=_wal_push_uids(settings),
        )
        agent = Agent(config_path, settings, ctx, components)
        ctx.health = agent.health_fields
        tables = [backup_routes(backup), dr_routes(dr), metrics_routes(metrics), wal_status_routes(wal)]
        if wal is not None and settings.wal.mode == "archive_command":
            target = WalPushTarget(
                spool_dir=wal.spool_dir,
                max_spool_bytes=settings.wal.max_spool_bytes,
                segment_size=wal.segment_size,
                on_spooled=wal.wake,
            )
            tables.append(wal_routes(target))
        runner = await start_control(ctx, settings, tables)
        try:
            await _supervise(agent, jobs, now)
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
                with contextlib.suppress(OSError):
                    agent.settings.control.socket.unlink(missing_ok=True)
    log.info("agent.stopped")
    return 0


async def _open_wal(
    settings: AgentSettings, stores: app.Stores, *, metrics: AgentMetrics, events: EventHub, clock: Clock
) -> WalComponent | None:
    """The WAL component when ``[wal] enabled``: the repository's store and the backups' key ring, its spool
    check published on the event hub (the ``wal_spool_full`` alert), its figures read by the metrics."""
    if not settings.wal.enabled:
        return None
    wal = WalComponent(
        settings,
        store=await stores.get(settings.repository),
        keyring=app.keyring(settings, stores),
        connection=app.connection(settings),
        clock=clock,
        publish=events.publish,
    )
    metrics.watch_wal(wal.metrics)
    return wal


async def _supervise(agent: Agent, jobs: JobManager, now: Clock) -> None:
    """Start every component's supervisors (each reports when it is up), say READY=1, then serve signals."""
    async with anyio.create_task_group() as tg:
        jobs.attach(tg)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            for component in agent.components:
                await tg.start(component.run, name=component.name)
            interval = sdnotify.watchdog_interval()
            if interval:
                tg.start_soon(sdnotify.watchdog_loop, interval, agent.healthy, name="watchdog")
            sdnotify.ready(f"kybdr-agent {__version__}: listening on {agent.settings.control.socket}")
            log.info(
                "agent.ready",
                version=__version__,
                pid=os.getpid(),
                next_runs=next_wakeups(BackupConfig.from_settings(agent.settings).slots(), now()),
            )
            async for signum in signals:
                if signum == signal.SIGHUP:
                    sdnotify.reloading(sdnotify.monotonic_now_usec())
                    await agent.reload()
                    sdnotify.ready("configuration reloaded")
                    continue
                log.info("agent.stopping", signal=signal.Signals(signum).name)
                break
        await _shutdown(agent.settings, jobs)
        tg.cancel_scope.cancel()


async def _shutdown(settings: AgentSettings, jobs: JobManager) -> None:
    sdnotify.stopping()
    jobs.stop_accepting()
    grace = settings.daemon.shutdown_grace_seconds
    running = jobs.running()
    if running:
        sdnotify.status(f"stopping: waiting up to {grace:g} s for {len(running)} job(s)")
        log.info("agent.draining", jobs=[job.id for job in running], grace_seconds=grace)
    if not await jobs.wait_idle(grace):
        log.warning("agent.cancelling_jobs", jobs=[job.id for job in jobs.running()])
        jobs.cancel_all()
        with anyio.CancelScope(shield=True):
            await jobs.wait_idle(120)
