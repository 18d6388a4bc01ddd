"""The control API: every endpoint of the seed's backup table, plus jobs, health and the OpenAPI document.

aiohttp on a unix socket (file permissions are the authentication: whoever may open the socket is an
admin) and optionally on TCP, where every request needs a bearer token whose role allows it. Long work
answers 202 with jobs; ``?wait=true`` blocks until they finish. Every error is ``application/problem+json``
with a stable ``type``, and a request that is refused changes nothing: everything it carries is checked
before any work starts, and every kind of job has a concurrency limit and a bounded queue (429, or 409 for
work already queued or running, each with Retry-After).

The handlers only parse, authorise and hand work to the job manager; the event loop never does CPU work,
so the API stays responsive while a backup runs at full speed.

The pieces: ``problems`` (problem documents and the middleware), ``requests`` (checking query strings,
path parameters and bodies), ``http`` (authorisation and the per-route guard), ``routes`` (the public route
types a component's routes module uses), ``core_routes`` (jobs, health, the document), ``openapi`` (the
document, generated from every route table). This module assembles the app from the tables the
composition root hands it; it knows no component.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from kybdr_agent.control import openapi as _openapi
from kybdr_agent.control.core_routes import core_routes, render_document
from kybdr_agent.control.http import CONTEXT, ControlContext, Role, guard, observe
from kybdr_agent.control.problems import OBSERVERS, Problem, problems
from kybdr_agent.control.routes import RouteTable
from kybdr_agent.telemetry import get_logger

__all__ = ["CONTEXT", "ControlContext", "Problem", "Role", "all_tables", "build_app", "openapi_document"]


log = get_logger("kybdr_agent.control")


def _one_line_for_bad_http(record: logging.LogRecord) -> bool:
    """aiohttp logs every request it cannot parse (garbage, a 100 kB header) with a full traceback: a flood
    of them would bury the log. Such a request is the client's fault and already answered 400: one line."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        log.info("control.bad_http_request", status=exc.code, error=exc.message[:200])
        return False
    return True


def all_tables(tables: Sequence[RouteTable]) -> list[RouteTable]:
    """The components' tables and the framework's own (jobs, health, the document of all of them)."""
    every: list[RouteTable] = []
    document = render_document(lambda: openapi_document(every))
    every.extend([core_routes(document), *tables])
    return every


def build_app(ctx: ControlContext, tables: Sequence[RouteTable]) -> web.Application:
    server_log = logging.getLogger("aiohttp.server")
    if _one_line_for_bad_http not in server_log.filters:
        server_log.addFilter(_one_line_for_bad_http)
    app = web.Application(middlewares=[problems], client_max_size=ctx.max_body_bytes)
    app[CONTEXT] = ctx
    app[OBSERVERS] = (observe,)
    for table in all_tables(tables):
        for route in table.routes:
            spec = route.spec
            app.router.add_route(spec.method, spec.path, guard(spec, route.handler), name=spec.name)
    return app


def openapi_document(tables: Sequence[RouteTable]) -> dict[str, Any]:
    """The API's OpenAPI 3.1 document (also served at ``/v1/openapi.json``)."""
    schemas: dict[str, Any] = {}
    for table in tables:
        schemas.update(table.schemas)
    return _openapi.openapi_document([route.spec for table in tables for route in table.routes], schemas)
