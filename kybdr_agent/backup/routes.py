"""The backup component's control endpoints: the seed's backup table.

Handlers receive a ``Call`` that has already passed every check (``control.http.guard``), so all that is
left here is what needs the service: a 404 for an unknown backup, a 422 for a request the configuration
cannot honour — and then the jobs, through the same ``verbs`` the scheduler and the CLI use, admitted all
at once or not at all. This is the one module of the component that knows the HTTP framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Final, Literal

import anyio
from aiohttp import web
from pydantic import AfterValidator, Field

from kybdr_agent.backup import verbs
from kybdr_agent.backup.api_schemas import backup_schemas
from kybdr_agent.backup.manifest import BACKUP_ID_PATTERN
from kybdr_agent.backup.regions import REGIONS, Region
from kybdr_agent.backup.selection import SelectionError, selective_request
from kybdr_agent.backup.service import BACKFILL_LIMIT, BackupOverrides
from kybdr_agent.control.http import Call, RouteSpec, authorise
from kybdr_agent.control.problems import Problem, json_response
from kybdr_agent.control.requests import (
    DATABASE,
    NO_CONTROL_CHARS,
    TEXT_CHARS,
    TIMEOUT,
    WAIT,
    Body,
    PathParam,
    QueryParam,
)
from kybdr_agent.control.routes import Route, RouteTable, answer_jobs
from kybdr_agent.jobs import Busy

if TYPE_CHECKING:
    from kybdr_agent.backup.component import BackupComponent


def _at_most_63_bytes(value: str) -> str:
    # PostgreSQL truncates longer names silently: a restore could land in another database than named.
    if len(value.encode("utf-8")) > 63:
        raise ValueError("must be at most 63 bytes in UTF-8 (PostgreSQL would truncate it)")
    return value


DatabaseName = Annotated[
    str, Field(min_length=1, max_length=63, pattern=NO_CONTROL_CHARS), AfterValidator(_at_most_63_bytes)
]
JOB_QUERY: Final = (WAIT, TIMEOUT)
SelectName = Annotated[str, Field(min_length=1, max_length=300, pattern=NO_CONTROL_CHARS)]
CONTENTS_AT_ONCE: Final = 2  # contents decrypts and parses a whole backup: a CPU-bound read, bounded


def _parse_region(value: str) -> Region:
    for region in REGIONS:
        if value == region:
            return region
    raise ValueError(f"must be one of {', '.join(REGIONS)}")


REGION: Final = QueryParam(
    "region",
    {"type": "string", "enum": list(REGIONS)},
    "read only this region's repository (default: the primary, or the DR region's copy when the primary "
    "cannot be read)",
    _parse_region,
)
REGION_FIELD_DESCRIPTION: Final = (
    "the repository to read: primary or dr (default: the primary, falling back to the DR region's copy when "
    "the primary cannot be read; the result says which)"
)
BACKUP_ID: Final = PathParam(
    name="backup_id",
    pattern=BACKUP_ID_PATTERN,
    problem_type="invalid-backup-id",
    title="not a backup id",
    expected="the form 20261124T215226Z-3f9a1c2b",
)


# --- request bodies (unknown fields are errors; nothing is coerced) -----------------------------


class BackupBody(Body):
    """The seed's curl body works as shown; ``database`` picks one database instead of all covered ones."""

    compression: bool | None = None
    encryption: bool | None = None
    cross_region: bool | None = None
    description: str | None = Field(None, max_length=1000, pattern=TEXT_CHARS)
    database: DatabaseName | None = None
    physical: bool | None = Field(
        None,
        description="a physical base backup of the whole cluster (pg_basebackup), restorable to a point in time "
        "with the WAL archive; names no database",
    )


class RestoreBody(Body):
    target_database: DatabaseName
    force: bool = False
    no_owner: bool = False
    with_globals: bool = Field(
        False,
        description="first create the roles (and tablespaces) recorded with the backup that the server lacks; "
        "existing ones are left as they are",
    )
    jobs: int = Field(
        1,
        ge=1,
        le=16,
        description="pg_restore -j N for the post-data section (indexes, constraints, triggers) once the data "
        "has streamed in; its table of contents is spooled to restore.spool_dir",
    )
    region: Region | None = Field(None, description=REGION_FIELD_DESCRIPTION)
    tables: list[SelectName] = Field(
        [],
        max_length=100,
        description="restore only these tables (schema.table, or a table name unique in the backup), whole: "
        "indexes, constraints, sequences, grants",
    )
    schemas: list[SelectName] = Field([], max_length=100, description="restore only these schemas")
    into_existing: bool = Field(
        False,
        description="add the one table of tables to the existing target_database as rename_to; never overwrites",
    )
    rename_to: SelectName | None = Field(None, description="with into_existing: the new table's name")


