"""``POST /v1/wal/push?name=<WAL file name>``: where ``kybdr-agent wal-push %p`` (``archive_command`` mode)
hands PostgreSQL's completed WAL files to the agent — their bytes, not a path, so the agent may run as
another OS user than PostgreSQL and never needs to read the data directory.

The answer is the archive_command's exit status, so 200 means exactly one thing: the file is in the spool
durably (written to ``spool_dir/.incoming/<name>.tmp``, fsynced, renamed under its own name, the directory
fsynced) and its bytes are the ones the client hashed (``X-Content-SHA256``). From there the shipper
(``wal.archive``'s owner) seals and uploads it and deletes it once stored. Anything else is a refusal
PostgreSQL retries, and it leaves nothing behind: a bad name or size is refused before a byte is written, a
digest that does not match removes the temporary file, and so does a client that goes away mid-body.

* **Names**: only what ``wal.names.parse_wal_file_name`` accepts for the cluster's segment size — never a
  path. A segment (or a promotion's ``.partial``) is exactly ``wal_segment_size`` bytes; a history or
  backup-history file at most ``MAX_SMALL_FILE``.
* **Memory**: the body is streamed in ``CHUNK`` pieces (the framework's ``max_body_bytes`` is for JSON bodies
  and does not apply: the route declares ``raw_body``); hashing and writing run in a worker thread.
* **Twice the same file** (PostgreSQL retries after a timeout that came too late): 200 if the spool holds the
  same bytes, 409 if it holds different ones (never overwritten: two different contents under one WAL name
  mean two clusters share one archive, or a disk lied).
* **Bounded spool**: past ``max_spool_bytes`` the answer is 507 and PostgreSQL keeps the file in ``pg_wal``
  and retries; alerting on it is the shipper's job.
* **Audit**: one fsynced audit record per 16 MiB segment would double the cost of a push; the audit mapping
  leaves successful pushes out (each is recorded in the WAL archive itself), failures stay in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
from aiohttp import web

from kybdr_agent.control.http import Call, RouteSpec
from kybdr_agent.control.problems import Problem, json_response
from kybdr_agent.control.requests import QueryParam
from kybdr_agent.control.routes import Route, RouteTable
from kybdr_agent.telemetry import get_logger
from kybdr_agent.wal.names import (
    PartialSegment,
    Segment,
    WalNameError,
    check_segment_size,
    parse_wal_file_name,
)

__all__ = ["SHA256_HEADER", "WalPushTarget", "spool_bytes", "wal_routes"]

log = get_logger("kybdr_agent.wal")

SHA256_HEADER: Final = "X-Content-SHA256"
INCOMING: Final = ".incoming"
CHUNK: Final = 1 << 20  # written and hashed in the worker thread this much at a time
BODY_IDLE_SECONDS: Final = 10.0  # the client is local and sends a file it has: a stall is a dead client
MAX_SMALL_FILE: Final = 1 << 24  # a .history or .backup file; real ones are a few hundred bytes
MAX_PUSHES_AT_ONCE: Final = 4  # PostgreSQL's archiver sends one at a time; more is a retry storm or abuse
_NAME_SHAPE: Final = re.compile(r"[0-9A-F]{8}(?:[0-9A-F]{16}(?:\.partial|\.[0-9A-F]{8}\.backup)?|\.history)")
_SHA256: Final = re.compile(r"[0-9a-f]{64}")


def _parse_name(value: str) -> str:
    """The shape of a WAL file name (no path, no dots but the suffix); the handler checks it fully against
    the segment size, which the guard does not know."""
    if not _NAME_SHAPE.fullmatch(value):
        raise ValueError(
            "must be a WAL file name: a segment, <segment>.partial, <timeline>.history or "
            "<segment>.<offset>.backup, in upper-case hex (a name only, never a path)"
        )
    return value


NAME: Final = QueryParam(
    "name",
    {"type": "string", "pattern": f"^(?:{_NAME_SHAPE.pattern})$"},  # JSON Schema patterns are not anchored
    "the WAL file's name (required)",
    _parse_name,
)


@dataclass
class WalPushTarget:
    """Where pushed WAL files go, and what the route needs to judge them.

    ``segment_size`` is the cluster's ``wal_segment_size`` (the daemon asks PostgreSQL once and caches it);
    while it cannot be known the route answers 503 and PostgreSQL retries. ``on_spooled`` is told each
    file's name once it is in the spool (e.g. to wake the shipper); it must not block."""

    spool_dir: Path
    max_spool_bytes: int
    segment_size: Callable[[], Awaitable[int]]
    on_spooled: Callable[[str], None] | None = None


