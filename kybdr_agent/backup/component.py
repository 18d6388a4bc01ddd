"""The backup component: the scheduler (backups and restore drills), housekeeping, and the service the
routes and the scheduler hand work to.

Its supervisors run in their own task group under the root's; its health is the scheduler's heartbeat (the
watchdog stops being fed when ticks stop succeeding) plus the last housekeeping sweep (for ``/healthz``
and ``status``). A reload gets a new service from the root's builder — new keys, connections and
configuration — and the next job uses it; jobs already running finish with the service they started with.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus

from kybdr_agent.backup import verbs
from kybdr_agent.backup.scheduler import Scheduler
from kybdr_agent.backup.service import BackupService
from kybdr_agent.backup.stats import DaemonStats
from kybdr_agent.clock import Clock
from kybdr_agent.component import Health
from kybdr_agent.config import AgentSettings
from kybdr_agent.errors import KybdrError
from kybdr_agent.jobs import JobManager
from kybdr_agent.telemetry import get_logger

HEARTBEAT_STALE_SECONDS: Final = 30.0
log = get_logger("kybdr_agent.backup")


class BackupComponent:
    name = "backup"

    def __init__(
        self,
        service: BackupService,
        jobs: JobManager,
        *,
        stats: DaemonStats | None,
        state_dir: Path,
        clock: Clock,
        rebuild: Callable[[AgentSettings], Awaitable[BackupService]],
    ) -> None:
        self.service = service
        self.jobs = jobs
        self.stats = stats
        self.clock = clock
        self._rebuild = rebuild
        self.scheduler = Scheduler(lambda: self.service, jobs, state_dir / "scheduler.json", clock)
        self.housekeeping: dict[str, Any] = {}  # the last sweep's outcome, for /healthz and status

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.scheduler.run, name="scheduler")
            tg.start_soon(self._housekeeping_loop, name="housekeeping")
            task_status.started()

    def health(self) -> Health:
        age = time.monotonic() - self.scheduler.heartbeat
        ok = age < HEARTBEAT_STALE_SECONDS
        return Health(
            ok=ok,
            fields={"housekeeping": self.housekeeping},
            reason="" if ok else f"the scheduler has not completed a tick for {age:.0f} s",
        )

    async def reload(self, settings: AgentSettings) -> None:
        self.service = await self._rebuild(settings)
        self.jobs.set_max_parallel(self.service.config.backup.max_parallel)

    async def sweep_once(self) -> None:
        """Dead backups' leftovers (at once) and dead scratch databases; the outcome is kept for status."""
        config = self.service.config
        try:
            busy = frozenset(job.database for job in self.jobs.running() if job.kind == "backup" and job.database)
            swept = await self.service.sweep(config.sweep_older_than, busy, databases=True)
            self.housekeeping = {"at": self.clock().isoformat(), **swept}
            if swept.get("scratch_not_dropped"):
                log.warning("housekeeping.scratch_not_dropped", databases=swept["scratch_not_dropped"])
            log.info("housekeeping.sweep", **swept)
        except KybdrError as exc:
            self.housekeeping = {"at": self.clock().isoformat(), "error": str(exc)}
            log.warning("housekeeping.sweep_failed", error=str(exc))
        except Exception:  # keep the agent (and its running backups) alive; the next round retries
            log.exception("housekeeping.sweep_crashed")
        await self.backfill_once()
        await self.observe_once()

    async def backfill_once(self) -> None:
        """Copy to the DR bucket what an outage left uncopied (``BackupService.backfill``), a bounded batch
        per tick; only when cross-region copies are configured."""
        service = self.service
        if service.replica is None or not service.config.backup.cross_region:
            return
        try:
            done = await service.backfill(skip_databases=verbs.busy_databases(self.jobs))
            self.housekeeping = {**self.housekeeping, "backfill": done}
            if done["copied"] or done["failed"]:
                log.info("housekeeping.backfill", **done)
        except KybdrError as exc:
            self.housekeeping = {**self.housekeeping, "backfill_error": str(exc)}
            log.warning("housekeeping.backfill_failed", error=str(exc))
        except Exception:
            log.exception("housekeeping.backfill_crashed")

    async def observe_once(self) -> None:
        """Freshness of every covered database and the repository's free space, published for metrics,
        CloudWatch and alerts on every tick (so the BackupAgeSeconds alarm always has data)."""
        try:
            await self.service.observe()
        except KybdrError as exc:
            self.housekeeping = {**self.housekeeping, "observe_error": str(exc)}
            log.warning("housekeeping.observe_failed", error=str(exc))
        except Exception:
            log.exception("housekeeping.observe_crashed")

    async def _housekeeping_loop(self) -> None:
        while True:
            await self.sweep_once()
            await anyio.sleep(self.service.config.housekeeping_interval.total_seconds())
