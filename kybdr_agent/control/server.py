"""The control API: every endpoint of the seed's backup table, plus jobs, health and the OpenAPI document.

aiohttp on a unix socket (file permissions are the authentication: whoever may open the socket is an
admin) and optionally on TCP, where every request needs a bearer token whose role allows it. Long work
answers 202 with jobs; ``?wait=true`` blocks until they finish. Every error is ``application/problem+json``
with a stable ``type``, and a request that is refused changes nothing.

The handlers only parse, authorise and hand work to the job manager; the event loop never does CPU work,
so the API stays responsive while a backup runs at full speed.
"""

from __future__ import annotations

import hmac
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import anyio
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kybdr_agent import __version__
from kybdr_agent.backup.manifest import InvalidBackupId, check_backup_id
from kybdr_agent.backup.service import BackupOverrides, BackupService
from kybdr_agent.errors import ConfigError, KybdrError, NotFound
from kybdr_agent.jobs import Busy, Job, JobFailed, JobManager
from kybdr_agent.telemetry import get_logger

PROBLEM_BASE: Final = "https://kybdr.dev/problems/"
MAX_WAIT_SECONDS: Final = 24 * 3600.0
Role = Literal["viewer", "operator", "admin"]
_RANK: Final = {"viewer": 0, "operator": 1, "admin": 2}

log = get_logger("kybdr_agent.control")


# --- request bodies (unknown fields are errors) -------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackupBody(_Body):
    """The seed's curl body works as shown; ``database`` picks one database instead of all covered ones."""

    compression: bool | None = None
    encryption: bool | None = None
    cross_region: bool | None = None
    description: str | None = Field(None, max_length=1000)
    database: str | None = Field(None, min_length=1, max_length=63)


class RestoreBody(_Body):
    target_database: str = Field(min_length=1, max_length=63)
    force: bool = False
    no_owner: bool = False


class ValidateBody(_Body):
    level: Literal["quick", "full"] = "quick"


class CleanupBody(_Body):
    dry_run: bool = False


class TestBody(_Body):
    database: str | None = Field(None, min_length=1, max_length=63)


# --- problems -----------------------------------------------------------------------------------


class Problem(Exception):
    def __init__(self, status: int, slug: str, title: str, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or title)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.extra = extra

    def response(self) -> web.Response:
        body = {"type": PROBLEM_BASE + self.slug, "title": self.title, "status": self.status, **self.extra}
        if self.detail:
            body["detail"] = self.detail
        return web.Response(status=self.status, body=json.dumps(body).encode(), content_type="application/problem+json")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data, default=str).encode(), content_type="application/json")


# --- wiring -------------------------------------------------------------------------------------


@dataclass
class ControlContext:
    """What the handlers may touch: the current service (swapped on reload), the jobs, the tokens."""

    service: Callable[[], BackupService]
    jobs: JobManager
    tokens: dict[str, Role] = field(default_factory=dict)
    max_body_bytes: int = 65536
    started: float = field(default_factory=time.monotonic)


CONTEXT: Final = web.AppKey("context", ControlContext)


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    role: Role
    summary: str
    body: type[_Body] | None = None
    job: bool = False
    name: str = ""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _peer_is_unix(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


def _authorise(request: web.Request, needed: Role) -> Role:
    if _peer_is_unix(request):
        return "admin"
    ctx = request.app[CONTEXT]
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise Problem(401, "unauthorized", "a bearer token is required", "send Authorization: Bearer <token>")
    role: Role | None = None
    for token, token_role in ctx.tokens.items():
        # Compare against every token, in constant time, so timing reveals neither match nor position.
        # aiohttp keeps undecodable header bytes as surrogates: encode them back, never raise on them.
        if hmac.compare_digest(token.encode(), presented.strip().encode("utf-8", "surrogateescape")):
            role = token_role
    if role is None:
        raise Problem(401, "unauthorized", "the token is not valid")
    if _RANK[role] < _RANK[needed]:
        raise Problem(403, "forbidden", f"this needs the {needed} role", f"the token's role is {role}")
    return role


async def _parse_body(request: web.Request, model: type[_Body]) -> _Body:
    ctx = request.app[CONTEXT]
    if request.content_length is not None and request.content_length > ctx.max_body_bytes:
        raise Problem(413, "body-too-large", "request body too large", f"at most {ctx.max_body_bytes} bytes")
    try:
        raw = await request.read()  # the whole body, bounded by the app's client_max_size
    except web.HTTPRequestEntityTooLarge:
        raise Problem(413, "body-too-large", "request body too large", f"at most {ctx.max_body_bytes} bytes") from None
    if not raw.strip():
        raw = b"{}"
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Problem(400, "malformed-json", "the body is not valid JSON", str(exc)) from None
    if not isinstance(data, dict):
        raise Problem(400, "malformed-json", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in err["loc"]), "problem": err["msg"]} for err in exc.errors()]
        unknown = [e["field"] for e, err in zip(errors, exc.errors(), strict=True) if err["type"] == "extra_forbidden"]
        if unknown:
            raise Problem(
                422,
                "unknown-field",
                "the body has fields this endpoint does not take",
                ", ".join(unknown),
                errors=errors,
            ) from None
        raise Problem(422, "invalid-body", "the body does not validate", errors[0]["problem"], errors=errors) from None


