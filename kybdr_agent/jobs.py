"""Long operations as jobs: one registry, bounded concurrency, one run per database at a time.

The control API answers 202 with a job id and the work runs here, under the daemon's task group, so a
shutdown can give every job a bounded grace period and then cancel it (which aborts its upload or drops
its scratch database). The registry keeps a bounded history, so memory stays flat however long the agent
runs; durable outcomes go to the journal.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import anyio
from anyio.abc import TaskGroup

from kybdr_agent.errors import KybdrError
from kybdr_agent.telemetry import get_logger

DEFAULT_HISTORY: Final = 200
log = get_logger("kybdr_agent.jobs")


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobFailed(KybdrError):
    """A job that failed with a result worth keeping (a failed validation's checks, a drill's mismatches)."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


class Busy(KybdrError):
    """The database already has a job running, or the agent is shutting down."""


@dataclass
class Progress:
    """What a running job has done so far; updated by the job, read by the API."""

    bytes_done: int = 0
    stage: str = ""


@dataclass
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    database: str | None = None
    status: JobStatus = JobStatus.QUEUED
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = None
    error: str | None = None
    progress: Progress = field(default_factory=Progress)
    done: anyio.Event = field(default_factory=anyio.Event, repr=False)
    _scope: anyio.CancelScope | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status.value,
            "database": self.database,
            "params": self.params,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "result": self.result,
            "error": self.error,
            "progress": {"bytes_done": self.progress.bytes_done, "stage": self.progress.stage},
        }


JobWork = Callable[[Job], Awaitable[Any]]


class JobManager:
    """Starts jobs in the daemon's task group; limits parallel backups; refuses a second job on one database."""

    def __init__(self, *, max_parallel: int, history: int = DEFAULT_HISTORY) -> None:
        self._limiter = anyio.CapacityLimiter(max_parallel)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._history = history
        self._busy_databases: set[str] = set()
        self._tg: TaskGroup | None = None
        self._accepting = True
        self.on_finish: list[Callable[[Job], None]] = []

    def attach(self, tg: TaskGroup) -> None:
        self._tg = tg

    def set_max_parallel(self, value: int) -> None:
        self._limiter.total_tokens = value

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(
        self, kind: str, work: JobWork, *, params: dict[str, Any], database: str | None = None, limited: bool = True
    ) -> Job:
        """Register and start a job; ``limited`` jobs share the parallel-backup limit."""
        if not self._accepting or self._tg is None:
            raise Busy("the agent is shutting down and accepts no new work")
        if database is not None and database in self._busy_databases:
            raise Busy(f"database {database!r} already has a job running; try again when it finishes")
        job = Job(id=f"job-{secrets.token_hex(6)}", kind=kind, params=params, database=database)
        if database is not None:
            self._busy_databases.add(database)
        self._jobs[job.id] = job
        self._trim()
        self._tg.start_soon(self._run, job, work, limited, name=f"{kind} {job.id}")
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return list(reversed(self._jobs.values()))

    def running(self) -> list[Job]:
        return [job for job in self._jobs.values() if not job.status.finished]

    def stop_accepting(self) -> None:
        self._accepting = False

    def cancel_all(self) -> None:
        for job in self.running():
            if job._scope is not None:
                job._scope.cancel()

    async def wait_idle(self, grace: float) -> bool:
        """Wait until no job runs, up to ``grace`` seconds; True if idle."""
        with anyio.move_on_after(grace):
            while jobs := self.running():
                await jobs[0].done.wait()
            return True
        return not self.running()

    async def _run(self, job: Job, work: JobWork, limited: bool) -> None:
        started = time.monotonic()
        try:
            with anyio.CancelScope() as scope:
                job._scope = scope
                if limited:
                    async with self._limiter:
                        await self._execute(job, work)
                else:
                    await self._execute(job, work)
            if scope.cancelled_caught:
                job.status = JobStatus.CANCELLED
                job.error = "cancelled (agent shutting down)"
        finally:
            if not job.status.finished:  # cancelled from outside its own scope
                job.status = JobStatus.CANCELLED
                job.error = job.error or "cancelled"
            job.finished_at = datetime.now(UTC)
            if job.database is not None:
                self._busy_databases.discard(job.database)
            job.done.set()
            log.info(
                "job.finished",
                job=job.id,
                kind=job.kind,
                database=job.database,
                status=job.status.value,
                seconds=round(time.monotonic() - started, 3),
                error=job.error,
            )
            for hook in self.on_finish:
                try:
                    hook(job)
                except Exception:  # a full disk under the journal must not take the agent down
                    log.exception("job.hook_failed", job=job.id)

    async def _execute(self, job: Job, work: JobWork) -> None:
        job.status = JobStatus.RUNNING
        job.started_at = datetime.now(UTC)
        try:
            job.result = await work(job)
            job.status = JobStatus.SUCCEEDED
        except KybdrError as exc:
            job.status = JobStatus.FAILED
            job.error = str(exc)
            if isinstance(exc, JobFailed):
                job.result = exc.result
        except Exception as exc:  # a bug: report it on the job, keep the agent alive
            log.exception("job.crashed", job=job.id, kind=job.kind)
            job.status = JobStatus.FAILED
            job.error = f"internal error: {type(exc).__name__}: {exc}"

    def _trim(self) -> None:
        while len(self._jobs) > self._history:
            oldest_id, oldest = next(iter(self._jobs.items()))
            if not oldest.status.finished:
                break
            del self._jobs[oldest_id]
