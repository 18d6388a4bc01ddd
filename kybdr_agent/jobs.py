"""Long operations as jobs: one registry, bounded concurrency and bounded queues per kind of job, one run
per database at a time.

The control API answers 202 with a job id and the work runs here, under the daemon's task group, so a
shutdown can give every job a bounded grace period and then cancel it (which aborts its upload or drops
its scratch database). The registry keeps a bounded history, so memory stays flat however long the agent
runs; durable outcomes go to the journal.

Why limits per kind: one operator token could otherwise start any number of full validations at once
(each holds decode buffers and a pg_restore: 60 of them took the agent from 65 MB to 908 MB) or thousands
of identical cleanups. Each kind runs at most ``running`` jobs at once and keeps at most ``queued`` more
waiting; all kinds together keep at most ``MAX_QUEUED_TOTAL`` waiting. A request beyond that is refused
with a hint of when to retry (``Overloaded``: HTTP 429); a request for work that is already queued or
running — a second cleanup, the same validation again — is refused as a conflict (``Conflict``: 409).
"""

from __future__ import annotations

import ctypes
import enum
import functools
import gc
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import anyio
from anyio.abc import TaskGroup

from kybdr_agent.clock import Clock, utc_now
from kybdr_agent.errors import KybdrError
from kybdr_agent.telemetry import get_logger
from kybdr_agent.telemetry.context import current_job_id, current_job_kind
from kybdr_agent.telemetry.tracing import stage

DEFAULT_HISTORY: Final = 200
log = get_logger("kybdr_agent.jobs")


@dataclass(frozen=True)
class KindLimit:
    """How many jobs of one kind may run at once, how many more may wait, and the retry hint beyond that."""

    running: int
    queued: int
    retry_after: int  # seconds, sent as Retry-After when a request is refused


