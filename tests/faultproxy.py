"""A fault-injecting HTTP proxy between the agent and moto: S3 errors, resets, stalls and slow links.

Faults are chosen per request kind (``UploadPart``, ``CompleteMultipartUpload``, ``GetObject``…) by an
every-Nth rule or a seeded probability, so a run is reproducible, and optionally only for requests whose
path contains a string (a bucket), so tests with different faults can share one proxy. What it can do:

- ``error``: answer with an HTTP error and S3's XML body (500 InternalError, 503 SlowDown…) without
  forwarding, after reading the request body as S3 would;
- ``reset_request``: read part of the request body, then reset the connection (RST);
- ``reset_response``: forward the request (so the store *did* act on it), then reset part-way through
  the response — the lost-answer case: the client cannot tell whether its request happened;
- ``stall``: read the request, then never answer (nothing is forwarded);
- ``stall_body``: read part of the request body, then stop reading: the sender's window closes;
- ``stall_response``: forward the request, send part of the answer, then send nothing more;
- ``throttle``: relay both bodies at ``rate`` bytes/s, steadily.

The proxy speaks HTTP/1.1 itself on raw asyncio streams (keep-alive, Content-Length bodies — what botocore
sends), so a reset or a stall is exactly that on the wire. Its listening socket has a small receive buffer,
so a throttled or stalled read backs up into the sender's socket like a slow link would, instead of
vanishing into a multi-megabyte kernel buffer here. It runs its own event loop in a thread, so the agent
under test (a subprocess) reaches it over real TCP.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import aiohttp

from kybdr_agent.postgres.cluster import free_port

Action = Literal["error", "reset_request", "reset_response", "stall", "stall_body", "stall_response", "throttle"]
ALL_KINDS: Final = "*"
_HOP_HEADERS: Final = {"host", "content-length", "transfer-encoding", "connection", "expect", "keep-alive"}
_RECEIVE_BUFFER: Final = 64 * 1024
_REASONS: Final = {200: "OK", 204: "No Content", 206: "Partial Content", 404: "Not Found", 429: "Too Many Requests"}
_STALL_LIMIT: Final = 600.0


def s3_error_body(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>faultproxy</RequestId></Error>"
    ).encode()


def classify(method: str, target: str, headers: dict[str, str]) -> str:
    """The S3 operation a path-style request is, from its method, path, query and headers."""
    parts = urlsplit(target)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    segments = [s for s in parts.path.split("/") if s]
    has_key = len(segments) > 1
    copy = "x-amz-copy-source" in headers
    if method == "PUT":
        if "partNumber" in query and "uploadId" in query:
            return "UploadPartCopy" if copy else "UploadPart"
        if not has_key:
            return "CreateBucket"
        return "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        return "DeleteObjects" if "delete" in query else "Other"
    if method == "DELETE":
        if "uploadId" in query:
            return "AbortMultipartUpload"
        return "DeleteObject" if has_key else "DeleteBucket"
    if method == "HEAD":
        return "HeadObject" if has_key else "HeadBucket"
    if method == "GET":
        if has_key:
            return "ListParts" if "uploadId" in query else "GetObject"
        if "uploads" in query:
            return "ListMultipartUploads"
        return "ListObjectsV2" if query.get("list-type") == "2" else "ListObjects"
    return "Other"


@dataclass
class Fault:
    """One rule: which requests (kinds, path filter, every Nth or with a probability) get which fault."""

    kinds: frozenset[str]
    action: Action
    every: int = 0
    probability: float = 0.0
    limit: int | None = None
    where: str = ""
    status: int = 503
    code: str = "SlowDown"
    rate: int = 300_000
    seen: int = 0
    hits: int = 0

    def __post_init__(self) -> None:
        if not self.every and not self.probability:
            raise ValueError("a fault needs every=N or probability=p")

    @property
    def name(self) -> str:
        what = {
            "error": f"{self.status} {self.code}",
            "reset_request": "reset mid-request",
            "reset_response": "reset mid-response",
            "stall": "stall (no answer)",
            "stall_body": "stall mid-request body",
            "stall_response": "stall mid-response",
            "throttle": f"throttled to {self.rate // 1000} kB/s",
        }[self.action]
        return f"{what} on {'/'.join(sorted(self.kinds))}"

    def matches(self, kind: str, target: str) -> bool:
        """``target`` is the request's path and query, unquoted: ``where`` can name a bucket or a prefix."""
        return (kind in self.kinds or ALL_KINDS in self.kinds) and self.where in target

    def fires(self, rng: random.Random) -> bool:
        """Called for each matching request, in arrival order: does this one get the fault?"""
        self.seen += 1
        if self.limit is not None and self.hits >= self.limit:
            return False
        hit = self.seen % self.every == 0 if self.every else rng.random() < self.probability
        if hit:
            self.hits += 1
        return hit


