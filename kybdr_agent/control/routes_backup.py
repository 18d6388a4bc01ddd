"""The control API's routes: the seed's backup table, plus jobs, health and the OpenAPI document.

Handlers receive a ``Call`` that has already passed every check (``http.guard``), so all that is left
here is what needs the service: a 404 for an unknown backup, a 422 for a request the configuration
cannot honour — and then the jobs, admitted all at once or not at all (``JobManager.submit_all``).
"""

from __future__ import annotations

import functools
import time
from typing import Annotated, Any, Final, Literal

import anyio
from aiohttp import web
from pydantic import AfterValidator, Field

from kybdr_agent import __version__
from kybdr_agent.backup.service import BackupOverrides
from kybdr_agent.control.http import Call, Handler, RouteSpec, authorise
from kybdr_agent.control.openapi import openapi_document
from kybdr_agent.control.problems import Problem, json_response
from kybdr_agent.control.requests import DATABASE, NO_CONTROL_CHARS, TEXT_CHARS, TIMEOUT, WAIT, Body
from kybdr_agent.errors import KybdrError
from kybdr_agent.jobs import Job, JobFailed, Submission


def _at_most_63_bytes(value: str) -> str:
    # PostgreSQL truncates longer names silently: a restore could land in another database than named.
    if len(value.encode("utf-8")) > 63:
        raise ValueError("must be at most 63 bytes in UTF-8 (PostgreSQL would truncate it)")
    return value


DatabaseName = Annotated[
    str, Field(min_length=1, max_length=63, pattern=NO_CONTROL_CHARS), AfterValidator(_at_most_63_bytes)
]
JOB_QUERY: Final = (WAIT, TIMEOUT)


# --- request bodies (unknown fields are errors; nothing is coerced) -----------------------------


class BackupBody(Body):
    """The seed's curl body works as shown; ``database`` picks one database instead of all covered ones."""

    compression: bool | None = None
    encryption: bool | None = None
    cross_region: bool | None = None
    description: str | None = Field(None, max_length=1000, pattern=TEXT_CHARS)
    database: DatabaseName | None = None


class RestoreBody(Body):
    target_database: DatabaseName
    force: bool = False
    no_owner: bool = False


class ValidateBody(Body):
    level: Literal["quick", "full"] = "quick"


class CleanupBody(Body):
    dry_run: bool = False


class TestBody(Body):
    database: DatabaseName | None = None


# --- handlers -----------------------------------------------------------------------------------


async def _answer_jobs(call: Call, jobs: list[Job]) -> web.Response:
    wait = call.wait
    if wait is not None:
        with anyio.move_on_after(wait):
            for job in jobs:
                await job.done.wait()
    finished = all(job.status.finished for job in jobs)
    status = 200 if finished and wait is not None else 202
    body: dict[str, Any] = {"jobs": [job.to_json() for job in jobs], "job_ids": [job.id for job in jobs]}
    if len(jobs) == 1:
        body["job_id"] = jobs[0].id
    return json_response(body, status=status)


async def post_backup(call: Call) -> web.Response:
    body = call.body_as(BackupBody)
    service = call.ctx.service()
    if body.encryption is False and service.settings.backup.encryption:
        authorise(call.request, "admin")  # an unencrypted copy of an encrypted-by-policy database is an admin's call
    covered = service.covered_databases()
    databases = [body.database] if body.database else covered
    if not databases:
        raise Problem(
            422,
            "no-database",
            "no database to back up",
            'name one with "database" or configure backup.policies / database.databases',
        )
    if body.encryption and service.settings.encryption.key_file is None:
        raise Problem(422, "encryption-unavailable", "encryption was requested but no key is configured")
    if body.cross_region and not service.settings.backup.cross_region:
        raise Problem(
            422,
            "cross-region-unavailable",
            "cross-region copies are not enabled on this agent",
            "set backup.cross_region and backup.cross_region_bucket, or omit cross_region",
        )
    overrides = BackupOverrides(
        compression=body.compression,
        encryption=body.encryption,
        cross_region=body.cross_region,
        description=body.description,
        labels=("manual",),
    )

    def work_for(database: str) -> Any:
        async def work(job: Job) -> Any:
            made = await service.backup(database, overrides, progress=job.progress)
            return {**made.model_dump(mode="json"), "part_count": made.part_count}

        return work

    params = body.model_dump(exclude_none=True)
    items = [Submission(work_for(database), params, database) for database in databases]
    # Backups of configured databases are bounded by the configuration (one job per database); only names
    # from outside can grow the queue, so only those are refused beyond the backup queue's bound.
    jobs = call.ctx.jobs.submit_all("backup", items, bounded=not set(databases) <= set(covered))
    return await _answer_jobs(call, jobs)


