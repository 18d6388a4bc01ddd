"""The OpenAPI 3.1 document of the control API, generated from the routes so it cannot drift from them.

Every answer a route can give is described, with its schema: the jobs (202, and 200 with ``wait=true``),
each refusal as ``application/problem+json`` (with ``Retry-After`` where it is sent), and the request
bodies from the same pydantic models the server validates with. A body whose model has required fields is
a required body. The fault suite runs schemathesis against this document and the real agent, so a
response that does not match it is a failing test.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from kybdr_agent import __version__
from kybdr_agent.control.http import RouteSpec
from kybdr_agent.control.requests import BODY_READ_SECONDS, MAX_JSON_DEPTH

SCHEMAS: Final = "#/components/schemas/"
_PROBLEM: Final = {"application/problem+json": {"schema": {"$ref": SCHEMAS + "Problem"}}}
_RETRY_AFTER: Final = {
    "Retry-After": {"description": "seconds after which to try again", "schema": {"type": "integer", "minimum": 1}}
}
_NULLABLE_STRING: Final = {"type": ["string", "null"]}
AUTH_DESCRIPTION: Final = (
    "Over TCP every request needs `Authorization: Bearer <token>` with a token from a [[control.tokens]] file: "
    "the scheme name is case-insensitive (RFC 6750), followed by exactly one space and the token; any other "
    "form is refused with 401. Over the unix socket no token is needed (the socket's permissions decide, "
    "and its peers are admins)."
)


def _fixed_schemas() -> dict[str, Any]:
    job = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "kind": {"type": "string"},
            "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "database": _NULLABLE_STRING,
            "params": {"type": "object"},
            "created_at": {"type": "string"},
            "started_at": _NULLABLE_STRING,
            "finished_at": _NULLABLE_STRING,
            "result": {"description": "what the job produced (its kind decides the shape); null until it ends"},
            "error": _NULLABLE_STRING,
            "progress": {
                "type": "object",
                "properties": {"bytes_done": {"type": "integer"}, "stage": {"type": "string"}},
                "required": ["bytes_done", "stage"],
            },
        },
        "required": [
            "id",
            "kind",
            "status",
            "database",
            "params",
            "created_at",
            "started_at",
            "finished_at",
            "result",
            "error",
            "progress",
        ],
    }
    return {
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details; `type` is stable, `detail` names what was wrong",
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"field": {"type": "string"}, "problem": {"type": "string"}},
                        "required": ["field", "problem"],
                    },
                },
            },
            "required": ["type", "title", "status"],
        },
        "Job": job,
        "Jobs": {
            "type": "object",
            "properties": {
                "jobs": {"type": "array", "items": {"$ref": SCHEMAS + "Job"}},
                "job_ids": {"type": "array", "items": {"type": "string"}},
                "job_id": {"type": "string", "description": "present when exactly one job started"},
            },
            "required": ["jobs", "job_ids"],
        },
        "JobList": {
            "type": "object",
            "properties": {"jobs": {"type": "array", "items": {"$ref": SCHEMAS + "Job"}}},
            "required": ["jobs"],
        },
        "Health": {
            "type": "object",
            "properties": {
                "status": {"enum": ["ok", "stopping"]},
                "version": {"type": "string"},
                "uptime_seconds": {"type": "number"},
                "jobs_running": {"type": "integer"},
                "jobs_queued": {"type": "integer"},
            },
            "description": "the framework's figures, then each component's own fields (e.g. the backup "
            "component's last housekeeping sweep)",
            "required": ["status", "version", "uptime_seconds", "jobs_running"],
        },
        "OpenAPIDocument": {"type": "object"},
    }


def _problem(description: str, *, retry: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": _PROBLEM}
    if retry:
        answer["headers"] = _RETRY_AFTER
    return answer


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": SCHEMAS + schema}}}}


def _operation(spec: RouteSpec, schemas: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "400": _problem("bad input: an unknown or malformed query parameter, path parameter or body"),
        "401": _problem("missing or invalid token (TCP only)"),
        "403": _problem("the token's role is too low"),
    }
    parameters: list[dict[str, Any]] = []
    checked = {param.name: param for param in spec.path_params}
    for name in re.findall(r"{(\w+)}", spec.path):
        path_param = checked.get(name)
        schema: dict[str, Any] = {"type": "string"}
        if path_param is not None:
            schema["pattern"] = path_param.pattern.pattern
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    if "{" in spec.path or spec.repository:
        responses["404"] = _problem("not found (no such backup or job)")
    for param in spec.query:
        parameters.append(
            {
                "name": param.name,
                "in": "query",
                "required": False,
                "schema": param.schema,
                "description": param.description,
            }
        )
    op: dict[str, Any] = {
        "operationId": spec.name,
        "summary": spec.summary,
        "description": f"Requires the {spec.role} role over TCP; unix-socket peers are admins. "
        "Unknown query parameters are refused (400).",
        "parameters": parameters,
        "responses": responses,
    }
    if spec.body is not None:
        schema = spec.body.model_json_schema(ref_template=SCHEMAS + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[spec.body.__name__] = schema
        op["requestBody"] = {
            "required": bool(schema.get("required")),
            "description": "JSON only; an empty body means {}. Strict: no duplicate keys, no coercion "
            f'("true" is not a boolean), at most {MAX_JSON_DEPTH} levels deep.',
            "content": {"application/json": {"schema": {"$ref": SCHEMAS + spec.body.__name__}}},
        }
        responses["408"] = _problem(f"the body did not arrive within {BODY_READ_SECONDS:g} s")
        responses["413"] = _problem("body too large")
        responses["415"] = _problem("the body is not JSON (Content-Type)")
        responses["422"] = _problem("the body does not validate (the problem names the field)")
    if spec.raw_body:
        op["requestBody"] = {
            "required": True,
            "description": "the raw bytes, streamed (not limited by control.max_body_bytes)",
            "content": {spec.raw_body: {"schema": {"type": "string", "format": "binary"}}},
        }
    if spec.repository:
        responses["422"] = _problem("the body does not validate, or the configuration does not allow this")
        responses["502"] = _problem("the repository could not be read")
    if spec.job:
        responses["200"] = _json("Jobs", "with wait=true: the jobs finished (each job's status says how)")
        responses["202"] = _json("Jobs", "accepted: the jobs are queued or running")
        responses["409"] = _problem(
            "the same work is already queued or running, or the database already has a job", retry=True
        )
        responses["429"] = _problem("this kind of job, or the queue, is at its limit", retry=True)
        responses["503"] = _problem("the agent is stopping", retry=True)
    elif spec.media_type != "application/json":
        responses["200"] = {"description": "OK", "content": {spec.media_type: {"schema": {"type": "string"}}}}
    else:
        responses["200"] = _json(spec.response or "OpenAPIDocument", "OK")
    for status, description in spec.problems:
        existing = responses.get(status)
        if existing is None:
            responses[status] = _problem(description)
        else:
            existing["description"] = f"{existing['description']}; or {description}"
    return op


def openapi_document(routes: Sequence[RouteSpec], component_schemas: Mapping[str, Any]) -> dict[str, Any]:
    """The document for every route of every component; ``component_schemas`` are the schemas their
    answers name (``RouteSpec.response``) beside the framework's own (jobs, problems, health)."""
    schemas = {**component_schemas, **_fixed_schemas()}
    paths: dict[str, dict[str, Any]] = {}
    for spec in routes:
        paths.setdefault(spec.path, {})[spec.method.lower()] = _operation(spec, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kybdr-agent control API",
            "version": __version__,
            "description": "Long work answers 202 with jobs; ?wait=true blocks until they finish. "
            "Every error is application/problem+json, and a refused request changes nothing. " + AUTH_DESCRIPTION,
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": AUTH_DESCRIPTION}},
        },
        "security": [{"bearer": []}],
    }
