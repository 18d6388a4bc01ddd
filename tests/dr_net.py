"""Network fixtures for the DR tests: scripted health URLs, a partitioning TCP proxy, a split-brain prober.

Each runs its own asyncio loop in a daemon thread of the test process and listens on 127.0.0.1 at a random
port, so the same objects serve in-process probe tests and end-to-end tests whose agents are subprocesses
(they reach these over real TCP). All are context managers; ``.set(mode)`` is safe from any thread.

- ``ScriptedHttpServer``: a health URL, a witness or a stand-in peer. Modes: ``"ok"`` (200), ``"fail"`` (503),
  ``"hang"`` (accepts, reads the request, never answers), ``"down"`` (listening socket closed: connections
  are refused, open ones cut). Per-path status and JSON bodies, an optional bearer token, request counts.
- ``TcpProxy``: plain bytes between a client and an upstream (PostgreSQL's protocol or HTTP alike). Modes:
  ``"pass"``; ``"refuse"`` (new connections reset at once, open ones cut); ``"blackhole"`` (new connections
  accepted and never forwarded or answered, open ones stop forwarding — a partition, not a crash: when the
  mode returns to ``"pass"`` the stalled bytes flow again, as after a healed link); ``"delay"`` (``ms``
  added before each forwarded chunk, both ways).
- ``WriteProber``: every 100 ms, an ordinary autocommit INSERT on each database; ``both_writable_moments()``
  lists the ticks at which more than one accepted — the split-brain measure (G4 in dr-anchors.md §8).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import asyncpg

from kybdr_agent.postgres.connection import Connection

HttpMode = Literal["ok", "fail", "hang", "down"]
ProxyMode = Literal["pass", "refuse", "blackhole", "delay"]
_T = TypeVar("_T")
_START_TIMEOUT: Final = 10.0
_CHUNK: Final = 64 * 1024
_REASONS: Final = {200: "OK", 204: "No Content", 401: "Unauthorized", 404: "Not Found", 503: "Service Unavailable"}


def _reset(writer: asyncio.StreamWriter) -> None:
    """Cut a connection with a RST (SO_LINGER 0), as a refusing host or a dropped link would look."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class _LoopThread:
    """An event loop in a daemon thread; ``call`` runs a coroutine on it from any thread and waits."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        self._loop.close()

    def start(self) -> None:
        self._thread.start()

    def call(self, make: Callable[[], Awaitable[_T]], timeout: float = _START_TIMEOUT) -> _T:
        async def run() -> _T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(cancel_all)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_START_TIMEOUT)


@dataclass
class _Answer:
    status: int
    body: bytes
    content_type: str


class ScriptedHttpServer:
    """A tiny HTTP/1.1 server whose answers a test scripts: a health URL, a witness, or a fake peer.

    ``set(mode)`` sets what every path answers; ``set_path(path, status=..., json_body=...)`` overrides one
    path (a peer's ``/v1/disaster-recovery/peer`` JSON, say) while the mode is ``"ok"`` or ``"fail"``
    (``"hang"`` and ``"down"`` win: a hung or dead host answers nothing on any path). With ``token`` set,
    a request without ``Authorization: Bearer <token>`` gets 401, as the agent's control API would.
    """

    def __init__(self, *, mode: HttpMode = "ok", token: str | None = None) -> None:
        self.token = token
        self.requests: Counter[str] = Counter()  # path → requests received (hung ones included)
        self.last_headers: dict[str, str] = {}
        self._mode: HttpMode = mode
        self._paths: dict[str, _Answer] = {}
        self._lock = threading.Lock()
        self._thread = _LoopThread("scripted-http")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._release: asyncio.Event | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def __enter__(self) -> ScriptedHttpServer:
        self._thread.start()
        self._thread.call(self._bind_any)
        if self._mode == "down":
            self._thread.call(self._close)
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.call(self._close)
        self._thread.stop()

    def set(self, mode: HttpMode) -> None:
        with self._lock:
            previous, self._mode = self._mode, mode
        if mode == "down" and previous != "down":
            self._thread.call(self._close)
        elif mode != "down" and previous == "down":
            self._thread.call(self._open)
        if previous == "hang" and mode != "hang":
            self._thread.call(self._release_hung)

    def set_path(self, path: str, *, status: int = 200, json_body: Any = None, body: bytes = b"") -> None:
        """What ``path`` answers from now on (in modes ok and fail); ``json_body`` is sent as JSON."""
        content_type = "text/plain"
        if json_body is not None:
            body, content_type = json.dumps(json_body).encode(), "application/json"
        with self._lock:
            self._paths[path] = _Answer(status, body, content_type)

    def clear_path(self, path: str) -> None:
        with self._lock:
            self._paths.pop(path, None)

    # --- the loop side ----------------------------------------------------------------------------

    async def _bind_any(self) -> None:
        sock = _listener(0)
        self.port = sock.getsockname()[1]
        self._release = asyncio.Event()
        self._server = await asyncio.start_server(self._connection, sock=sock)

    async def _open(self) -> None:
        # The same port again (SO_REUSEADDR): the URL the agent was configured with comes back to life.
        self._server = await asyncio.start_server(self._connection, sock=_listener(self.port))

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()

    async def _release_hung(self) -> None:
        # Hung requests are never answered late (a host that hung does not answer late): cut them.
        assert self._release is not None
        self._release.set()
        self._release = asyncio.Event()
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        key, value = line.split(":", 1)
                        headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                path = target.split("?", 1)[0]
                with self._lock:
                    self.requests[path] += 1
                    self.last_headers = headers
                    mode = self._mode
                    answer = self._paths.get(path)
                if mode == "hang":
                    assert self._release is not None
                    await self._release.wait()  # until set() leaves "hang" or the server goes down
                    return
                if mode == "down":
                    return
                if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
                    answer = _Answer(401, b'{"error": "unauthorized"}', "application/json")
                elif answer is None:
                    status = 200 if mode == "ok" else 503
                    answer = _Answer(status, b"ok\n" if status == 200 else b"unavailable\n", "text/plain")
                keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                reason = _REASONS.get(answer.status, "Status")
                wire = (
                    f"HTTP/1.1 {answer.status} {reason}\r\nContent-Type: {answer.content_type}\r\n"
                    f"Content-Length: {len(answer.body)}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n"
                ).encode("latin-1")
                writer.write(wire + (answer.body if method != "HEAD" else b""))
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, OSError):
            return
        except asyncio.CancelledError:
            return  # the server is stopping (see TcpProxy._connection)
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


class TcpProxy:
    """Bytes between 127.0.0.1:``port`` and the upstream, cut, blackholed or delayed on demand."""

    def __init__(self, upstream_host: str, upstream_port: int, *, mode: ProxyMode = "pass", delay_ms: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.accepted = 0  # connections accepted, in any mode
        self.port = 0
        self._mode: ProxyMode = mode
        self._delay = delay_ms / 1000
        self._lock = threading.Lock()
        self._thread = _LoopThread("tcp-proxy")
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def mode(self) -> ProxyMode:
        with self._lock:
            return self._mode

    def dsn(self, user: str = "postgres", database: str = "postgres") -> str:
        """A TCP DSN through this proxy (the password comes from a password file, never the DSN)."""
        return f"host=127.0.0.1 port={self.port} user={user} dbname={database}"

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._thread.call(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.call(self._stop)
        self._thread.stop()

    def set(self, mode: ProxyMode, *, delay_ms: int | None = None) -> None:
        with self._lock:
            self._mode = mode
            if delay_ms is not None:
                self._delay = delay_ms / 1000
        self._thread.call(self._apply)

    async def _start(self) -> None:
        sock = _listener(0)
        self.port = sock.getsockname()[1]
        self._flowing = asyncio.Event()
        self._server = await asyncio.start_server(self._connection, sock=sock)
        await self._apply()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            _reset(writer)

    async def _apply(self) -> None:
        assert self._flowing is not None
        mode = self.mode
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "refuse":
            for writer in list(self._writers):
                _reset(writer)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        if self.mode == "refuse":
            _reset(writer)
            return
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()  # a blackholed connection is accepted and left waiting
            if self.mode == "refuse":
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(up_writer)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            return  # the proxy is stopping; ending quietly keeps asyncio from logging the cancelled handler
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    break
                with self._lock:
                    delay = self._delay if self._mode == "delay" else 0.0
                if delay:
                    await asyncio.sleep(delay)
                await self._flowing.wait()  # read before a blackhole began: held, never delivered early
                writer.write(chunk)
                await writer.drain()
        finally:
            # One side finished or failed: end both, as a real connection would.
            writer.transport.abort()
            reader.feed_eof()


@dataclass(frozen=True)
class WriteAttempt:
    tick: int  # the 100 ms tick the attempt belongs to (ticks count from the prober's start)
    at: float  # time.time() when the attempt started
    label: str
    accepted: bool
    error: str = ""


class WriteProber:
    """Every ``interval`` s, an ordinary write on each database; who accepted it, tick by tick.

    The write is a plain autocommit ``INSERT`` into ``kybdr_write_probe`` (created on first use by whichever
    side accepts writes; it replicates to the standby). Not ``pg_logical_emit_message`` in ``BEGIN READ
    WRITE``: a fence sets ``default_transaction_read_only``, which an explicit READ WRITE transaction
    overrides, and the split-brain question is whether an ordinary application's write lands on two servers.
    An attempt slower than ``timeout`` counts as refused; a target still busy with an earlier attempt skips
    the tick (no attempt is recorded for it).
    """

    TABLE: Final = "kybdr_write_probe"

    def __init__(
        self,
        dsns: Mapping[str, str],
        *,
        password_file: Path | None = None,
        database: str = "postgres",
        interval: float = 0.1,
        timeout: float = 0.5,
    ) -> None:
        self.attempts: list[WriteAttempt] = []
        self._conns = {
            label: Connection.from_settings(dsn, password_file, None, timeout) for label, dsn in dsns.items()
        }
        self._database = database
        self._interval = interval
        self._timeout = timeout
        self._lock = threading.Lock()
        self._thread = _LoopThread("write-prober")
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> WriteProber:
        self._thread.start()

        async def start() -> None:
            self._task = asyncio.get_running_loop().create_task(self._run())

        self._thread.call(start)
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.stop()

    def snapshot(self) -> list[WriteAttempt]:
        with self._lock:
            return list(self.attempts)

    def accepted(self, label: str) -> int:
        return sum(1 for a in self.snapshot() if a.label == label and a.accepted)

    def both_writable_moments(self) -> list[float]:
        """Start times of the ticks at which more than one target accepted a write."""
        by_tick: dict[int, list[WriteAttempt]] = {}
        for attempt in self.snapshot():
            if attempt.accepted:
                by_tick.setdefault(attempt.tick, []).append(attempt)
        return [min(a.at for a in hits) for tick, hits in sorted(by_tick.items()) if len({a.label for a in hits}) > 1]

    async def _run(self) -> None:
        sessions: dict[str, asyncpg.Connection | None] = dict.fromkeys(self._conns)
        busy: dict[str, asyncio.Task[None]] = {}
        started = time.monotonic()
        tick = 0
        try:
            while True:
                now = time.time()
                for label in self._conns:
                    if label in busy and not busy[label].done():
                        continue
                    busy[label] = asyncio.create_task(self._attempt(tick, now, label, sessions))
                tick += 1
                await asyncio.sleep(max(0.0, started + tick * self._interval - time.monotonic()))
        finally:
            for task in busy.values():
                task.cancel()
            await asyncio.gather(*busy.values(), return_exceptions=True)
            for session in sessions.values():
                if session is not None:
                    session.terminate()

    async def _attempt(self, tick: int, at: float, label: str, sessions: dict[str, asyncpg.Connection | None]) -> None:
        error = ""
        try:
            async with asyncio.timeout(self._timeout):
                session = sessions[label]
                if session is None or session.is_closed():
                    session = await asyncpg.connect(**self._conns[label].asyncpg_kwargs(self._database))
                    sessions[label] = session
                try:
                    await session.execute(f"INSERT INTO {self.TABLE}(label) VALUES ($1)", label)
                except asyncpg.UndefinedTableError:
                    # Two labels may be one server (through a proxy): the loser of the CREATE race just inserts.
                    with contextlib.suppress(asyncpg.UniqueViolationError):
                        await session.execute(
                            f"CREATE TABLE IF NOT EXISTS {self.TABLE}"
                            "(id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), label text NOT NULL)"
                        )
                    await session.execute(f"INSERT INTO {self.TABLE}(label) VALUES ($1)", label)
            accepted = True
        except (
            TimeoutError,
            OSError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ) as exc:
            # InternalClientError: a session an earlier attempt's timeout left mid-operation
            accepted = False
            error = str(exc) or type(exc).__name__
            stale = sessions.get(label)
            if stale is not None and not isinstance(exc, asyncpg.PostgresError):
                stale.terminate()  # the link is gone or stuck: a fresh session next tick
                sessions[label] = None
        with self._lock:
            self.attempts.append(WriteAttempt(tick, at, label, accepted, error))