async def list_backups(call: Call) -> web.Response:
    found = await call.ctx.service().catalog(call.query.get("database"))
    return json_response(
        {
            "backups": [{**m.model_dump(mode="json"), "part_count": m.part_count} for m in found.backups],
            "unreadable": [{"key": key, "problem": problem} for key, problem in found.unreadable],
        }
    )


async def get_backup(call: Call) -> web.Response:
    found = await call.ctx.service().find(call.backup_id)
    return json_response({**found.model_dump(mode="json"), "part_count": found.part_count})


async def post_restore(call: Call) -> web.Response:
    body = call.body_as(RestoreBody)
    backup_id = call.backup_id
    service = call.ctx.service()
    await service.find(backup_id)  # 404 now, not as a failed job later

    async def work(job: Job) -> Any:
        job.progress.stage = "restoring"

        def notice(message: str) -> None:
            job.progress.stage = message  # what --force will do is visible before it happens

        result = await service.restore(
            backup_id, body.target_database, force=body.force, no_owner=body.no_owner, notice=notice
        )
        return result.__dict__

    params = {"backup_id": backup_id, **body.model_dump()}
    job = call.ctx.jobs.submit("restore", work, params=params, database=body.target_database, bounded=True)
    return await _answer_jobs(call, [job])


async def post_validate(call: Call) -> web.Response:
    body = call.body_as(ValidateBody)
    backup_id = call.backup_id
    service = call.ctx.service()
    await service.find(backup_id)

    async def work(job: Job) -> Any:
        result = await service.validate(backup_id, body.level)
        if not result.ok:
            raise JobFailed(result.error or "validation failed", result.__dict__)
        return result.__dict__

    params = {"backup_id": backup_id, "level": body.level}
    job = call.ctx.jobs.submit("validate", work, params=params, key=(backup_id, body.level), bounded=True)
    return await _answer_jobs(call, [job])


async def post_cleanup(call: Call) -> web.Response:
    body = call.body_as(CleanupBody)
    service = call.ctx.service()

    async def work(job: Job) -> Any:
        return await service.cleanup(dry_run=body.dry_run)

    job = call.ctx.jobs.submit("cleanup", work, params=body.model_dump(), bounded=True)
    return await _answer_jobs(call, [job])


async def get_stats(call: Call) -> web.Response:
    ctx = call.ctx
    if ctx.stats is not None:
        return json_response(await ctx.stats.stats(ctx.service()))
    return json_response(await ctx.service().stats())


async def post_test(call: Call) -> web.Response:
    body = call.body_as(TestBody)
    service = call.ctx.service()

    async def work(job: Job) -> Any:
        results = await service.drill(body.database)
        failed = [r for r in results if not r.get("passed")]
        if failed:
            raise KybdrError("restore drill failed: " + "; ".join(f"{r['database']}: {r.get('error')}" for r in failed))
        return {"drills": results}

    job = call.ctx.jobs.submit("test", work, params=body.model_dump(exclude_none=True), bounded=True)
    return await _answer_jobs(call, [job])


async def list_jobs(call: Call) -> web.Response:
    return json_response({"jobs": [job.to_json() for job in call.ctx.jobs.all()]})


