"""The control API's request pipeline: who is calling, and everything the request carries, checked first.

Every route goes through ``guard``: the caller's role, then the path parameters, the query string and the
body (``requests``) are all checked — and refused with a 4xx problem document naming what is wrong —
before the handler runs. A handler therefore never starts work for a request that something later would
refuse (a bad ``timeout`` used to be noticed after the restore had already created its database).

This is the framework only: it knows jobs, tokens and roles, and nothing of backups or DR. A component
brings its routes as a ``RouteTable`` (``control.routes``); the composition root hands every table to
``server.build_app``.
"""

from __future__ import annotations

import hmac
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aiohttp import web

from kybdr_agent.clock import Clock, utc_now
from kybdr_agent.control.problems import Problem, RawHandler
from kybdr_agent.control.requests import (
    MAX_WAIT_SECONDS,
    B,
    Body,
    PathParam,
    QueryParam,
    check_path_params,
    parse_query,
    read_body,
)
from kybdr_agent.events import ControlRequestHandled, EventHub
from kybdr_agent.jobs import JobManager

Role = Literal["viewer", "operator", "admin"]
_RANK: Final = {"viewer": 0, "operator": 1, "admin": 2}


@dataclass
class ControlContext:
    """What every route may touch: the jobs, the tokens (swapped on reload), the body limit, and the
    agent's health as the components report it (merged into ``/healthz``)."""

    jobs: JobManager
    tokens: dict[str, Role] = field(default_factory=dict)
    max_body_bytes: int = 65536
    started: float = field(default_factory=time.monotonic)
    health: Callable[[], dict[str, Any]] = dict
    # Who each token is (token → name), for the audit trail; swapped with ``tokens`` on reload.
    token_names: dict[str, str] = field(default_factory=dict)
    # Every answered request is published here (``ControlRequestHandled``): metrics and the audit trail.
    events: EventHub | None = None
    clock: Clock = utc_now
    # Unix-socket peers running as these OS users (PostgreSQL's, in archive_command mode) may only hand over
    # WAL: the socket's group lets them connect, and connecting must not make them the agent's admin.
    wal_push_uids: frozenset[int] = frozenset()


CONTEXT: Final = web.AppKey("context", ControlContext)
# What the guard learned about a request, for the observer middleware (``observe``).
CALLER: Final = web.RequestKey("kybdr_caller", str)
ROLE: Final = web.RequestKey("kybdr_role", str)
TARGET: Final = web.RequestKey("kybdr_target", str)
_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
_TARGET_FIELDS: Final = ("backup_id", "database", "databases", "target_database", "region", "job_id")


@dataclass(frozen=True, kw_only=True)
class RouteSpec:
    """One endpoint: what the guard checks before its handler runs, and what the OpenAPI document says."""

    method: str
    path: str
    role: Role
    summary: str
    name: str
    body: type[Body] | None = None
    job: bool = False
    query: tuple[QueryParam, ...] = ()
    path_params: tuple[PathParam, ...] = ()
    response: str = ""  # the 200 answer's schema in components/schemas ("" for a job route: Jobs)
    media_type: str = "application/json"  # of the 200 answer; any other type is documented as text
    repository: bool = False  # reads the repository: 502 when it cannot, 422 when the configuration forbids
    problems: tuple[tuple[str, str], ...] = ()  # further refusals the route answers: (status, description)
    # A media type: the handler streams the body itself (``request.content``) under its own bounds; the guard
    # neither reads it nor applies ``max_body_bytes`` (a WAL segment is 16 MiB or more).
    raw_body: str = ""


@dataclass
class Call:
    """A request that passed every check: the caller's role and the parsed path, query and body."""

    request: web.Request
    ctx: ControlContext
    role: Role
    query: dict[str, Any]
    body: Body | None
    path: dict[str, str] = field(default_factory=dict)

    def body_as(self, model: type[B]) -> B:
        assert isinstance(self.body, model), self.body
        return self.body

    @property
    def wait(self) -> float | None:
        """Seconds to wait for the jobs (``?wait=true``), or None to answer 202 at once."""
        if not self.query.get("wait"):
            return None
        timeout: float = self.query.get("timeout", MAX_WAIT_SECONDS)
        return timeout


Handler = Callable[[Call], Awaitable[web.StreamResponse]]