def _backup_id(request: web.Request) -> str:
    try:
        return check_backup_id(request.match_info["backup_id"])
    except InvalidBackupId as exc:
        raise Problem(400, "invalid-backup-id", "not a backup id", str(exc)) from None


def _wait_params(request: web.Request) -> float | None:
    if request.query.get("wait", "false").lower() not in ("1", "true", "yes"):
        return None
    try:
        timeout = float(request.query.get("timeout", MAX_WAIT_SECONDS))
    except ValueError:
        raise Problem(400, "bad-query", "timeout must be a number of seconds") from None
    return min(max(timeout, 0.0), MAX_WAIT_SECONDS)


async def _answer_jobs(request: web.Request, jobs: list[Job]) -> web.Response:
    wait = _wait_params(request)
    if wait is not None:
        with anyio.move_on_after(wait):
            for job in jobs:
                await job.done.wait()
    finished = all(job.status.finished for job in jobs)
    status = 200 if finished and wait is not None else 202
    body: dict[str, Any] = {"jobs": [job.to_json() for job in jobs], "job_ids": [job.id for job in jobs]}
    if len(jobs) == 1:
        body["job_id"] = jobs[0].id
    return _json(body, status=status)


def _submit(
    ctx: ControlContext,
    kind: str,
    work: Callable[[Job], Awaitable[Any]],
    *,
    params: dict[str, Any],
    database: str | None = None,
    limited: bool = True,
) -> Job:
    try:
        return ctx.jobs.submit(kind, work, params=params, database=database, limited=limited)
    except Busy as exc:
        raise Problem(409, "busy", "the work cannot start now", str(exc)) from None


# --- handlers -----------------------------------------------------------------------------------


