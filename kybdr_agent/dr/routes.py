"""The DR component's control endpoints: the seed's eleven, plus the peer's two and ``resume``.

Long operations (failover, failback, the two drills) answer 202 with a job and honour ``?wait=true`` like
the backup endpoints; a refusal is answered before any job exists: 409 when another operation runs (or
another agent holds the lease), 412 when a guard refuses (the guards are in the problem document), 503 when
DR is not configured. The state-changing endpoints need the admin role; the drills are the operator's.
The seed's ``{"force": false}`` body works as shown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal

from aiohttp import web
from pydantic import Field

from kybdr_agent.control.http import Call, RouteSpec
from kybdr_agent.control.problems import Problem, json_response
from kybdr_agent.control.requests import TEXT_CHARS, TIMEOUT, WAIT, Body, QueryParam
from kybdr_agent.control.routes import Route, RouteTable, answer_jobs
from kybdr_agent.dr.machine import Decision, Failback, Failover, Refusal, Resume

if TYPE_CHECKING:
    from kybdr_agent.dr.component import DRComponent

PREFIX: Final = "/v1/disaster-recovery"
JOB_QUERY: Final = (WAIT, TIMEOUT)
MAX_HISTORY: Final = 1000


class FailoverBody(Body):
    force: bool = False
    allow_unfenced: bool = False
    reason: str | None = Field(None, max_length=500, pattern=TEXT_CHARS)


class FailbackBody(Body):
    force: bool = False
    reason: str | None = Field(None, max_length=500, pattern=TEXT_CHARS)


class DrillBody(Body):
    """The drills take no options; an empty body (the seed's curl sends none) is fine."""


def _parse_limit(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_HISTORY:
        raise ValueError(f"must be a whole number from 1 to {MAX_HISTORY}")
    return int(value)


def _parse_kind(value: str) -> str:
    kinds = ("operation", "transition", "intent", "result", "alert", "switch")
    if value not in kinds:
        raise ValueError(f"must be one of {', '.join(kinds)}")
    return value


LIMIT: Final = QueryParam(
    "limit", {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY}, "newest N entries", _parse_limit
)
KIND: Final = QueryParam(
    "kind", {"type": "string"}, "only entries of this kind (operation, transition, …)", _parse_kind
)

_OBJECT: Final = {"type": "object"}


def dr_schemas() -> dict[str, Any]:
    return {
        "DRStatus": {
            "type": "object",
            "properties": {
                "state": {"type": "string"},
                "active_region": {"type": "string"},
                "auto_failover": {"type": "boolean"},
                "auto_failback": {"type": "boolean"},
                "lease_holder": {"type": ["string", "null"]},
                "last_transition": {"oneOf": [{"type": "null"}, _OBJECT]},
            },
            "required": ["state", "active_region", "auto_failover", "auto_failback", "lease_holder", "last_transition"],
        },
        "DRHealth": {
            "type": "object",
            "properties": {"regions": _OBJECT, "witnesses": {"type": "array"}, "peer": {}},
        },
        "DRHistory": {
            "type": "object",
            "properties": {"entries": {"type": "array", "items": _OBJECT}, "statistics": _OBJECT},
            "required": ["entries", "statistics"],
        },
        "DRPeer": _OBJECT,
        "DRFence": _OBJECT,
    }


def _refusal(refusal: Refusal) -> Problem:
    guards = [{"name": g.name, "ok": g.ok, "soft": g.soft, "detail": g.detail} for g in refusal.guards]
    if refusal.status == 409:
        return Problem(409, "dr-busy", "another DR operation is running", refusal.reason, guards=guards)
    return Problem(412, "dr-guard-refused", "a guard refused the operation", refusal.reason, guards=guards)


def dr_routes(component: DRComponent | None) -> RouteTable:
    """The table; with ``component`` None (DR not configured) every route answers 503."""

    def need() -> DRComponent:
        if component is None or not component.settings.enabled:
            raise Problem(
                503,
                "dr-not-configured",
                "disaster recovery is not configured on this agent",
                "set [dr] enabled = true with its fields (config/agent.example.toml) and restart the agent",
            )
        return component

    async def status(call: Call) -> web.Response:
        return json_response(need().status())

    async def health(call: Call) -> web.Response:
        return json_response(need().health_report())

    async def history(call: Call) -> web.Response:
        return json_response(need().history_view(call.query.get("limit", 100), call.query.get("kind")))

    async def operation(call: Call, kind: Literal["failover", "failback"]) -> web.Response:
        dr = need()
        if kind == "failover":
            body = call.body_as(FailoverBody)
            cmd: Failover | Failback = Failover(
                force=body.force, allow_unfenced=body.allow_unfenced, reason=body.reason or "operator request"
            )
        else:
            fb = call.body_as(FailbackBody)
            cmd = Failback(force=fb.force)
            body_params = fb.model_dump(exclude_none=True)
        result = await dr.command(cmd)
        if isinstance(result, Refusal):
            raise _refusal(result)
        assert isinstance(result, Decision)
        params = call.body.model_dump(exclude_none=True) if call.body is not None else {}
        if kind == "failback":
            params = body_params
        job = dr.submit_operation(kind, result, params)
        return await answer_jobs(call, [job])

    async def failover(call: Call) -> web.Response:
        return await operation(call, "failover")

    async def failback(call: Call) -> web.Response:
        return await operation(call, "failback")

    async def drill(call: Call, kind: Literal["test-failover", "test-failback"]) -> web.Response:
        dr = need()

        async def work(job: Any) -> Any:
            from kybdr_agent.jobs import JobFailed

            job.progress.stage = "checking guards and the test record"
            record = await dr.drill(kind)
            if record.get("outcome") == "failed":
                raise JobFailed(f"{kind} failed: {_failed_checks(record)}", record)
            return record

        job = call.ctx.jobs.submit(f"dr-{kind}", work, params={}, key=kind, bounded=True)
        return await answer_jobs(call, [job])

    async def test_failover(call: Call) -> web.Response:
        return await drill(call, "test-failover")

    async def test_failback(call: Call) -> web.Response:
        return await drill(call, "test-failback")

    def switch(name: Literal["auto_failover", "auto_failback"], value: bool) -> Any:
        async def handler(call: Call) -> web.Response:
            return json_response(await need().set_switch(name, value))

        return handler

    async def resume(call: Call) -> web.Response:
        """Leave ``halted`` (re-derive roles) and end a pause: automation runs again."""
        dr = need()
        result = await dr.command(Resume())
        if isinstance(result, Refusal):
            raise _refusal(result)
        return json_response(await dr.set_switch("paused", False))

    async def pause(call: Call) -> web.Response:
        """Automation stops (probes, status and manual commands go on): for maintenance on either database."""
        return json_response(await need().set_switch("paused", True))

    async def peer(call: Call) -> web.Response:
        return json_response(need().peer_view())

    async def fence(call: Call) -> web.Response:
        return json_response(await need().fence_local())

    def spec(method: str, path: str, role: Any, summary: str, name: str, **kw: Any) -> RouteSpec:
        problems: tuple[tuple[str, str], ...] = (
            ("503", "disaster recovery is not configured on this agent (dr.enabled is false)"),
        )
        if path in ("/failover", "/failback"):
            problems += (
                ("409", "another DR operation runs, or another agent holds the DR lease"),
                ("412", "a guard refused the operation (the problem document lists the guards)"),
            )
        elif path == "/resume":
            problems += (("409", "an operation is in progress"),)
        return RouteSpec(
            method=method, path=PREFIX + path, role=role, summary=summary, name=name, problems=problems, **kw
        )

    routes = [
        Route(spec("GET", "/status", "viewer", "Get DR status", "dr_status", response="DRStatus"), status),
        Route(spec("GET", "/health", "viewer", "Get health status", "dr_health", response="DRHealth"), health),
        Route(
            spec(
                "POST",
                "/failover",
                "admin",
                "Initiate failover",
                "dr_failover",
                body=FailoverBody,
                job=True,
                query=JOB_QUERY,
            ),
            failover,
        ),
        Route(
            spec(
                "POST",
                "/failback",
                "admin",
                "Initiate failback",
                "dr_failback",
                body=FailbackBody,
                job=True,
                query=JOB_QUERY,
            ),
            failback,
        ),
        Route(
            spec(
                "POST",
                "/test-failover",
                "operator",
                "Test failover",
                "dr_test_failover",
                body=DrillBody,
                job=True,
                query=JOB_QUERY,
            ),
            test_failover,
        ),
        Route(
            spec(
                "POST",
                "/test-failback",
                "operator",
                "Test failback",
                "dr_test_failback",
                body=DrillBody,
                job=True,
                query=JOB_QUERY,
            ),
            test_failback,
        ),
        Route(
            spec(
                "POST",
                "/auto-failover/enable",
                "admin",
                "Enable auto-failover",
                "dr_auto_failover_enable",
                response="DRStatus",
            ),
            switch("auto_failover", True),
        ),
        Route(
            spec(
                "POST",
                "/auto-failover/disable",
                "admin",
                "Disable auto-failover",
                "dr_auto_failover_disable",
                response="DRStatus",
            ),
            switch("auto_failover", False),
        ),
        Route(
            spec(
                "POST",
                "/auto-failback/enable",
                "admin",
                "Enable auto-failback",
                "dr_auto_failback_enable",
                response="DRStatus",
            ),
            switch("auto_failback", True),
        ),
        Route(
            spec(
                "POST",
                "/auto-failback/disable",
                "admin",
                "Disable auto-failback",
                "dr_auto_failback_disable",
                response="DRStatus",
            ),
            switch("auto_failback", False),
        ),
        Route(
            spec(
                "GET",
                "/history",
                "viewer",
                "Get failover history",
                "dr_history",
                query=(LIMIT, KIND),
                response="DRHistory",
            ),
            history,
        ),
        Route(
            spec(
                "POST",
                "/resume",
                "admin",
                "Leave the halted state; re-derive roles from PostgreSQL",
                "dr_resume",
                response="DRStatus",
            ),
            resume,
        ),
        Route(
            spec(
                "POST",
                "/pause",
                "admin",
                "Pause automation (maintenance): watch and alert only",
                "dr_pause",
                response="DRStatus",
            ),
            pause,
        ),
        Route(spec("GET", "/peer", "viewer", "This agent's view, for its peer", "dr_peer", response="DRPeer"), peer),
        Route(
            spec(
                "POST",
                "/fence",
                "admin",
                "Fence the database beside this agent (the peer's request)",
                "dr_fence",
                response="DRFence",
            ),
            fence,
        ),
    ]
    return RouteTable(routes, dr_schemas())


def _failed_checks(record: dict[str, Any]) -> str:
    failed = [f"{c['name']}: {c['detail']}" for c in record.get("checks", []) if not c["ok"] and not c["soft"]]
    return "; ".join(failed) or "see the checks"
