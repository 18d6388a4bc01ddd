"""The scheduler and the job manager on an injected clock: time moves only when the test moves it, so "the
slot is due", "the tick failed" and "this job finished at" are decided by the test, not by waiting.

The scheduler runs over the real backup component (its service, folder repository and the session's
cluster); the job manager's own test needs no database at all.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import pytest

from kybdr_agent.backup.component import HEARTBEAT_STALE_SECONDS
from kybdr_agent.config import AgentSettings
from kybdr_agent.errors import KybdrError
from kybdr_agent.jobs import Job, JobManager, JobStatus
from tests.component.harness import IDLE_GRACE, POLICY, T0, ManualClock, running_agent


@pytest.mark.anyio
async def test_a_due_slot_fires_exactly_one_backup_for_its_policy(
    settings: AgentSettings, clock: ManualClock, database: str
) -> None:
    """The first tick only records the slots (a new slot waits for its time instead of firing at once);
    once the clock passes 02:30 the next tick submits one backup of the policy's database, naming the policy
    and the slot; a further tick at the same time fires nothing more; the slot is kept on disk."""
    async with running_agent(settings, clock) as agent:
        component = agent.component(clock)
        scheduler = component.scheduler

        await scheduler.tick()
        assert agent.jobs.all() == []
        state = settings.backup.backup_dir / "scheduler.json"
        assert json.loads(state.read_text()) == {f"backup:{POLICY}:{database}": T0.isoformat()}

        clock.advance(timedelta(minutes=89))  # 02:29: not yet
        await scheduler.tick()
        assert agent.jobs.all() == []

        fired_at = clock.advance(timedelta(minutes=2))  # 02:31
        await scheduler.tick()
        await scheduler.tick()
        [job] = agent.jobs.all()
        slot = T0.replace(hour=2, minute=30)
        assert (job.kind, job.database) == ("backup", database)
        assert job.params == {"policy": POLICY, "slot": slot.isoformat()}
        assert job.created_at == fired_at
        assert json.loads(state.read_text()) == {f"backup:{POLICY}:{database}": slot.isoformat()}

        assert await agent.jobs.wait_idle(IDLE_GRACE)
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert job.result["labels"] == [POLICY]  # the backup carries its policy, for retention to find it
        assert datetime.fromisoformat(job.result["started_at"]) == fired_at


@pytest.mark.anyio
async def test_the_heartbeat_advances_only_after_a_tick_succeeded(
    settings: AgentSettings, tmp_path: Path, database: str
) -> None:
    """The watchdog is fed from the scheduler's heartbeat, so a scheduler whose every tick fails must look
    unhealthy however long its loop keeps running, and healthy again once a tick succeeds.

    The scheduler's clock fails on purpose (every tick reads it first). Waiting for its second read proves
    the loop went once round: the first tick has finished (failed, or succeeded) before the second begins."""
    service_clock = ManualClock()
    scheduler_clock = ManualClock()
    async with running_agent(settings, service_clock) as agent:
        component = agent.component(scheduler_clock, state_dir=tmp_path / "scheduler-state")
        scheduler = component.scheduler
        stale = time.monotonic() - HEARTBEAT_STALE_SECONDS - 5
        scheduler.heartbeat = stale
        assert not component.health().ok

        scheduler_clock.failing = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.run)
            await scheduler_clock.wait_reads(2)
            tg.cancel_scope.cancel()
        assert scheduler.heartbeat == stale
        health = component.health()
        assert not health.ok
        assert "has not completed a tick" in health.reason

        scheduler_clock.failing = False
        reads = scheduler_clock.reads
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.run)
            await scheduler_clock.wait_reads(reads + 2)
            tg.cancel_scope.cancel()
        assert scheduler.heartbeat > stale
        assert component.health().ok
        assert (tmp_path / "scheduler-state" / "scheduler.json").exists()
        assert agent.jobs.all() == []  # nothing was due: health came from the tick, not from a job


@pytest.mark.anyio
async def test_job_timestamps_come_from_the_injected_clock() -> None:
    """Created when submitted, started when it gets its slot, finished when its work returns or raises:
    three readings of the injected clock, which the test moves between them."""
    clock = ManualClock()
    jobs = JobManager(max_parallel=1, clock=clock)
    running = anyio.Event()
    release = anyio.Event()

    async def work(job: Job) -> dict[str, str]:
        running.set()
        await release.wait()
        return {"done": "yes"}

    async def fails(job: Job) -> None:
        raise KybdrError("the work failed")

    async with anyio.create_task_group() as tg:
        jobs.attach(tg)
        job = jobs.submit("cleanup", work, params={})
        clock.advance(timedelta(seconds=1))
        await running.wait()
        clock.advance(timedelta(seconds=1))
        release.set()
        assert await jobs.wait_idle(IDLE_GRACE)

        failed = jobs.submit("validate", fails, params={})
        clock.advance(timedelta(seconds=1))
        assert await jobs.wait_idle(IDLE_GRACE)

    second = timedelta(seconds=1)
    assert job.status is JobStatus.SUCCEEDED
    assert (job.created_at, job.started_at, job.finished_at) == (T0, T0 + second, T0 + 2 * second)
    assert job.record()["finished_at"] == (T0 + 2 * second).isoformat()
    assert (failed.status, failed.error) == (JobStatus.FAILED, "the work failed")
    assert (failed.created_at, failed.finished_at) == (T0 + 2 * second, T0 + 3 * second)
