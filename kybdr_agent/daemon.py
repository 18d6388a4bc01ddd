"""``kybdr-agent run``: the long-running agent. The composition root: it alone builds the adapters, owns
the root task group and handles signals.

Supervisors under one task group: the control server, the scheduler (backups and restore drills), the
housekeeping sweep and the systemd watchdog. READY=1 is sent once the control socket listens. SIGTERM stops
taking work, gives running jobs ``daemon.shutdown_grace_seconds``, then cancels them (which aborts their
uploads and drops scratch databases) and exits 0. SIGHUP re-reads the configuration; an invalid one is
logged and the running one kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import anyio
from aiohttp import web

from kybdr_agent import __version__, sdnotify, wiring
from kybdr_agent.backup.schedule import CronSpec, jitter, missed_run, next_run
from kybdr_agent.backup.service import BackupOverrides, BackupService
from kybdr_agent.config import AgentSettings, load_settings
from kybdr_agent.control.client import check_socket_location
from kybdr_agent.control.server import ControlContext, Role, build_app
from kybdr_agent.errors import ConfigError, KybdrError
from kybdr_agent.jobs import Busy, Job, JobFailed, JobManager
from kybdr_agent.journal import Journal
from kybdr_agent.secret_files import check_all as check_secret_files
from kybdr_agent.secret_files import load_tokens, trusted_owners
from kybdr_agent.telemetry import get_logger

# A burst of clients larger than aiohttp's default 128 would see EAGAIN on a unix socket (a refused
# connect, not a wait); the kernel caps this at net.core.somaxconn.
CONTROL_BACKLOG: Final = 1024

TICK_SECONDS: Final = 0.5
HEARTBEAT_STALE_SECONDS: Final = 30.0
log = get_logger("kybdr_agent.daemon")


def _tokens(settings: AgentSettings) -> dict[str, Role]:
    """The control tokens, each file checked like every secret (mode, owner, UTF-8, length)."""
    return load_tokens(
        [(t.role, t.token_file) for t in settings.control.tokens], trusted_owners(settings.daemon.service_user)
    )


@dataclass
class AgentState:
    """What a reload swaps: the settings, and the service and tokens built from them."""

    config_path: Path | None
    settings: AgentSettings
    journal: Journal
    service: BackupService = field(init=False)
    heartbeat: float = field(default_factory=time.monotonic)
    housekeeping: dict[str, Any] = field(default_factory=dict)  # the last sweep's outcome, for status

    def __post_init__(self) -> None:
        self.service = BackupService(self.settings, journal=self.journal)


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


async def start_control(ctx: ControlContext, settings: AgentSettings) -> web.AppRunner:
    control = settings.control
    owners = trusted_owners(settings.daemon.service_user)
    path = control.socket
    check_socket_location(path, owners)  # before anything is created
    runner = web.AppRunner(build_app(ctx), handle_signals=False, access_log=None)
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


# --- the scheduler ------------------------------------------------------------------------------


class ScheduleState:
    """The last slot each (policy, database) ran for, kept on disk so downtime can be made up once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: dict[str, datetime] = {}
        try:
            raw = json.loads(path.read_text())
            self.last = {key: datetime.fromisoformat(value) for key, value in raw.items()}
        except (OSError, ValueError, AttributeError, TypeError):
            self.last = {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps({key: value.isoformat() for key, value in self.last.items()}))
        os.replace(temp, self.path)


@dataclass(frozen=True)
class Slot:
    key: str
    kind: str  # "backup" or "test"
    spec: CronSpec
    tz: ZoneInfo
    jitter_seconds: float
    policy: str | None = None
    database: str | None = None


def planned_slots(settings: AgentSettings) -> list[Slot]:
    slots: list[Slot] = []
    if settings.backup.enabled:
        for policy in settings.effective_policies():
            for database in policy.databases:
                slots.append(
                    Slot(
                        f"backup:{policy.name}:{database}",
                        "backup",
                        CronSpec.parse(policy.schedule),
                        ZoneInfo(policy.timezone),
                        policy.jitter_seconds,
                        policy.name,
                        database,
                    )
                )
    if settings.drill.schedule:
        slots.append(
            Slot("test:all", "test", CronSpec.parse(settings.drill.schedule), ZoneInfo(settings.drill.timezone), 0.0)
        )
    return slots