def _peer_is_unix(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


def peer_uid(request: web.Request) -> int | None:
    """The unix-socket peer's uid from the kernel (SO_PEERCRED): who called, whatever they claim."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return None
    return int(uid)


def caller_of(request: web.Request) -> str:
    """``uid:N`` for a unix-socket peer, ``token:NAME`` for a valid bearer token, else ``anonymous``."""
    known = request.get(CALLER)
    if isinstance(known, str):
        return known
    uid = peer_uid(request)
    return f"uid:{uid}" if uid is not None else "anonymous"


WAL_PUSH_ROUTES: Final = frozenset({"wal_push"})


def authorise(request: web.Request, needed: Role, route: str | None = None) -> Role:
    """Unix-socket peers are admins — but for PostgreSQL's OS user (``ControlContext.wal_push_uids``), who may
    only call ``WAL_PUSH_ROUTES``; TCP needs exactly ``Authorization: Bearer <token>``.

    The scheme is case-insensitive (RFC 6750 / RFC 9110), followed by exactly one space and the token, with
    nothing around it: a header that only almost matches is refused, never repaired.
    """
    ctx = request.app[CONTEXT]
    if _peer_is_unix(request):
        uid = peer_uid(request)  # now: a refusal that closes the connection leaves no transport to ask later
        if uid is not None:
            request[CALLER] = f"uid:{uid}"
        if uid is not None and uid in ctx.wal_push_uids and uid not in (0, os.geteuid()):
            request[ROLE] = "operator"
            if route not in WAL_PUSH_ROUTES:
                raise Problem(403, "forbidden", "this caller may only hand over WAL (kybdr-agent wal-push)")
            return "operator"
        request[ROLE] = "admin"
        return "admin"
    header = request.headers.get("Authorization", "")
    scheme, space, presented = header.partition(" ")
    if scheme.lower() != "bearer" or space != " " or not presented or presented != presented.strip(" \t"):
        raise Problem(401, "unauthorized", "a bearer token is required", "send exactly: Authorization: Bearer <token>")
    if any(ch.isspace() for ch in presented):
        raise Problem(401, "unauthorized", "the token is not valid")
    # aiohttp keeps undecodable header bytes as surrogates: encode them back, never raise on them.
    given = presented.encode("utf-8", "surrogateescape")
    role: Role | None = None
    for token, token_role in ctx.tokens.items():
        # Compare against every token, in constant time, so timing reveals neither match nor position.
        if hmac.compare_digest(token.encode(), given):
            role = token_role
            request[CALLER] = f"token:{ctx.token_names.get(token, token_role)}"
    if role is None:
        raise Problem(401, "unauthorized", "the token is not valid")
    request[ROLE] = role
    if _RANK[role] < _RANK[needed]:
        raise Problem(403, "forbidden", f"this needs the {needed} role", f"the token's role is {role}")
    return role


def guard(spec: RouteSpec, handler: Handler) -> RawHandler:
    """Check the role, the path, the query and the body, in that order, before the handler runs."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        ctx = request.app[CONTEXT]
        role = authorise(request, spec.role, spec.name)
        path = check_path_params(request, spec.path_params)
        query = parse_query(request, spec.query)
        body = None if spec.raw_body else await read_body(request, spec.body, ctx.max_body_bytes)
        target = _target(path, body)
        if target is not None:
            request[TARGET] = target
        return await handler(Call(request, ctx, role, query, body, path))

    return guarded


def _target(path: dict[str, str], body: Body | None) -> str | None:
    """What the request acts on, for the audit trail: its path parameters, or the body's naming fields."""
    named: list[str] = list(path.values())
    for name in _TARGET_FIELDS:
        value = getattr(body, name, None) if body is not None else None
        if isinstance(value, str):
            named.append(value)
        elif isinstance(value, list | tuple):
            named.extend(str(v) for v in value)
    return ",".join(named)[:500] if named else None


def observe(request: web.Request, status: int, seconds: float) -> None:
    """Publish the answered request (after ``problems`` turned any refusal into its status)."""
    ctx = request.app[CONTEXT]
    if ctx.events is None:
        return
    route = request.match_info.route.name if request.match_info.route else None
    role = request.get(ROLE)
    target = request.get(TARGET)
    ctx.events.publish(
        ControlRequestHandled(
            at=ctx.clock(),
            method=request.method,
            path=request.path[:200],
            route=route or "unmatched",
            status=status,
            caller=caller_of(request),
            role=role if isinstance(role, str) else None,
            seconds=seconds,
            target=target if isinstance(target, str) else None,
        )
    )
