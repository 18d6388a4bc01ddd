"""Checking what a request carries: its query string, its path's backup id and its body.

Bodies are parsed strictly: JSON only (415 otherwise), read within ``BODY_READ_SECONDS`` (408, so a
client holding half a body open cannot hold a handler forever), at most ``MAX_JSON_DEPTH`` levels deep, no
duplicate keys (``{"dry_run": true, "dry_run": false}`` must not silently mean false), no NaN, no number
longer than ``MAX_NUMBER_CHARS``, and fields validated in pydantic's strict mode (``"yes"``, ``"true"`` and
``1`` are not booleans). Query parameters are declared per route; any other is refused, and so is one given
twice. Every refusal is a 4xx ``Problem`` that names the parameter or field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import anyio
from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from kybdr_agent.control.problems import Problem

MAX_WAIT_SECONDS: Final = 24 * 3600.0
BODY_READ_SECONDS: Final = 10.0  # a local client sends a small JSON body at once; a slow one is hostile
MAX_JSON_DEPTH: Final = 32
MAX_NUMBER_CHARS: Final = 64
# Not in any name a request may carry: C0 controls and DEL (a NUL or newline in a database name would reach
# pg_dump's argv, a log line or an object key).
NO_CONTROL_CHARS: Final = r"^[^\x00-\x1f\x7f]*$"
TEXT_CHARS: Final = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"  # free text: tabs and line breaks allowed
_NO_CONTROL: Final = re.compile(NO_CONTROL_CHARS)
_JSON_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_STRUCTURE: Final = re.compile(rb'["\[\]{}]')
_STRING_REST: Final = re.compile(rb'(?:[^"\\]|\\.)*"', re.DOTALL)


class Body(BaseModel):
    """Request bodies: unknown fields are errors, and no type is coerced (``"true"`` is not a boolean)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


B = TypeVar("B", bound=Body)


@dataclass(frozen=True)
class QueryParam:
    """One query parameter a route takes: its OpenAPI schema and the parser that enforces it."""

    name: str
    schema: dict[str, Any]
    description: str
    parse: Callable[[str], Any]


def _parse_wait(value: str) -> bool:
    if value not in ("true", "false"):
        raise ValueError("must be true or false")
    return value == "true"


def _parse_timeout(value: str) -> float:
    if not _JSON_NUMBER.fullmatch(value):
        raise ValueError("must be a number of seconds")
    seconds = float(value)
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_WAIT_SECONDS):
        raise ValueError(f"must be between 0 and {MAX_WAIT_SECONDS:g} seconds")
    return seconds


def _parse_database(value: str) -> str:
    if not value or len(value.encode("utf-8", "surrogatepass")) > 63 or not _NO_CONTROL.match(value):
        raise ValueError("must be a database name: 1 to 63 bytes, no control characters")
    return value


WAIT: Final = QueryParam("wait", {"type": "boolean"}, "true: block until the jobs finish", _parse_wait)
TIMEOUT: Final = QueryParam(
    "timeout",
    {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS},
    "with wait=true: seconds to wait at most (then 202 with the jobs as they are)",
    _parse_timeout,
)
DATABASE: Final = QueryParam(
    "database",
    {"type": "string", "minLength": 1, "maxLength": 63, "pattern": NO_CONTROL_CHARS},
    "only this database's backups",
    _parse_database,
)


def parse_query(request: web.Request, params: tuple[QueryParam, ...]) -> dict[str, Any]:
    known = {p.name: p for p in params}
    parsed: dict[str, Any] = {}
    for name in request.query:
        if name in parsed:
            continue
        param = known.get(name)
        if param is None:
            takes = ", ".join(known) or "no query parameters"
            raise Problem(400, "bad-query", f"unknown query parameter {name[:64]!r}", f"this endpoint takes {takes}")
        values = request.query.getall(name)
        if len(values) > 1:
            raise Problem(400, "bad-query", f"query parameter {name} is given {len(values)} times")
        try:
            parsed[name] = param.parse(values[0])
        except ValueError as exc:
            raise Problem(400, "bad-query", f"bad query parameter {name}", f"{name} {exc}") from None
    return parsed


@dataclass(frozen=True)
class PathParam:
    """A path parameter a route checks before its handler runs (``{name}`` in the path): what it must match,
    and the 400 problem a value that does not is refused with."""

    name: str
    pattern: re.Pattern[str]
    problem_type: str
    title: str
    expected: str  # completes "… is not <title> (expected …)"
    description: str = ""


def check_path_params(request: web.Request, params: tuple[PathParam, ...]) -> dict[str, str]:
    values = dict(request.match_info)
    for param in params:
        value = values.get(param.name, "")
        if not param.pattern.fullmatch(value):
            detail = f"{value[:80]!r} is {param.title} (expected {param.expected})"
            raise Problem(400, param.problem_type, param.title, detail)
    return values


