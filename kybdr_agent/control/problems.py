"""Problem documents (RFC 9457): every refusal and every failure the control API answers with.

Each has a stable ``type`` (a slug under ``PROBLEM_BASE``), a title, and a ``detail`` that names what was
wrong. ``problems`` is the middleware that turns exceptions into them, so nothing ends in a traceback for
the client; only a bug (500) is logged with one.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from kybdr_agent.errors import ConfigError, KybdrError, NotFound
from kybdr_agent.jobs import Busy, Conflict, Overloaded, ShuttingDown
from kybdr_agent.telemetry import get_logger

PROBLEM_BASE: Final = "https://kybdr.dev/problems/"
RawHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Observer = Callable[[web.Request, int, float], None]
# Told of every answered request (status and seconds, after refusals became problems): metrics, audit.
OBSERVERS: Final = web.AppKey("observers", tuple[Observer, ...])

log = get_logger("kybdr_agent.control")


class Problem(Exception):
    """A refusal or failure, raised anywhere under a handler and answered by ``problems``.

    ``retry_after`` adds a Retry-After header (refusals for load); ``close`` closes the connection after
    the answer (a body that was not, or could not be, read whole leaves it unusable)."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str = "",
        *,
        retry_after: int | None = None,
        close: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.retry_after = retry_after
        self.close = close
        self.extra = extra

    def response(self) -> web.Response:
        body = {"type": PROBLEM_BASE + self.slug, "title": self.title, "status": self.status, **self.extra}
        if self.detail:
            body["detail"] = self.detail
        response = web.Response(
            status=self.status, body=json.dumps(body).encode(), content_type="application/problem+json"
        )
        if self.retry_after is not None:
            response.headers["Retry-After"] = str(self.retry_after)
        if self.close:
            response.force_close()
        return response


def busy_problem(exc: Busy) -> Problem:
    """The job manager's refusals as HTTP: 429 at a limit, 409 for the same work or a busy database, 503
    while stopping; each with Retry-After."""
    retry = exc.retry_after or 30
    if isinstance(exc, Overloaded):
        return Problem(429, "overloaded", "too many jobs; try again later", str(exc), retry_after=retry)
    if isinstance(exc, Conflict):
        return Problem(409, "conflict", "the same work is already queued or running", str(exc), retry_after=retry)
    if isinstance(exc, ShuttingDown):
        return Problem(503, "shutting-down", "the agent is stopping", str(exc), retry_after=retry)
    return Problem(409, "busy", "the work cannot start now", str(exc), retry_after=retry)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data, default=str).encode(), content_type="application/json")


async def _answer_and_close(request: web.Request, response: web.Response) -> None:
    """Send the answer now and close the connection, without aiohttp's "lingering" read of the rest of an
    unread body (up to 10 s more): a client refused for its body (too large, too slow) gets its answer and
    no further time on the connection."""
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write_eof()
    request.protocol.force_close()  # the answer is in the transport's buffer; close() flushes it first


@web.middleware
async def problems(request: web.Request, handler: RawHandler) -> web.StreamResponse:
    started = time.monotonic()
    try:
        response = await handler(request)
    except Problem as problem:
        response = problem.response()
        if problem.close:
            await _answer_and_close(request, response)
    except Busy as exc:
        response = busy_problem(exc).response()
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
        log.exception("control.internal_error", method=request.method, path=request.path[:200])
        response = Problem(500, "internal", "internal error", "see the agent's log").response()
    seconds = time.monotonic() - started
    log.debug(
        "control.request", method=request.method, path=request.path[:200], status=response.status, ms=seconds * 1000
    )
    for observer in request.app.get(OBSERVERS, ()):
        try:
            observer(request, response.status, seconds)
        except Exception:  # an observer (metrics, audit) failing never changes the answer
            log.exception("control.observer_failed")
    return response
