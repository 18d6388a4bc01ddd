"""The routes every agent has whatever its components: jobs, health and the OpenAPI document."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Final

import anyio
from aiohttp import web

from kybdr_agent import __version__
from kybdr_agent.control.http import Call, RouteSpec
from kybdr_agent.control.problems import Problem, json_response
from kybdr_agent.control.requests import TIMEOUT, WAIT
from kybdr_agent.control.routes import Route, RouteTable

JOB_QUERY: Final = (WAIT, TIMEOUT)


async def list_jobs(call: Call) -> web.Response:
    return json_response({"jobs": [job.to_json() for job in call.ctx.jobs.all()]})


async def get_job(call: Call) -> web.Response:
    job_id = call.path["job_id"]
    job = call.ctx.jobs.get(job_id)
    if job is None:
        raise Problem(404, "not-found", "no such job", job_id[:80])
    wait = call.wait
    if wait is not None:
        with anyio.move_on_after(wait):
            await job.done.wait()
    return json_response(job.to_json())


async def healthz(call: Call) -> web.Response:
    """Liveness and readiness: the framework's own figures, then what each component reports."""
    ctx = call.ctx
    return json_response(
        {
            "status": "ok" if ctx.jobs.accepting else "stopping",
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - ctx.started, 1),
            "jobs_running": len(ctx.jobs.running()),
            "jobs_queued": ctx.jobs.queued(),
            **ctx.health(),
        }
    )


def core_routes(document: Callable[[], bytes]) -> RouteTable:
    """``document`` renders the OpenAPI document of every table, this one included (built once, lazily)."""

    async def openapi(call: Call) -> web.Response:
        return web.Response(body=document(), content_type="application/json")

    return RouteTable(
        [
            Route(
                RouteSpec(
                    method="GET",
                    path="/v1/jobs",
                    role="viewer",
                    summary="List recent jobs",
                    name="list_jobs",
                    response="JobList",
                ),
                list_jobs,
            ),
            Route(
                RouteSpec(
                    method="GET",
                    path="/v1/jobs/{job_id}",
                    role="viewer",
                    summary="Get a job (?wait=true blocks until it finishes)",
                    name="get_job",
                    query=JOB_QUERY,
                    response="Job",
                ),
                get_job,
            ),
            Route(
                RouteSpec(
                    method="GET",
                    path="/healthz",
                    role="viewer",
                    summary="Liveness and readiness",
                    name="healthz",
                    response="Health",
                ),
                healthz,
            ),
            Route(
                RouteSpec(
                    method="GET",
                    path="/v1/openapi.json",
                    role="viewer",
                    summary="This API, described",
                    name="openapi",
                    response="OpenAPIDocument",
                ),
                openapi,
            ),
        ]
    )


def render_document(make: Callable[[], dict[str, object]]) -> Callable[[], bytes]:
    """The document as bytes, made on first request and kept: it cannot change while the agent runs."""
    cached: list[bytes] = []

    def document() -> bytes:
        if not cached:
            cached.append(json.dumps(make()).encode())
        return cached[0]

    return document