def _deep_field(raw: bytes) -> str | None:
    """If the JSON nests deeper than ``MAX_JSON_DEPTH``, the top-level key it does so under ("" if none).

    A linear scan (strings are skipped whole), so the limit holds before the parser recurses at all."""
    depth, pos, key = 0, 0, b'""'
    while match := _STRUCTURE.search(raw, pos):
        char = match.group()
        if char == b'"':
            rest = _STRING_REST.match(raw, match.end())
            if rest is None:
                return None  # an unterminated string: the parser will say so
            if depth == 1:
                key = raw[match.start() : rest.end()]
            pos = rest.end()
            continue
        pos = match.end()
        if char in b"[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                try:
                    return str(json.loads(key))
                except ValueError:
                    return ""
        else:
            depth -= 1
    return None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _Oversized:
    """A number too long to be any field's value: kept as a marker, so validation names its field."""

    def __repr__(self) -> str:
        return "<number too long>"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _bounded_int(text: str) -> int | _Oversized:
    return int(text) if len(text) <= MAX_NUMBER_CHARS else _Oversized()


def _bounded_float(text: str) -> float | _Oversized:
    value = float(text)
    return value if len(text) <= MAX_NUMBER_CHARS and math.isfinite(value) else _Oversized()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it (naming the field if it can)."""
    deep = _deep_field(raw)
    if deep is not None:
        where = f" (under {deep!r})" if deep else ""
        raise Problem(400, "too-deep", "the body nests too deeply", f"more than {MAX_JSON_DEPTH} levels{where}")
    try:
        text = raw.decode("utf-8")
        data = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_int=_bounded_int,
            parse_float=_bounded_float,
            parse_constant=_no_constant,
        )
    except _DuplicateKey as exc:
        raise Problem(
            400, "duplicate-key", "the body has a key twice", f"{exc.key[:64]!r} appears more than once"
        ) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Problem(400, "malformed-json", "the body is not valid JSON", str(exc)[:200]) from None
    if not isinstance(data, dict):
        raise Problem(400, "malformed-json", "the body must be a JSON object")
    return data


def _field_problem(err: Any) -> str:
    if err["type"] == "string_pattern_mismatch":
        return "must not contain control characters"
    return str(err["msg"])


def validate_body(model: type[Body], data: dict[str, Any]) -> Body:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raw_errors = exc.errors(include_url=False, include_input=False)
        errors = [{"field": ".".join(str(p) for p in e["loc"]), "problem": _field_problem(e)} for e in raw_errors]
        unknown = [e["field"] for e, raw in zip(errors, raw_errors, strict=True) if raw["type"] == "extra_forbidden"]
        if unknown:
            raise Problem(
                422,
                "unknown-field",
                "the body has fields this endpoint does not take",
                ", ".join(unknown),
                errors=errors,
            ) from None
        first = errors[0]
        detail = f"{first['field']}: {first['problem']}" if first["field"] else first["problem"]
        raise Problem(422, "invalid-body", "the body does not validate", detail, errors=errors) from None


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def read_body(request: web.Request, model: type[Body] | None, max_body_bytes: int) -> Body | None:
    """Read (within ``BODY_READ_SECONDS`` and ``max_body_bytes``) and check the body; None if the route
    takes none. An empty body is ``{}``."""
    too_large = Problem(413, "body-too-large", "request body too large", f"at most {max_body_bytes} bytes")
    if request.content_length is not None and request.content_length > max_body_bytes:
        too_large.close = True  # the rest is not read: the connection cannot be reused
        raise too_large
    try:
        with anyio.fail_after(BODY_READ_SECONDS):
            raw = await request.read()  # bounded by the app's client_max_size
    except TimeoutError:
        raise Problem(
            408,
            "request-timeout",
            "the body did not arrive in time",
            f"send it within {BODY_READ_SECONDS:g} s",
            close=True,
        ) from None
    except web.HTTPRequestEntityTooLarge:
        too_large.close = True
        raise too_large from None
    except (OSError, ValueError) as exc:  # the client went away mid-body, or sent a malformed chunk
        raise Problem(400, "incomplete-body", "the body could not be read", str(exc)[:200], close=True) from None
    if model is None:
        if raw.strip():
            raise Problem(400, "unexpected-body", "this endpoint takes no body")
        return None
    if raw.strip() and not _is_json(request.content_type):
        raise Problem(415, "unsupported-media-type", "the body must be JSON", "send Content-Type: application/json")
    return validate_body(model, decode_json_object(raw) if raw.strip() else {})