class ValidateBody(Body):
    level: Literal["quick", "full"] = "quick"
    region: Region | None = Field(None, description=REGION_FIELD_DESCRIPTION)


class BackfillBody(Body):
    limit: int = Field(BACKFILL_LIMIT, ge=1, le=1000, description="backups to copy at most, newest first")


class CleanupBody(Body):
    dry_run: bool = False


class TestBody(Body):
    database: DatabaseName | None = None


# --- handlers -----------------------------------------------------------------------------------


def backup_routes(component: BackupComponent) -> RouteTable:
    """The table, its handlers bound to the component (whose service a reload swaps)."""

    async def post_backup(call: Call) -> web.Response:
        body = call.body_as(BackupBody)
        service = component.service
        config = service.config
        if body.encryption is False and config.backup.encryption:
            authorise(call.request, "admin")  # an unencrypted copy of an encrypted-by-policy database: admin's call
        if body.physical and body.database:
            raise Problem(
                422,
                "physical-names-no-database",
                "a physical backup is of the whole cluster",
                'omit "database" with "physical": true',
            )
        covered = service.covered_databases()
        databases = [body.database] if body.database else covered
        if not databases and not body.physical:
            raise Problem(
                422,
                "no-database",
                "no database to back up",
                'name one with "database" or configure backup.policies / database.databases',
            )
        if body.encryption and service.keyring is None:
            raise Problem(422, "encryption-unavailable", "encryption was requested but no key is configured")
        if body.cross_region and not config.backup.cross_region:
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
        if body.physical:
            params = body.model_dump(exclude_none=True)
            job = verbs.submit_physical_backup(call.ctx.jobs, service, overrides, params=params, bounded=False)
            return await answer_jobs(call, [job])
        # Backups of configured databases are bounded by the configuration (one job per database); only names
        # from outside can grow the queue, so only those are refused beyond the backup queue's bound.
        jobs = verbs.submit_backups(
            call.ctx.jobs,
            service,
            databases,
            overrides,
            params=body.model_dump(exclude_none=True),
            bounded=not set(databases) <= set(covered),
        )
        return await answer_jobs(call, jobs)

    def region_of(service_region: Region | None) -> Region | None:
        if service_region == "dr" and component.service.replica is None:
            raise Problem(
                422,
                "region-unavailable",
                "this agent has no DR region's bucket",
                "set backup.cross_region and backup.cross_region_bucket, or omit region",
            )
        return service_region

    async def list_backups(call: Call) -> web.Response:
        region = region_of(call.query.get("region"))
        return json_response(await component.service.list_backups(call.query.get("database"), region))

    async def get_backup(call: Call) -> web.Response:
        region = region_of(call.query.get("region"))
        return json_response(await component.service.show(call.path["backup_id"], region))

    async def post_restore(call: Call) -> web.Response:
        body = call.body_as(RestoreBody)
        backup_id = call.path["backup_id"]
        service = component.service
        try:
            selection = selective_request(
                body.tables,
                body.schemas,
                into_existing=body.into_existing,
                rename_to=body.rename_to,
                force=body.force,
                jobs=body.jobs,
            )
        except SelectionError as exc:
            raise Problem(422, "bad-selection", "this selective restore cannot be done as asked", str(exc)) from None
        await service.find(backup_id, region_of(body.region))  # 404 now, not as a failed job later
        job = verbs.submit_restore(
            call.ctx.jobs,
            service,
            backup_id,
            body.target_database,
            force=body.force,
            no_owner=body.no_owner,
            with_globals=body.with_globals,
            restore_jobs=body.jobs,
            region=body.region,
            selection=selection,
            into_existing=body.into_existing,
            rename_to=body.rename_to,
        )
        return await answer_jobs(call, [job])

    async def post_validate(call: Call) -> web.Response:
        body = call.body_as(ValidateBody)
        backup_id = call.path["backup_id"]
        service = component.service
        await service.find(backup_id, region_of(body.region))
        job = verbs.submit_validate(call.ctx.jobs, service, backup_id, body.level, body.region)
        return await answer_jobs(call, [job])

    contents_limit = anyio.CapacityLimiter(CONTENTS_AT_ONCE)

    async def get_contents(call: Call) -> web.Response:
        region = region_of(call.query.get("region"))
        if contents_limit.available_tokens < 1:
            raise Busy(f"{CONTENTS_AT_ONCE} contents requests are being answered; try again shortly", retry_after=5)
        async with contents_limit:
            found = await component.service.contents(call.path["backup_id"], region)
        return json_response(found.as_dict())

    async def post_backfill(call: Call) -> web.Response:
        body = call.body_as(BackfillBody)
        service = component.service
        if service.replica is None or not service.config.backup.cross_region:
            raise Problem(
                422,
                "cross-region-unavailable",
                "cross-region copies are not enabled on this agent",
                "set backup.cross_region and backup.cross_region_bucket",
            )
        return await answer_jobs(call, [verbs.submit_backfill(call.ctx.jobs, service, limit=body.limit)])

    async def post_cleanup(call: Call) -> web.Response:
        body = call.body_as(CleanupBody)
        job = verbs.submit_cleanup(call.ctx.jobs, component.service, dry_run=body.dry_run)
        return await answer_jobs(call, [job])

    async def get_stats(call: Call) -> web.Response:
        if component.stats is not None:
            return json_response(await component.stats.stats(component.service))
        return json_response(await component.service.stats())

    async def post_test(call: Call) -> web.Response:
        body = call.body_as(TestBody)
        params = body.model_dump(exclude_none=True)
        job = verbs.submit_drill(call.ctx.jobs, component.service, body.database, params=params, bounded=True)
        return await answer_jobs(call, [job])

    routes = [
        Route(
            RouteSpec(
                method="POST",
                path="/v1/backup",
                role="operator",
                summary="Create a new backup (every covered database, or one)",
                body=BackupBody,
                job=True,
                name="create_backup",
                query=JOB_QUERY,
            ),
            post_backup,
        ),
        Route(
            RouteSpec(
                method="GET",
                path="/v1/backup",
                role="viewer",
                summary="List all backups",
                name="list_backups",
                query=(DATABASE, REGION),
                response="BackupList",
                repository=True,
            ),
            list_backups,
        ),
        Route(
            RouteSpec(
                method="POST",
                path="/v1/backup/cleanup",
                role="admin",
                summary="Clean up old backups (retention policy)",
                body=CleanupBody,
                job=True,
                name="cleanup_backups",
                query=JOB_QUERY,
            ),
            post_cleanup,
        ),
        Route(
            RouteSpec(
                method="POST",
                path="/v1/backup/backfill",
                role="operator",
                summary="Copy to the DR region's bucket the backups it lacks (newest first)",
                body=BackfillBody,
                job=True,
                name="backfill_backups",
                query=JOB_QUERY,
                repository=True,
            ),
            post_backfill,
        ),
        Route(
            RouteSpec(
                method="GET",
                path="/v1/backup/stats",
                role="viewer",
                summary="Get backup statistics",
                name="backup_stats",
                response="Stats",
                repository=True,
            ),
            get_stats,
        ),
        Route(
            RouteSpec(
                method="POST",
                path="/v1/backup/test",
                role="operator",
                summary="Test the backup system (restore drill)",
                body=TestBody,
                job=True,
                name="test_backups",
                query=JOB_QUERY,
            ),
            post_test,
        ),
        Route(
            RouteSpec(
                method="GET",
                path="/v1/backup/{backup_id}",
                role="viewer",
                summary="Get backup details",
                name="get_backup",
                query=(REGION,),
                path_params=(BACKUP_ID,),
                response="Backup",
                repository=True,
            ),
            get_backup,
        ),
        Route(
            RouteSpec(
                method="POST",
                path="/v1/backup/{backup_id}/restore",
                role="admin",
                summary="Restore from backup",
                body=RestoreBody,
                job=True,
                name="restore_backup",
                query=JOB_QUERY,
                path_params=(BACKUP_ID,),
                repository=True,
            ),
            post_restore,
        ),
        Route(
            RouteSpec(
                method="GET",
                path="/v1/backup/{backup_id}/contents",
                role="viewer",
                summary="What a backup holds: schemas, tables with their data size and rows, other objects "
                "(read from its archive, verified to the end)",
                name="backup_contents",
                query=(REGION,),
                path_params=(BACKUP_ID,),
                response="Contents",
                repository=True,
            ),
            get_contents,
        ),
        Route(
            RouteSpec(
                method="POST",
                path="/v1/backup/{backup_id}/validate",
                role="operator",
                summary="Validate backup integrity",
                body=ValidateBody,
                job=True,
                name="validate_backup",
                query=JOB_QUERY,
                path_params=(BACKUP_ID,),
                repository=True,
            ),
            post_validate,
        ),
    ]
    return RouteTable(routes, backup_schemas())
