"""``GET /v1/wal/status`` (viewer): how continuous WAL archiving is doing — the mode, the spool (bytes, files,
the oldest waiting), the last file shipped and when, the last error, and in stream mode pg_receivewal's state
and how much WAL its replication slot holds on the server. With ``[wal] enabled = false`` it answers
``{"enabled": false}``: the route is always there, so a client (and a monitoring check) can tell "archiving
is off" from "an older agent" without treating an agent working as configured as a server error."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from kybdr_agent.control.http import Call, RouteSpec
from kybdr_agent.control.problems import json_response
from kybdr_agent.control.routes import Route, RouteTable

if TYPE_CHECKING:
    from kybdr_agent.wal.component import WalComponent

_NULLABLE_OBJECT: Final = {"type": ["object", "null"]}


def wal_status_schemas() -> dict[str, Any]:
    return {
        "WalStatus": {
            "type": "object",
            "properties": {
                "enabled": {"type": "boolean"},
                "mode": {"type": "string", "enum": ["stream", "archive_command"]},
                "spool_dir": {"type": "string"},
                "max_spool_bytes": {"type": "integer"},
                "max_partial_age_seconds": {"type": "number"},
                "repository": {"type": "string"},
                "system_identifier": {"type": ["string", "null"]},
                "timeline_at_start": {"type": ["integer", "null"]},
                "wal_segment_size": {"type": ["integer", "null"]},
                "facts_error": {"type": ["string", "null"]},
                "shipper": _NULLABLE_OBJECT,
                "receiver": _NULLABLE_OBJECT,
            },
            # Only "enabled" when archiving is off; everything else describes a running archiver.
            "required": ["enabled"],
        }
    }


def wal_status_routes(wal: WalComponent | None) -> RouteTable:
    async def status(call: Call) -> web.Response:
        return json_response({"enabled": False} if wal is None else wal.status())

    spec = RouteSpec(
        method="GET",
        path="/v1/wal/status",
        role="viewer",
        summary="WAL archiving: mode, spool, last file shipped, receiver and replication slot",
        name="wal_status",
        response="WalStatus",
    )
    return RouteTable([Route(spec, status)], wal_status_schemas())