@dataclass
class _Admission:
    """Pushes running now: at most ``MAX_PUSHES_AT_ONCE``, and one at a time per name (a retry of a push
    still running waits for it, then finds its result in the spool)."""

    locks: dict[str, anyio.Lock] = field(default_factory=dict)
    in_flight: int = 0


def spool_bytes(spool_dir: Path) -> int:
    """Bytes in the spool: its files and the ones arriving in ``.incoming`` (blocking: call in a thread)."""
    total = 0
    for directory in (spool_dir, spool_dir / INCOMING):
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # shipped and deleted meanwhile
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare(spool_dir: Path) -> None:
    incoming = spool_dir / INCOMING
    if not incoming.is_dir():
        incoming.mkdir(mode=0o700, parents=True, exist_ok=True)
        _fsync_dir(spool_dir)


def _open_tmp(tmp: Path) -> int:
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _write_all(fd: int, hasher: Any, data: bytes) -> None:
    hasher.update(data)  # hashlib releases the GIL for large buffers
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _file_sha256(path: Path) -> tuple[int, str] | None:
    """Size and SHA-256 of a spooled file; None if it is not there (shipped and deleted)."""
    hasher = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as fh:
            while block := fh.read(CHUNK):
                hasher.update(block)
                size += len(block)
    except FileNotFoundError:
        return None
    return size, hasher.hexdigest()


def _settle(fd: int, tmp: Path, final: Path, spool_dir: Path) -> None:
    """Durable under its own name: the data, then the rename, then the directory entry."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    _fsync_dir(spool_dir)


def _expected_size(name: str, segment_size: int, content_length: int) -> None:
    try:
        wal_file = parse_wal_file_name(name, segment_size)
    except WalNameError as exc:
        raise Problem(400, "invalid-wal-name", "not a WAL file name", str(exc), close=True) from None
    if isinstance(wal_file, Segment | PartialSegment):
        if content_length != segment_size:
            raise Problem(
                400,
                "wrong-size",
                "a WAL segment is exactly wal_segment_size bytes",
                f"{name} is {content_length} bytes; this cluster's segments are {segment_size}",
                close=True,
            )
    elif content_length > MAX_SMALL_FILE:
        raise Problem(
            413, "body-too-large", "too large for a history file", f"at most {MAX_SMALL_FILE} bytes", close=True
        )


def _request_facts(call: Call) -> tuple[str, int, str]:
    """The name, Content-Length and claimed SHA-256 — all checked before any byte is read."""
    request = call.request
    name: str = call.query.get("name", "")
    if not name:
        raise Problem(400, "bad-query", "query parameter name is required", "e.g. ?name=000000010000000000000003")
    length = request.content_length
    if length is None:
        raise Problem(411, "length-required", "send Content-Length: the file's size", close=True)
    claimed = request.headers.get(SHA256_HEADER, "").strip().lower()
    if not _SHA256.fullmatch(claimed):
        raise Problem(400, "bad-digest-header", f"{SHA256_HEADER} must be the content's SHA-256 in hex", close=True)
    return name, length, claimed


async def _segment_size(target: WalPushTarget) -> int:
    try:
        return check_segment_size(await target.segment_size())
    except Exception as exc:  # noqa: BLE001 - whatever stops us knowing it, PostgreSQL must retry, not lose
        raise Problem(
            503,
            "wal-not-ready",
            "the agent does not know the cluster's WAL segment size yet",
            str(exc)[:200],
            retry_after=5,
            close=True,
        ) from None


async def _receive(request: web.Request, fd: int, length: int) -> str:
    """Stream ``length`` bytes of body into ``fd``; the content's SHA-256. At most ~2 × CHUNK in memory."""
    hasher = hashlib.sha256()
    pending: list[bytes] = []
    buffered = received = 0
    while received < length:
        try:
            with anyio.fail_after(BODY_IDLE_SECONDS):
                piece = await request.content.read(min(CHUNK, length - received))
        except TimeoutError:
            raise Problem(
                408, "request-timeout", "the body stalled", f"nothing for {BODY_IDLE_SECONDS:g} s", close=True
            ) from None
        except (OSError, ValueError) as exc:
            raise Problem(400, "incomplete-body", "the body could not be read", str(exc)[:200], close=True) from None
        if not piece:
            raise Problem(400, "incomplete-body", "the body ended early", f"{received} of {length} bytes", close=True)
        pending.append(piece)
        buffered += len(piece)
        received += len(piece)
        if buffered >= CHUNK or received == length:
            data = b"".join(pending)
            pending, buffered = [], 0
            await anyio.to_thread.run_sync(_write_all, fd, hasher, data)
    return hasher.hexdigest()


