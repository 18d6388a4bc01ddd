"""The scheduler loop: every tick, fire the slots ``slots.decide_tick`` says are due, as jobs.

A physical policy's slot submits a base backup of the cluster (``verbs.submit_physical_backup``). The last
run of each slot is kept in ``scheduler.json`` beside the journal, so a slot missed while the
agent was down runs once at start. A slot whose database already has a job is skipped (the next slot will
run). The heartbeat the watchdog reads is stamped only after a tick succeeded: a tick that fails every
time (a bug, a full disk under the state file) must starve the watchdog, not feed it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import anyio

from kybdr_agent.backup.service import BackupOverrides, BackupService
from kybdr_agent.backup.slots import Slot, decide_tick
from kybdr_agent.backup.verbs import submit_backups, submit_drill, submit_physical_backup
from kybdr_agent.clock import Clock
from kybdr_agent.jobs import Busy, JobManager
from kybdr_agent.telemetry import get_logger

TICK_SECONDS: Final = 0.5
log = get_logger("kybdr_agent.scheduler")


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


class Scheduler:
    def __init__(self, service: Callable[[], BackupService], jobs: JobManager, state_path: Path, clock: Clock) -> None:
        self._service = service
        self._jobs = jobs
        self._state = ScheduleState(state_path)
        self._clock = clock
        self.heartbeat = time.monotonic()  # the last tick that succeeded

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bug or a full disk must not stop every future backup: log, try next tick
                log.exception("schedule.tick_failed")
            else:
                self.heartbeat = time.monotonic()
            await anyio.sleep(TICK_SECONDS)

    async def tick(self) -> None:
        service = self._service()
        decided = decide_tick(service.config.slots(), self._state.last, self._clock())
        for slot, due in decided.fire:
            self._start(service, slot, due)
        # Recorded in memory even if the file cannot be written: a slot that fired must not fire again.
        self._state.last = decided.last
        if decided.changed:
            await anyio.to_thread.run_sync(self._state.save)

    def _start(self, service: BackupService, slot: Slot, due: datetime) -> None:
        try:
            if slot.kind == "backup":
                assert slot.database is not None
                overrides = BackupOverrides(labels=(slot.policy or "scheduled",))
                params: dict[str, Any] = {"policy": slot.policy, "slot": due.isoformat()}
                job = submit_backups(self._jobs, service, [slot.database], overrides, params=params, bounded=False)[0]
            elif slot.kind == "physical":
                overrides = BackupOverrides(labels=(slot.policy or "scheduled",))
                params = {"policy": slot.policy, "slot": due.isoformat(), "physical": True}
                job = submit_physical_backup(self._jobs, service, overrides, params=params, bounded=False)
            else:
                job = submit_drill(self._jobs, service, None, params={"slot": due.isoformat()}, bounded=False)
            log.info("schedule.fired", slot=slot.key, due=due.isoformat(), job=job.id)
        except Busy as exc:
            # No two runs for one database at once: this slot is skipped, the next one will run.
            log.warning("schedule.skipped", slot=slot.key, due=due.isoformat(), reason=str(exc))
