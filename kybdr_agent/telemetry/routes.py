"""``GET /metrics``: the Prometheus text of the agent's metrics, on the control API (viewer role over TCP)
and, when ``telemetry.metrics_listen`` is set, on a listener of its own that serves nothing else and needs
no token — what a Prometheus server scrapes without holding an API token. Rendering is a few hundred
series at most (labels come from the configuration), fast enough to stay on the event loop."""

from __future__ import annotations

import contextlib
from typing import Final

from aiohttp import web

from kybdr_agent.control.routes import Call, Route, RouteSpec, RouteTable
from kybdr_agent.errors import ConfigError
from kybdr_agent.telemetry import get_logger
from kybdr_agent.telemetry.metrics import CONTENT_TYPE, AgentMetrics

MEDIA_TYPE: Final = "text/plain"
log = get_logger("kybdr_agent.telemetry")


def _response(metrics: AgentMetrics) -> web.Response:
    response = web.Response(body=metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


def metrics_routes(metrics: AgentMetrics) -> RouteTable:
    async def get_metrics(call: Call) -> web.Response:
        return _response(metrics)

    return RouteTable(
        [
            Route(
                RouteSpec(
                    method="GET",
                    path="/metrics",
                    role="viewer",
                    summary="Prometheus metrics (text exposition format)",
                    name="metrics",
                    media_type=MEDIA_TYPE,
                ),
                get_metrics,
            )
        ]
    )


async def start_metrics_listener(metrics: AgentMetrics, listen: str) -> web.AppRunner:
    """The scrape-only listener: ``GET /metrics`` and nothing else (404 for any other path)."""

    async def scrape(request: web.Request) -> web.Response:
        return _response(metrics)

    app = web.Application(client_max_size=1024)
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    try:
        await web.TCPSite(runner, host.strip("[]"), int(port)).start()
    except (OSError, ValueError) as exc:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"telemetry.metrics_listen {listen}: cannot listen: {reason}") from None
    log.info("telemetry.metrics_listening", address=listen)
    return runner
