"""The framework's public route types, for a component's own ``routes`` module: a route is a spec and its
handler, a table is a component's routes and the response schemas they name. Plus the one way every job
route answers (202 with the jobs, or 200 once they finished with ``?wait=true``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from aiohttp import web

from kybdr_agent.control.http import Call, Handler, RouteSpec
from kybdr_agent.control.problems import json_response
from kybdr_agent.jobs import Job

__all__ = ["Call", "Handler", "Route", "RouteSpec", "RouteTable", "answer_jobs"]


@dataclass(frozen=True)
class Route:
    spec: RouteSpec
    handler: Handler


@dataclass(frozen=True)
class RouteTable:
    """A component's routes, and the OpenAPI schemas (components/schemas) their answers refer to."""

    routes: Sequence[Route]
    schemas: Mapping[str, Any] = field(default_factory=dict)


async def answer_jobs(call: Call, jobs: list[Job]) -> web.Response:
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