def due_slot(slot: Slot, last: datetime | None, now: datetime) -> datetime | None:
    """The slot to run now, if any: the latest one (jitter applied) since ``last``."""
    offset = jitter(now, slot.jitter_seconds, slot.key) - now
    return missed_run(slot.spec, last, now - offset, slot.tz)


async def scheduler_loop(state: AgentState, jobs: JobManager, now: Callable[[], datetime]) -> None:
    schedule = ScheduleState(state.settings.backup.backup_dir / "scheduler.json")
    while True:
        state.heartbeat = time.monotonic()
        try:
            await _schedule_tick(state, jobs, schedule, now())
        except Exception:  # a bug or a full disk must not stop every future backup: log, try next tick
            log.exception("schedule.tick_failed")
        await anyio.sleep(TICK_SECONDS)


async def _schedule_tick(state: AgentState, jobs: JobManager, schedule: ScheduleState, current: datetime) -> None:
    changed = False
    for slot in planned_slots(state.settings):
        last = schedule.last.get(slot.key)
        if last is None:
            schedule.last[slot.key] = current  # a new slot waits for its next time
            changed = True
            continue
        due = due_slot(slot, last, current)
        if due is None:
            continue
        schedule.last[slot.key] = due
        changed = True
        _start_scheduled(state, jobs, slot, due)
    if changed:
        await anyio.to_thread.run_sync(schedule.save)


def _start_scheduled(state: AgentState, jobs: JobManager, slot: Slot, due: datetime) -> None:
    service = state.service
    try:
        if slot.kind == "backup":
            assert slot.database is not None
            database = slot.database
            overrides = BackupOverrides(labels=(slot.policy or "scheduled",))

            async def work(job: Job) -> Any:
                made = await service.backup(database, overrides, progress=job.progress)
                return {**made.model_dump(mode="json"), "part_count": made.part_count}

            job = jobs.submit(
                "backup", work, params={"policy": slot.policy, "slot": due.isoformat()}, database=database
            )
        else:

            async def work(job: Job) -> Any:
                results = await service.drill(None)
                failed = [r for r in results if not r.get("passed")]
                if failed:
                    message = "restore drill failed: " + "; ".join(str(r.get("error")) for r in failed)
                    raise JobFailed(message, {"drills": results})
                return {"drills": results}

            job = jobs.submit("test", work, params={"slot": due.isoformat()})
        log.info("schedule.fired", slot=slot.key, due=due.isoformat(), job=job.id)
    except Busy as exc:
        # No two runs for one database at once: this slot is skipped, the next one will run.
        log.warning("schedule.skipped", slot=slot.key, due=due.isoformat(), reason=str(exc))


def next_wakeups(settings: AgentSettings, now: datetime) -> dict[str, str]:
    return {slot.key: next_run(slot.spec, now, slot.tz).isoformat() for slot in planned_slots(settings)}


# --- housekeeping -------------------------------------------------------------------------------


async def housekeeping_loop(state: AgentState, jobs: JobManager) -> None:
    """Sweep at start and on every tick: dead backups' leftovers at once, and dead scratch databases."""
    while True:
        try:
            busy = frozenset(job.database for job in jobs.running() if job.kind == "backup" and job.database)
            swept = await state.service.sweep(state.settings.daemon.sweep_older_than, busy, databases=True)
            state.housekeeping = {"at": datetime.now(UTC).isoformat(), **swept}
            if swept.get("scratch_not_dropped"):
                log.warning("housekeeping.scratch_not_dropped", databases=swept["scratch_not_dropped"])
            log.info("housekeeping.sweep", **swept)
        except KybdrError as exc:
            state.housekeeping = {"at": datetime.now(UTC).isoformat(), "error": str(exc)}
            log.warning("housekeeping.sweep_failed", error=str(exc))
        except Exception:  # keep the agent (and its running backups) alive; the next round retries
            log.exception("housekeeping.sweep_crashed")
        await anyio.sleep(state.settings.daemon.housekeeping_interval.total_seconds())


# --- lifecycle ----------------------------------------------------------------------------------


def _job_record(job: Job) -> dict[str, Any]:
    record = job.to_json()
    record.pop("progress", None)
    return record


