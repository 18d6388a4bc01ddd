"""The job manager's limits (kybdr_agent/jobs.py): each kind runs at most N at once and queues at most M
more; all kinds together queue at most ``max_queued``; the same work twice is a conflict; a batch is
admitted all or none; the scheduler's own submissions wait but are never refused for load.

Real anyio task groups and events; the "work" is a coroutine that waits until the test releases it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from kybdr_agent.jobs import (
    Busy,
    Conflict,
    Job,
    JobManager,
    JobStatus,
    KindLimit,
    Overloaded,
    ShuttingDown,
    Submission,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Gate:
    """Work that runs until released, recording how many run at once."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.running = 0
        self.peak = 0

    async def work(self, job: Job) -> Any:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return job.id


@asynccontextmanager
async def manager(**kwargs: Any) -> AsyncIterator[JobManager]:
    jobs = JobManager(max_parallel=kwargs.pop("max_parallel", 2), **kwargs)
    async with anyio.create_task_group() as tg:
        jobs.attach(tg)
        yield jobs
        with anyio.fail_after(10):
            await jobs.wait_idle(10)


async def settle() -> None:
    for _ in range(5):
        await anyio.sleep(0)


def submitter(jobs: JobManager, kind: str, work: Callable[[Job], Awaitable[Any]]) -> Callable[..., Job]:
    def submit(**kwargs: Any) -> Job:
        return jobs.submit(kind, work, params={}, bounded=kwargs.pop("bounded", True), **kwargs)

    return submit


@pytest.mark.anyio
async def test_a_kind_runs_its_limit_queues_its_bound_and_refuses_beyond() -> None:
    gate = Gate()
    async with manager() as jobs:
        submit = submitter(jobs, "validate", gate.work)
        accepted = [submit(key=("b", i)) for i in range(6)]  # 2 running + 4 queued
        with pytest.raises(Overloaded) as refused:
            submit(key=("b", 6))
        assert refused.value.retry_after == jobs.limit("validate").retry_after
        await settle()
        assert gate.running == 2
        assert jobs.queued() == 4
        assert sum(j.status is JobStatus.QUEUED for j in accepted) == 4
        gate.release.set()
    assert gate.peak == 2
    assert all(j.status is JobStatus.SUCCEEDED for j in accepted)


@pytest.mark.anyio
async def test_the_same_work_twice_is_a_conflict() -> None:
    gate = Gate()
    async with manager() as jobs:
        submitter(jobs, "validate", gate.work)(key=("backup-1", "full"))
        with pytest.raises(Conflict):
            submitter(jobs, "validate", gate.work)(key=("backup-1", "full"))
        submitter(jobs, "validate", gate.work)(key=("backup-1", "quick"))  # other work: fine
        submitter(jobs, "cleanup", gate.work)()
        with pytest.raises(Conflict, match="same work"):
            submitter(jobs, "cleanup", gate.work)()  # one at a time, no queue: a second one is the same work
        gate.release.set()
    # Once it has finished, the same work may run again.
    async with manager() as jobs:
        gate = Gate()
        gate.release.set()
        submitter(jobs, "cleanup", gate.work)()
        await jobs.wait_idle(5)
        submitter(jobs, "cleanup", gate.work)()


@pytest.mark.anyio
async def test_all_kinds_together_queue_at_most_max_queued() -> None:
    gate = Gate()
    limits = {"a": KindLimit(1, 5, 7), "b": KindLimit(1, 5, 9)}
    async with manager(limits=limits, max_queued=6) as jobs:
        for _ in range(4):
            submitter(jobs, "a", gate.work)()  # 1 running, 3 queued
        for _ in range(4):
            submitter(jobs, "b", gate.work)()  # 1 running, 3 queued: 6 queued in all
        with pytest.raises(Overloaded, match="waiting") as refused:
            submitter(jobs, "b", gate.work)()
        assert refused.value.retry_after == 9
        assert jobs.queued() == 6
        gate.release.set()


@pytest.mark.anyio
async def test_a_batch_is_admitted_whole_or_not_at_all() -> None:
    gate = Gate()
    async with manager() as jobs:
        jobs.submit("backup", gate.work, params={}, database="two")
        batch = [Submission(gate.work, {}, name) for name in ("one", "two", "three")]
        with pytest.raises(Busy, match="'two'"):
            jobs.submit_all("backup", batch, bounded=True)
        assert [j.database for j in jobs.all()] == ["two"]
        with pytest.raises(Busy):
            jobs.submit_all("backup", [Submission(gate.work, {}, "x"), Submission(gate.work, {}, "x")])
        too_many = [Submission(gate.work, {}, f"db{i}") for i in range(10)]  # 2 + 8 allowed, one running
        with pytest.raises(Overloaded):
            jobs.submit_all("backup", too_many, bounded=True)
        assert len(jobs.all()) == 1
        gate.release.set()


@pytest.mark.anyio
async def test_the_schedulers_submissions_wait_but_are_never_refused_for_load() -> None:
    gate = Gate()
    async with manager(max_parallel=1) as jobs:
        scheduled = [jobs.submit("backup", gate.work, params={}, database=f"db{i}") for i in range(30)]
        with pytest.raises(Overloaded):
            jobs.submit("backup", gate.work, params={}, database="from-a-request", bounded=True)
        await settle()
        assert gate.running == 1
        jobs.set_max_parallel(3)
        gate.release.set()
    assert gate.peak <= 3
    assert all(j.status is JobStatus.SUCCEEDED for j in scheduled)


@pytest.mark.anyio
async def test_nothing_is_accepted_while_stopping() -> None:
    gate = Gate()
    gate.release.set()
    async with manager() as jobs:
        jobs.stop_accepting()
        with pytest.raises(ShuttingDown):
            jobs.submit("test", gate.work, params={})
        assert jobs.all() == []


@pytest.mark.anyio
async def test_an_unknown_kind_gets_the_default_limit() -> None:
    gate = Gate()
    async with manager() as jobs:
        submit = submitter(jobs, "something-new", gate.work)
        limit = jobs.limit("something-new")
        for _ in range(limit.running + limit.queued):
            submit()
        with pytest.raises(Overloaded):
            submit()
        gate.release.set()