def fault(
    kinds: str | Iterable[str],
    action: Action,
    *,
    every: int = 0,
    probability: float = 0.0,
    limit: int | None = None,
    where: str = "",
    status: int = 503,
    code: str = "SlowDown",
    rate: int = 300_000,
) -> Fault:
    names = frozenset([kinds] if isinstance(kinds, str) else kinds)
    return Fault(names, action, every, probability, limit, where, status, code, rate)


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.headers.get("content-length", "0") or 0)

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close" and self.version == "HTTP/1.1"


class _Closed(Exception):
    """The client went away, or we reset it: stop serving this connection."""


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.fail_upload_part = False
        self.delay_upload_part = 0.0
        self.counts: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.faults: list[Fault] = []
        self.port = free_port()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stopping: asyncio.Event | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, rule: Fault) -> Fault:
        with self._lock:
            self.faults.append(rule)
        return rule

    def remove(self, rule: Fault) -> None:
        with self._lock:
            self.faults = [installed for installed in self.faults if installed is not rule]

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(15)

    # --- the server ------------------------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120))
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        listener.bind(("127.0.0.1", self.port))
        server = await asyncio.start_server(self._connection, sock=listener, limit=_RECEIVE_BUFFER)
        self._ready.set()
        await self._stopping.wait()
        server.close()
        # Connections still open (stalled on purpose) are cut, so their handlers end.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._session.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await self._read_head(reader)
                if request is None:
                    return
                if not await self._serve_one(request, reader, writer):
                    return
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, OSError, asyncio.CancelledError):
            return
        finally:
            writer.transport.abort()

    async def _read_head(self, reader: asyncio.StreamReader) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise _Closed from exc
            return None
        except asyncio.LimitOverrunError as exc:
            raise _Closed from exc
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        raw = [tuple(line.split(":", 1)) for line in lines[1:] if line]
        pairs = [(k.strip(), v.strip()) for k, v in raw]
        return _Request(method, target, version, {k.lower(): v for k, v in pairs}, pairs)

    def _choose(self, kind: str, target: str) -> Fault | None:
        with self._lock:
            chosen = None
            for rule in self.faults:
                if rule.matches(kind, target) and rule.fires(self._rng) and chosen is None:
                    chosen = rule
            if chosen is not None:
                self.injected[chosen.name] += 1
            return chosen

    async def _serve_one(self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is to be closed."""
        kind = classify(request.method, request.target, request.headers)
        self.counts[kind] += 1
        if kind == "UploadPart":
            self.counts["upload_part"] += 1
        if kind == "AbortMultipartUpload":
            self.counts["abort"] += 1
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            await self._respond(writer, 501, [], s3_error_body("NotImplemented", "chunked bodies"), None)
            return False
        rule = self._choose(kind, unquote(request.target))
        if rule is None and kind == "UploadPart" and self.fail_upload_part:
            rule = fault(kind, "error", every=1, status=500, code="InternalError")
        action = rule.action if rule else None
        rate = rule.rate if rule and action == "throttle" else None
        head_only = request.method == "HEAD"
        if request.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        if action in ("reset_request", "stall_body"):
            await self._read_body(reader, request.length // 2, rate)
            if action == "reset_request":
                self._reset(writer)
                raise _Closed
            # Read nothing more: the client's bytes back up into its own socket until it gives up.
            assert self._stopping is not None
            await asyncio.wait_for(self._stopping.wait(), _STALL_LIMIT)
            raise _Closed
        body = await self._read_body(reader, request.length, rate)
        if rule and action == "error":
            error = s3_error_body(rule.code, "injected by the test proxy")
            await self._respond(writer, rule.status, [], error, None, head_only=head_only)
            return request.keep_alive
        if action == "stall":
            await self._wait_for_close(reader)
        if kind == "UploadPart" and self.delay_upload_part:
            await asyncio.sleep(self.delay_upload_part)
        status, headers, answer = await self._forward(request, body)
        if action in ("reset_response", "stall_response"):
            wire = self._encode(status, headers, answer, request.method)
            writer.write(wire[: max(len(wire) // 2, 1)] if answer else wire[: wire.index(b"\r\n") + 2])
            await writer.drain()
            if action == "reset_response":
                self._reset(writer)
            else:
                await self._wait_for_close(reader)
            raise _Closed
        await self._respond(writer, status, headers, answer, rate, head_only=head_only)
        return request.keep_alive

    async def _read_body(self, reader: asyncio.StreamReader, length: int, rate: int | None) -> bytes:
        if rate is None:
            return await reader.readexactly(length)
        chunks: list[bytes] = []
        started = time.monotonic()
        got = 0
        step = max(rate // 20, 1)
        while got < length:
            chunk = await reader.readexactly(min(step, length - got))
            chunks.append(chunk)
            got += len(chunk)
            await asyncio.sleep(max(0.0, started + got / rate - time.monotonic()))
        return b"".join(chunks)

    async def _wait_for_close(self, reader: asyncio.StreamReader) -> None:
        """Never answer; return (by raising) only once the client gives up and closes the connection."""
        while await asyncio.wait_for(reader.read(_RECEIVE_BUFFER), _STALL_LIMIT):
            pass
        raise _Closed

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _forward(self, request: _Request, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = [(k, v) for k, v in request.raw_headers if k.lower() not in _HOP_HEADERS]
        skip = {"Content-Type", "Accept-Encoding", "User-Agent", "Accept"} - {k.title() for k, _ in headers}
        async with self._session.request(
            request.method,
            self.upstream + request.target,
            headers=headers,
            data=body if request.method not in ("GET", "HEAD") else None,
            skip_auto_headers=skip,
        ) as upstream:
            answer = await upstream.read()
            raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.raw_headers]
            out = [(k, v) for k, v in raw if k.lower() not in _HOP_HEADERS - {"content-length"}]
            return upstream.status, out, answer

    @staticmethod
    def _encode(status: int, headers: list[tuple[str, str]], body: bytes, method: str) -> bytes:
        reason = _REASONS.get(status, "Status")
        lines = [f"HTTP/1.1 {status} {reason}"]
        has_length = False
        for key, value in headers:
            if key.lower() == "content-length":
                if method != "HEAD":
                    continue
                has_length = True
            lines.append(f"{key}: {value}")
        if not has_length:
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if method == "HEAD" else head + body

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        rate: int | None,
        *,
        head_only: bool = False,
    ) -> None:
        if not headers:
            headers = [("Content-Type", "application/xml")]
        wire = self._encode(status, headers, body, "HEAD" if head_only else "GET")
        if rate is None:
            writer.write(wire)
            await writer.drain()
            return
        started = time.monotonic()
        step = max(rate // 20, 1)
        for offset in range(0, len(wire), step):
            writer.write(wire[offset : offset + step])
            await writer.drain()
            await asyncio.sleep(max(0.0, started + (offset + step) / rate - time.monotonic()))