# Named limits (not configuration yet; see the module docstring for why each is what it is). Backups run
# ``backup.max_parallel`` at once (``running`` below is replaced by it) and are also limited to one per
# database; a few more may queue. Full validations hold decode buffers and a pg_restore each: two at once.
# A restore writes a whole database: one at a time, two waiting. Cleanup and restore drills each do the
# same work whoever asks: one at a time and none waiting (a second request is a conflict, not a queue).
KIND_LIMITS: Final[dict[str, KindLimit]] = {
    "backup": KindLimit(running=2, queued=8, retry_after=60),
    "validate": KindLimit(running=2, queued=4, retry_after=30),
    "restore": KindLimit(running=1, queued=2, retry_after=60),
    "cleanup": KindLimit(running=1, queued=0, retry_after=30),
    "test": KindLimit(running=1, queued=0, retry_after=60),
    "backfill": KindLimit(running=1, queued=0, retry_after=60),
}
OTHER_KIND_LIMIT: Final = KindLimit(running=1, queued=2, retry_after=30)
MAX_QUEUED_TOTAL: Final = 16  # jobs waiting for a slot, all kinds together
SHUTDOWN_RETRY_AFTER: Final = 30


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
    """The work cannot start now: its database already has a job, or the agent is at a limit or stopping.

    ``retry_after`` is a hint in seconds (the API sends it as Retry-After)."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Conflict(Busy):
    """The same work is already queued or running; a second copy would only repeat it."""


class Overloaded(Busy):
    """This kind of job (or the queue as a whole) is at its limit; the request may be retried later."""


class ShuttingDown(Busy):
    """The agent is stopping and accepts no new work."""


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
    created_at: datetime = field(default_factory=utc_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = None
    error: str | None = None
    progress: Progress = field(default_factory=Progress)
    done: anyio.Event = field(default_factory=anyio.Event, repr=False)
    key: Hashable | None = field(default=None, repr=False)
    # What ended a failed job, for a caller in this process (the in-process CLI re-raises it, so its exit
    # status says configuration error or bad input as it would without jobs). Never serialised.
    exception: BaseException | None = field(default=None, repr=False)
    _scope: anyio.CancelScope | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {**self.record(), "progress": {"bytes_done": self.progress.bytes_done, "stage": self.progress.stage}}

    def record(self) -> dict[str, Any]:
        """The job without its live progress: what the journal keeps and events carry."""
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
        }


JobWork = Callable[[Job], Awaitable[Any]]


@dataclass(frozen=True)
class Submission:
    """One job to start: its work, the parameters it reports, its database (one job each) and its key."""

    work: JobWork
    params: dict[str, Any]
    database: str | None = None
    key: Hashable | None = None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` from the running process's own symbols, or None where there is none (musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def _release_memory() -> None:
    """Hand freed heap back to the operating system once the agent is idle.

    A flood of jobs leaves the allocator holding the peak's pages long after the buffers are freed (RSS
    stayed at 908 MB after 60 validations had finished). A collection frees what cycles kept alive, and
    ``malloc_trim`` returns free pages from every arena. Both take milliseconds, and only when the last
    running job finishes.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class JobManager:
    """Starts jobs in the daemon's task group, within each kind's limits; one job per database at a time."""

    def __init__(
        self,
        *,
        max_parallel: int,
        history: int = DEFAULT_HISTORY,
        limits: dict[str, KindLimit] | None = None,
        max_queued: int = MAX_QUEUED_TOTAL,
        clock: Clock = utc_now,
        log_crashes: bool = True,
    ) -> None:
        self._clock = clock
        self._log_crashes = log_crashes  # off for the in-process CLI: it re-raises ``job.exception`` itself
        self._limits = dict(KIND_LIMITS if limits is None else limits)
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._max_queued = max_queued
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._history = history
        self._busy_databases: set[str] = set()
        self._tg: TaskGroup | None = None
        self._accepting = True
        self.on_finish: list[Callable[[Job], None]] = []
        self.set_max_parallel(max_parallel)

    def attach(self, tg: TaskGroup) -> None:
        self._tg = tg

    def set_max_parallel(self, value: int) -> None:
        """Backups running at once (``backup.max_parallel``); applies to the next backup that starts."""
        backup = self._limits.get("backup", OTHER_KIND_LIMIT)
        self._limits["backup"] = KindLimit(value, backup.queued, backup.retry_after)
        self._limiter("backup").total_tokens = value

    def limit(self, kind: str) -> KindLimit:
        return self._limits.get(kind, OTHER_KIND_LIMIT)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(
        self,
        kind: str,
        work: JobWork,
        *,
        params: dict[str, Any],
        database: str | None = None,
        key: Hashable | None = None,
        bounded: bool = False,
    ) -> Job:
        """Register and start a job, or raise ``Busy`` (a subclass says why) and change nothing.

        ``key`` names the work: a job of the same kind and key already queued or running is a ``Conflict``.
        ``bounded`` submissions (requests from the API) are refused beyond the kind's queue and the total
        queue. The scheduler's own submissions are bounded by the configuration instead (one per database
        and slot) and must never be dropped because someone flooded the API; they still wait for a slot.
        """
        return self.submit_all(kind, [Submission(work, params, database, key)], bounded=bounded)[0]

    def submit_all(self, kind: str, items: Sequence[Submission], *, bounded: bool = False) -> list[Job]:
        """``submit`` for several jobs of one kind, all or none: a request for three backups that may only
        start two starts none (a refused request changes nothing)."""
        self._admit(kind, items, bounded)
        jobs = []
        for item in items:
            job = Job(
                id=f"job-{secrets.token_hex(6)}",
                kind=kind,
                params=item.params,
                database=item.database,
                key=item.key,
                created_at=self._clock(),
            )
            if item.database is not None:
                self._busy_databases.add(item.database)
            self._jobs[job.id] = job
            assert self._tg is not None
            self._tg.start_soon(self._run, job, item.work, name=f"{kind} {job.id}")
            jobs.append(job)
        self._trim()
        return jobs

    def _admit(self, kind: str, items: Sequence[Submission], bounded: bool) -> None:
        if not self._accepting or self._tg is None:
            raise ShuttingDown("the agent is shutting down and accepts no new work", SHUTDOWN_RETRY_AFTER)
        limit = self.limit(kind)
        databases = [item.database for item in items if item.database is not None]
        for database in databases:
            if database in self._busy_databases or databases.count(database) > 1:
                raise Busy(
                    f"database {database!r} already has a job running; try again when it finishes", limit.retry_after
                )
        active = [job for job in self._jobs.values() if job.kind == kind and not job.status.finished]
        keys = [item.key for item in items if item.key is not None]
        if any(job.key in keys for job in active) or len(set(keys)) < len(keys):
            raise Conflict(f"the same {kind} job is already queued or running", limit.retry_after)
        if not bounded:
            return
        admitted = len(active) + len(items)
        if admitted > limit.running + limit.queued:
            if limit.queued == 0:
                raise Conflict(
                    f"a {kind} job is already running and would do the same work; wait for it", limit.retry_after
                )
            raise Overloaded(
                f"{len(active)} {kind} job(s) are running or queued (at most {limit.running} run at once and "
                f"{limit.queued} wait); try again later",
                limit.retry_after,
            )
        more_queued = max(0, admitted - limit.running) - max(0, len(active) - limit.running)
        if more_queued and self.queued() + more_queued > self._max_queued:
            raise Overloaded(f"{self._max_queued} jobs are already waiting; try again later", limit.retry_after)

    def queued(self) -> int:
        """Jobs admitted beyond their kind's running limit, all kinds together: those waiting for a slot.

        Counted from the admissions, not from ``status``: a job submitted in this very tick has not reached
        its limiter yet, and a burst of requests must not all look "running" because of that."""
        active: dict[str, int] = {}
        for job in self._jobs.values():
            if not job.status.finished:
                active[job.kind] = active.get(job.kind, 0) + 1
        return sum(max(0, count - self.limit(kind).running) for kind, count in active.items())

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

    def _limiter(self, kind: str) -> anyio.CapacityLimiter:
        limiter = self._limiters.get(kind)
        if limiter is None:
            limiter = self._limiters[kind] = anyio.CapacityLimiter(self.limit(kind).running)
        return limiter

    async def _run(self, job: Job, work: JobWork) -> None:
        started = time.monotonic()
        try:
            with anyio.CancelScope() as scope:
                job._scope = scope
                async with self._limiter(job.kind):
                    await self._execute(job, work)
            if scope.cancelled_caught:
                job.status = JobStatus.CANCELLED
                job.error = "cancelled (agent shutting down)"
        finally:
            if not job.status.finished:  # cancelled from outside its own scope
                job.status = JobStatus.CANCELLED
                job.error = job.error or "cancelled"
            job.finished_at = self._clock()
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
            if not self.running():
                _release_memory()

    async def _execute(self, job: Job, work: JobWork) -> None:
        job.status = JobStatus.RUNNING
        job.started_at = self._clock()
        # Log lines and spans of everything this job runs (its tasks inherit the context) name the job.
        current_job_id.set(job.id)
        current_job_kind.set(job.kind)
        try:
            with stage(f"job {job.kind}", job_id=job.id, kind=job.kind, database=job.database or ""):
                job.result = await work(job)
            job.status = JobStatus.SUCCEEDED
        except KybdrError as exc:
            job.status = JobStatus.FAILED
            job.error = str(exc)
            job.exception = exc
            if isinstance(exc, JobFailed):
                job.result = exc.result
        except Exception as exc:  # a bug: report it on the job, keep the agent alive
            if self._log_crashes:
                log.exception("job.crashed", job=job.id, kind=job.kind)
            job.status = JobStatus.FAILED
            job.error = f"internal error: {type(exc).__name__}: {exc}"
            job.exception = exc

    def _trim(self) -> None:
        while len(self._jobs) > self._history:
            oldest_id, oldest = next(iter(self._jobs.items()))
            if not oldest.status.finished:
                break
            del self._jobs[oldest_id]