async def _push(target: WalPushTarget, call: Call) -> web.Response:
    name, length, claimed = _request_facts(call)
    size = await _segment_size(target)
    _expected_size(name, size, length)
    used = await anyio.to_thread.run_sync(spool_bytes, target.spool_dir)
    if used + length > target.max_spool_bytes:
        raise Problem(
            507,
            "spool-full",
            "the WAL spool is full",
            f"{used} bytes spooled, wal.max_spool_bytes is {target.max_spool_bytes}: the shipper is behind or "
            "cannot reach the repository (PostgreSQL keeps the file and retries)",
            retry_after=10,
            close=True,
        )
    spool_dir = target.spool_dir
    await anyio.to_thread.run_sync(_prepare, spool_dir)
    tmp = spool_dir / INCOMING / f"{name}.tmp"
    final = spool_dir / name
    fd: int | None = await anyio.to_thread.run_sync(_open_tmp, tmp)
    try:
        assert fd is not None
        digest = await _receive(call.request, fd, length)
        if digest != claimed:
            raise Problem(
                400,
                "digest-mismatch",
                "the content does not match its SHA-256",
                f"{name}: received {length} bytes hashing to {digest}, the client said {claimed}; nothing was kept",
            )
        existing = await anyio.to_thread.run_sync(_file_sha256, final)
        if existing is not None:
            if existing != (length, digest):
                raise Problem(
                    409,
                    "wal-conflict",
                    "a different file of this name is already spooled",
                    f"{name}: the spool holds {existing[0]} bytes hashing to {existing[1]}; refusing to replace "
                    "it (two clusters archiving to one place, or a damaged disk?)",
                )
            return json_response({"name": name, "bytes": length, "sha256": digest, "duplicate": True})
        settle_fd, fd = fd, None
        await anyio.to_thread.run_sync(_settle, settle_fd, tmp, final, spool_dir)
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()  # absent once renamed; otherwise nothing of a refused push stays behind
    log.debug("wal.pushed", file=name, bytes=length)
    if target.on_spooled is not None:
        target.on_spooled(name)
    return json_response({"name": name, "bytes": length, "sha256": digest, "duplicate": False})


def wal_routes(target: WalPushTarget) -> RouteTable:
    admission = _Admission()

    async def push(call: Call) -> web.Response:
        if admission.in_flight >= MAX_PUSHES_AT_ONCE:
            raise Problem(503, "busy", "too many WAL pushes at once", retry_after=1, close=True)
        name = call.query.get("name", "")
        lock = admission.locks.setdefault(name, anyio.Lock())
        admission.in_flight += 1
        try:
            async with lock:
                return await _push(target, call)
        finally:
            admission.in_flight -= 1
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                admission.locks.pop(name, None)

    spec = RouteSpec(
        method="POST",
        path="/v1/wal/push",
        role="operator",
        summary="archive one WAL file (archive_command mode: kybdr-agent wal-push %p); 200 once it is durably spooled",
        name="wal_push",
        query=(NAME,),
        raw_body="application/octet-stream",
        response="WalPushed",
        problems=(
            ("408", f"the body stalled for {BODY_IDLE_SECONDS:g} s"),
            ("409", "a different file of this name is already spooled"),
            ("411", "Content-Length is required"),
            ("413", "larger than a history file may be"),
            ("503", "the segment size is not known yet, or too many pushes at once"),
            ("507", "the spool is full (wal.max_spool_bytes)"),
        ),
    )
    schemas = {
        "WalPushed": {
            "type": "object",
            "required": ["name", "bytes", "sha256", "duplicate"],
            "properties": {
                "name": {"type": "string"},
                "bytes": {"type": "integer"},
                "sha256": {"type": "string"},
                "duplicate": {"type": "boolean", "description": "the spool already held these exact bytes"},
            },
        }
    }
    return RouteTable([Route(spec, push)], schemas)