def _reload(state: AgentState, ctx: ControlContext, jobs: JobManager) -> None:
    try:
        settings = load_settings(state.config_path)
        check_secret_files(settings)  # a reload must not swap in keys or passwords that start-up would refuse
        tokens = _tokens(settings)
    except ConfigError as exc:
        log.warning("config.reload_rejected", error=str(exc), note="keeping the running configuration")
        sdnotify.status(f"reload rejected: {exc}"[:200])
        return
    if settings.control.socket != state.settings.control.socket or (
        settings.control.tcp_listen != state.settings.control.tcp_listen
    ):
        log.warning("config.reload_listen_unchanged", note="listen addresses change only on restart")
    state.settings = settings
    state.service = BackupService(settings, journal=state.journal)
    ctx.tokens = tokens
    jobs.set_max_parallel(settings.backup.max_parallel)
    log.info("config.reloaded", path=str(state.config_path))


async def run_daemon(config_path: Path | None, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> int:
    settings = load_settings(config_path)
    # Every secret file is read and checked before anything else happens: a key, password or token that
    # would fail every backup (or leak) stops the start here, with exit 78, not at 02:00 after READY=1.
    check_secret_files(settings)
    check_socket_location(settings.control.socket, trusted_owners(settings.daemon.service_user))
    wiring.check_state_dir(settings)
    journal = Journal(settings.backup.backup_dir / "journal.jsonl")
    state = AgentState(config_path, settings, journal)
    jobs = JobManager(max_parallel=settings.backup.max_parallel, history=settings.control.job_history)
    from kybdr_agent.backup.stats import DaemonStats

    # Outcome statistics from memory, built once from the journal and updated as jobs finish (not re-read
    # from the journal on every GET /v1/backup/stats).
    stats = await DaemonStats.load(journal)
    ctx = ControlContext(
        service=lambda: state.service,
        jobs=jobs,
        tokens=_tokens(settings),
        max_body_bytes=settings.control.max_body_bytes,
        stats=stats,
        housekeeping=lambda: state.housekeeping,
    )

    runner = await start_control(ctx, settings)
    async with anyio.create_task_group() as tg:
        jobs.attach(tg)
        # Synchronous on purpose: a job's outcome must reach the journal even when the job was cancelled
        # by shutdown; one small fsynced append per finished job does not stall the loop noticeably.
        jobs.on_finish.append(lambda job: journal.append(_job_record(job)))
        jobs.on_finish.append(stats.job_finished)  # after the journal append: same record, same order
        try:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                tg.start_soon(scheduler_loop, state, jobs, now, name="scheduler")
                tg.start_soon(housekeeping_loop, state, jobs, name="housekeeping")
                interval = sdnotify.watchdog_interval()
                if interval:
                    tg.start_soon(
                        sdnotify.watchdog_loop,
                        interval,
                        lambda: time.monotonic() - state.heartbeat < HEARTBEAT_STALE_SECONDS,
                        name="watchdog",
                    )
                sdnotify.ready(f"kybdr-agent {__version__}: listening on {settings.control.socket}")
                log.info("agent.ready", version=__version__, pid=os.getpid(), next_runs=next_wakeups(settings, now()))
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        sdnotify.reloading(sdnotify.monotonic_now_usec())
                        _reload(state, ctx, jobs)
                        sdnotify.ready("configuration reloaded")
                        continue
                    log.info("agent.stopping", signal=signal.Signals(signum).name)
                    break
            await _shutdown(state, jobs)
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
                with contextlib.suppress(OSError):
                    state.settings.control.socket.unlink(missing_ok=True)
            tg.cancel_scope.cancel()
    log.info("agent.stopped")
    return 0


async def _shutdown(state: AgentState, jobs: JobManager) -> None:
    sdnotify.stopping()
    jobs.stop_accepting()
    grace = state.settings.daemon.shutdown_grace_seconds
    running = jobs.running()
    if running:
        sdnotify.status(f"stopping: waiting up to {grace:g} s for {len(running)} job(s)")
        log.info("agent.draining", jobs=[job.id for job in running], grace_seconds=grace)
    if not await jobs.wait_idle(grace):
        log.warning("agent.cancelling_jobs", jobs=[job.id for job in jobs.running()])
        jobs.cancel_all()
        with anyio.CancelScope(shield=True):
            await jobs.wait_idle(120)