async def post_backup(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await _parse_body(request, BackupBody)
    assert isinstance(body, BackupBody)
    service = ctx.service()
    if body.encryption is False and service.settings.backup.encryption:
        _authorise(request, "admin")  # an unencrypted copy of an encrypted-by-policy database is an admin's call
    databases = [body.database] if body.database else service.covered_databases()
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
    busy = [db for db in databases if db in {job.database for job in ctx.jobs.running()}]
    if busy:
        raise Problem(409, "busy", "a backup of this database is already running", ", ".join(busy))
    jobs = []
    for database in databases:

        async def work(job: Job, database: str = database) -> Any:
            made = await service.backup(database, overrides, progress=job.progress)
            return {**made.model_dump(mode="json"), "part_count": made.part_count}

        jobs.append(_submit(ctx, "backup", work, params=body.model_dump(exclude_none=True), database=database))
    return await _answer_jobs(request, jobs)


async def list_backups(request: web.Request) -> web.Response:
    database = request.query.get("database") or None
    found = await request.app[CONTEXT].service().catalog(database)
    return _json(
        {
            "backups": [{**m.model_dump(mode="json"), "part_count": m.part_count} for m in found.backups],
            "unreadable": [{"key": key, "problem": problem} for key, problem in found.unreadable],
        }
    )


async def get_backup(request: web.Request) -> web.Response:
    backup_id = _backup_id(request)
    found = await request.app[CONTEXT].service().find(backup_id)
    return _json({**found.model_dump(mode="json"), "part_count": found.part_count})


async def post_restore(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    backup_id = _backup_id(request)
    body = await _parse_body(request, RestoreBody)
    assert isinstance(body, RestoreBody)
    service = ctx.service()
    await service.find(backup_id)  # 404 now, not as a failed job later

    async def work(job: Job) -> Any:
        job.progress.stage = "restoring"
        result = await service.restore(backup_id, body.target_database, force=body.force, no_owner=body.no_owner)
        return result.__dict__

    job = _submit(
        ctx,
        "restore",
        work,
        params={"backup_id": backup_id, **body.model_dump()},
        database=body.target_database,
        limited=False,
    )
    return await _answer_jobs(request, [job])


async def post_validate(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    backup_id = _backup_id(request)
    body = await _parse_body(request, ValidateBody)
    assert isinstance(body, ValidateBody)
    service = ctx.service()
    await service.find(backup_id)

    async def work(job: Job) -> Any:
        result = await service.validate(backup_id, body.level)
        if not result.ok:
            raise JobFailed(result.error or "validation failed", result.__dict__)
        return result.__dict__

    job = _submit(ctx, "validate", work, params={"backup_id": backup_id, "level": body.level}, limited=False)
    return await _answer_jobs(request, [job])


async def post_cleanup(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await _parse_body(request, CleanupBody)
    assert isinstance(body, CleanupBody)
    service = ctx.service()

    async def work(job: Job) -> Any:
        return await service.cleanup(dry_run=body.dry_run)

    job = _submit(ctx, "cleanup", work, params=body.model_dump(), database=None, limited=False)
    return await _answer_jobs(request, [job])


async def get_stats(request: web.Request) -> web.Response:
    return _json(await request.app[CONTEXT].service().stats())


async def post_test(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await _parse_body(request, TestBody)
    assert isinstance(body, TestBody)
    service = ctx.service()

    async def work(job: Job) -> Any:
        results = await service.drill(body.database)
        failed = [r for r in results if not r.get("passed")]
        if failed:
            raise KybdrError("restore drill failed: " + "; ".join(f"{r['database']}: {r.get('error')}" for r in failed))
        return {"drills": results}

    job = _submit(ctx, "test", work, params=body.model_dump(exclude_none=True), limited=True)
    return await _answer_jobs(request, [job])


async def list_jobs(request: web.Request) -> web.Response:
    return _json({"jobs": [job.to_json() for job in request.app[CONTEXT].jobs.all()]})


async def get_job(request: web.Request) -> web.Response:
    job = request.app[CONTEXT].jobs.get(request.match_info["job_id"])
    if job is None:
        raise Problem(404, "not-found", "no such job", request.match_info["job_id"][:80])
    wait = _wait_params(request)
    if wait is not None:
        with anyio.move_on_after(wait):
            await job.done.wait()
    return _json(job.to_json())


async def healthz(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return _json(
        {
            "status": "ok" if ctx.jobs.accepting else "stopping",
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - ctx.started, 1),
            "jobs_running": len(ctx.jobs.running()),
        }
    )


async def openapi(request: web.Request) -> web.Response:
    return _json(openapi_document())


ROUTES: Final[list[tuple[RouteSpec, Handler]]] = [
    (
        RouteSpec(
            "POST",
            "/v1/backup",
            "operator",
            "Create a new backup (every covered database, or one)",
            BackupBody,
            True,
            "create_backup",
        ),
        post_backup,
    ),
    (RouteSpec("GET", "/v1/backup", "viewer", "List all backups", name="list_backups"), list_backups),
    (
        RouteSpec(
            "POST",
            "/v1/backup/cleanup",
            "admin",
            "Clean up old backups (retention policy)",
            CleanupBody,
            True,
            "cleanup_backups",
        ),
        post_cleanup,
    ),
    (RouteSpec("GET", "/v1/backup/stats", "viewer", "Get backup statistics", name="backup_stats"), get_stats),
    (
        RouteSpec(
            "POST",
            "/v1/backup/test",
            "operator",
            "Test the backup system (restore drill)",
            TestBody,
            True,
            "test_backups",
        ),
        post_test,
    ),
    (RouteSpec("GET", "/v1/backup/{backup_id}", "viewer", "Get backup details", name="get_backup"), get_backup),
    (
        RouteSpec(
            "POST",
            "/v1/backup/{backup_id}/restore",
            "admin",
            "Restore from backup",
            RestoreBody,
            True,
            "restore_backup",
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
            True,
            "validate_backup",
        ),
        post_validate,
    ),
    (RouteSpec("GET", "/v1/jobs", "viewer", "List recent jobs", name="list_jobs"), list_jobs),
    (
        RouteSpec(
            "GET", "/v1/jobs/{job_id}", "viewer", "Get a job (?wait=true blocks until it finishes)", name="get_job"
        ),
        get_job,
    ),
    (RouteSpec("GET", "/healthz", "viewer", "Liveness and readiness", name="healthz"), healthz),
    (RouteSpec("GET", "/v1/openapi.json", "viewer", "This API, described", name="openapi"), openapi),
]


def _guard(spec: RouteSpec, handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        _authorise(request, spec.role)
        return await handler(request)

    return guarded


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    try:
        response = await handler(request)
    except Problem as problem:
        response = problem.response()
    except NotFound as exc:
        response = Problem(404, "not-found", "not found", str(exc)).response()
    except ConfigError as exc:
        response = Problem(422, "configuration", "the configuration does not allow this", str(exc)).response()
    except KybdrError as exc:
        response = Problem(502, "operation-failed", "the operation failed", str(exc)).response()
    except web.HTTPException as exc:
        slug = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}.get(exc.status, "http-error")
        response = Problem(exc.status, slug, exc.reason).response()
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception:  # a bug: the client still gets problem+json, the log gets the traceback
        log.exception("control.internal_error", method=request.method, path=request.path)
        response = Problem(500, "internal", "internal error", "see the agent's log").response()
    log.debug(
        "control.request",
        method=request.method,
        path=request.path,
        status=response.status,
        ms=round((time.monotonic() - started) * 1000, 2),
    )
    return response


def build_app(ctx: ControlContext) -> web.Application:
    app = web.Application(middlewares=[problems], client_max_size=ctx.max_body_bytes)
    app[CONTEXT] = ctx
    for spec, handler in ROUTES:
        app.router.add_route(spec.method, spec.path, _guard(spec, handler), name=spec.name)
    return app


def load_tokens(entries: list[tuple[str, Path]]) -> dict[str, Role]:
    """Read each token file (whitespace stripped); an unreadable or empty file is a configuration error."""
    tokens: dict[str, Role] = {}
    for role, path in entries:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read control token file {path}: {exc.strerror}") from None
        if len(token) < 16:
            raise ConfigError(f"control token in {path} is shorter than 16 characters")
        tokens[token] = role  # type: ignore[assignment]
    return tokens


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {
        "Problem": {
            "type": "object",
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
            },
            "required": ["type", "title", "status"],
        },
        "Jobs": {
            "type": "object",
            "properties": {
                "jobs": {"type": "array", "items": {"type": "object"}},
                "job_ids": {"type": "array", "items": {"type": "string"}},
                "job_id": {"type": "string", "description": "present when exactly one job started"},
            },
            "required": ["jobs", "job_ids"],
        },
    }
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for spec, _handler in ROUTES:
        op: dict[str, Any] = {
            "operationId": spec.name,
            "summary": spec.summary,
            "description": f"Requires the {spec.role} role over TCP; unix-socket peers are admins.",
            "responses": {
                "400": {"description": "bad input", "content": problem},
                "401": {"description": "missing or invalid token (TCP)", "content": problem},
                "403": {"description": "the token's role is too low", "content": problem},
            },
            "parameters": [],
        }
        for name in ("backup_id", "job_id"):
            if "{" + name + "}" in spec.path:
                param: dict[str, Any] = {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                if name == "backup_id":
                    param["schema"]["pattern"] = "^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$"
                op["parameters"].append(param)
                op["responses"]["404"] = {"description": "not found", "content": problem}
        if spec.body is not None:
            schemas[spec.body.__name__] = spec.body.model_json_schema()
            op["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{spec.body.__name__}"}}},
            }
            op["responses"]["413"] = {"description": "body too large", "content": problem}
            op["responses"]["422"] = {"description": "body does not validate", "content": problem}
        if spec.job:
            op["parameters"] += [
                {
                    "name": "wait",
                    "in": "query",
                    "schema": {"type": "boolean"},
                    "description": "block until the jobs finish",
                },
                {
                    "name": "timeout",
                    "in": "query",
                    "schema": {"type": "number"},
                    "description": "seconds to wait at most",
                },
            ]
            op["responses"]["202"] = {
                "description": "accepted: jobs started",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Jobs"}}},
            }
            op["responses"]["200"] = {
                "description": "with wait=true: the jobs finished",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Jobs"}}},
            }
            op["responses"]["409"] = {"description": "a job for this database is running", "content": problem}
        else:
            op["responses"]["200"] = {
                "description": "OK",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        paths.setdefault(spec.path, {})[spec.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "kybdr-agent control API", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