async def get_job(call: Call) -> web.Response:
    job_id = call.request.match_info["job_id"]
    job = call.ctx.jobs.get(job_id)
    if job is None:
        raise Problem(404, "not-found", "no such job", job_id[:80])
    wait = call.wait
    if wait is not None:
        with anyio.move_on_after(wait):
            await job.done.wait()
    return json_response(job.to_json())


async def healthz(call: Call) -> web.Response:
    ctx = call.ctx
    return json_response(
        {
            "status": "ok" if ctx.jobs.accepting else "stopping",
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - ctx.started, 1),
            "jobs_running": len(ctx.jobs.running()),
            "jobs_queued": ctx.jobs.queued(),
            "housekeeping": ctx.housekeeping(),
        }
    )


@functools.cache
def _document() -> bytes:
    import json

    return json.dumps(openapi_document([spec for spec, _ in ROUTES])).encode()


async def openapi(call: Call) -> web.Response:
    return web.Response(body=_document(), content_type="application/json")


ROUTES: Final[list[tuple[RouteSpec, Handler]]] = [
    (
        RouteSpec(
            "POST",
            "/v1/backup",
            "operator",
            "Create a new backup (every covered database, or one)",
            BackupBody,
            job=True,
            name="create_backup",
            query=JOB_QUERY,
        ),
        post_backup,
    ),
    (
        RouteSpec(
            "GET",
            "/v1/backup",
            "viewer",
            "List all backups",
            name="list_backups",
            query=(DATABASE,),
            response="BackupList",
            repository=True,
        ),
        list_backups,
    ),
    (
        RouteSpec(
            "POST",
            "/v1/backup/cleanup",
            "admin",
            "Clean up old backups (retention policy)",
            CleanupBody,
            job=True,
            name="cleanup_backups",
            query=JOB_QUERY,
        ),
        post_cleanup,
    ),
    (
        RouteSpec(
            "GET",
            "/v1/backup/stats",
            "viewer",
            "Get backup statistics",
            name="backup_stats",
            response="Stats",
            repository=True,
        ),
        get_stats,
    ),
    (
        RouteSpec(
            "POST",
            "/v1/backup/test",
            "operator",
            "Test the backup system (restore drill)",
            TestBody,
            job=True,
            name="test_backups",
            query=JOB_QUERY,
        ),
        post_test,
    ),
    (
        RouteSpec(
            "GET",
            "/v1/backup/{backup_id}",
            "viewer",
            "Get backup details",
            name="get_backup",
            response="Backup",
            repository=True,
        ),
        get_backup,
    ),
    (
        RouteSpec(
            "POST",
            "/v1/backup/{backup_id}/restore",
            "admin",
            "Restore from backup",
            RestoreBody,
            job=True,
            name="restore_backup",
            query=JOB_QUERY,
            repository=True,
        ),
        post_restore,
    ),
    (
        RouteSpec(
            "POST",
            "/v1/backup/{backup_id}/validate",
            "operator",
            "Validate backup integrity",
            ValidateBody,
            job=True,
            name="validate_backup",
            query=JOB_QUERY,
            repository=True,
        ),
        post_validate,
    ),
    (RouteSpec("GET", "/v1/jobs", "viewer", "List recent jobs", name="list_jobs", response="JobList"), list_jobs),
    (
        RouteSpec(
            "GET",
            "/v1/jobs/{job_id}",
            "viewer",
            "Get a job (?wait=true blocks until it finishes)",
            name="get_job",
            query=JOB_QUERY,
            response="Job",
        ),
        get_job,
    ),
    (
        RouteSpec("GET", "/healthz", "viewer", "Liveness and readiness", name="healthz", response="Health"),
        healthz,
    ),
    (
        RouteSpec(
            "GET", "/v1/openapi.json", "viewer", "This API, described", name="openapi", response="OpenAPIDocument"
        ),
        openapi,
    ),
]
