"""``POST /v1/wal/push`` served by the real control app (``build_app``) on a real unix socket, reached by the
real ``wal-push`` client (in a worker thread: it is blocking, as in PostgreSQL's archiver) and by hand-made
requests for what the client never sends. What it proves: 200 only once the file is in the spool whole and
fsynced under its own name; every refusal (bad name, size, digest, a different file under the same name, a
full spool, an unknown segment size, a client gone mid-body) leaves nothing behind; the answer reaches
PostgreSQL's log as one line; and the client talks only to a socket served by a trusted user."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import pytest
from aiohttp import web

from kybdr_agent.control.http import ControlContext
from kybdr_agent.control.server import build_app
from kybdr_agent.jobs import JobManager
from kybdr_agent.wal.push_client import PushError, PushSettings, push
from kybdr_agent.wal.routes import MAX_PUSHES_AT_ONCE, SHA256_HEADER, WalPushTarget, spool_bytes, wal_routes

SEG: Final = 1 << 20
SEGMENT: Final = "000000010000000000000003"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def short_dir() -> Any:
    # A unix socket path is at most 107 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="walpush-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Served:
    socket_path: Path
    spool: Path
    spooled: list[str] = field(default_factory=list)

    @property
    def settings(self) -> PushSettings:
        return PushSettings(str(self.socket_path), None, "test")

    async def push(self, path: Path) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(push, str(path), self.settings)

    async def refused(self, path: Path) -> str:
        with pytest.raises(PushError) as caught:
            await self.push(path)
        return str(caught.value)

    async def raw(self, query: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        def send() -> tuple[int, str]:
            conn = http.client.HTTPConnection("agent", timeout=30)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.socket_path))
            conn.sock = sock
            try:
                conn.putrequest("POST", f"/v1/wal/push{query}")
                if "Transfer-Encoding" not in headers:
                    conn.putheader("Content-Length", str(len(body)))
                for name, value in headers.items():
                    conn.putheader(name, value)
                conn.endheaders()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before the body
                    sock.sendall(body if "Transfer-Encoding" not in headers else b"0\r\n\r\n")
                response = conn.getresponse()
                return response.status, response.read().decode()
            finally:
                conn.close()

        return await anyio.to_thread.run_sync(send)

    def files(self) -> list[str]:
        return sorted(p.name for p in self.spool.iterdir() if p.name != ".incoming")

    def incoming(self) -> list[str]:
        incoming = self.spool / ".incoming"
        return sorted(p.name for p in incoming.iterdir()) if incoming.exists() else []


@asynccontextmanager
async def serving(
    where: Path, *, max_spool_bytes: int = 64 * SEG, segment_size: Callable[[], Awaitable[int]] | None = None
) -> AsyncIterator[Served]:
    async def known() -> int:
        return SEG

    served = Served(where / "control.sock", where / "spool")
    target = WalPushTarget(served.spool, max_spool_bytes, segment_size or known, served.spooled.append)
    app = build_app(ControlContext(jobs=JobManager(max_parallel=1)), [wal_routes(target)])
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(served.socket_path)).start()
        yield served
    finally:
        await runner.cleanup()


def _file(where: Path, name: str, data: bytes) -> Path:
    path = where / name
    path.write_bytes(data)
    return path


@pytest.mark.anyio
async def test_a_segment_is_spooled_whole_and_durable_then_a_retry_is_recognised(short_dir: Path) -> None:
    data = os.urandom(SEG)
    segment = _file(short_dir, SEGMENT, data)
    async with serving(short_dir) as served:
        answer = await served.push(segment)
        assert answer == {"name": SEGMENT, "bytes": SEG, "sha256": hashlib.sha256(data).hexdigest(), "duplicate": False}
        assert served.files() == [SEGMENT]
        assert (served.spool / SEGMENT).read_bytes() == data
        assert (served.spool / SEGMENT).stat().st_mode & 0o777 == 0o600
        assert served.incoming() == []
        assert served.spooled == [SEGMENT]  # the shipper is told

        # PostgreSQL retries a push whose answer came too late: same bytes, 200, nothing changes.
        assert (await served.push(segment))["duplicate"] is True
        assert served.spooled == [SEGMENT]

        # A different file under the same name is never taken, nor does it replace the spooled one.
        (short_dir / "other").mkdir()
        other = _file(short_dir / "other", SEGMENT, os.urandom(SEG))
        message = await served.refused(other)
        assert "a different file of this name is already spooled" in message
        assert "(HTTP 409)" in message
        assert (served.spool / SEGMENT).read_bytes() == data
        assert served.incoming() == []

        # History and backup-history files are archived too, whatever their (small) size.
        history = _file(short_dir, "00000002.history", b"1\t0/3000000\tno recovery target specified\n")
        label = _file(short_dir, "000000010000000000000002.00000028.backup", b"START WAL LOCATION: 0/2000028\n")
        partial = _file(short_dir, "000000010000000000000004.partial", os.urandom(SEG))
        for path in (history, label, partial):
            assert (await served.push(path))["bytes"] == path.stat().st_size
        assert set(served.files()) == {SEGMENT, history.name, label.name, partial.name}


@pytest.mark.anyio
async def test_what_the_client_cannot_vouch_for_is_refused_and_leaves_nothing(short_dir: Path) -> None:
    data = os.urandom(SEG)
    good = {"Content-Type": "application/octet-stream", SHA256_HEADER: hashlib.sha256(data).hexdigest()}
    async with serving(short_dir) as served:
        # A transfer that does not hash to what the client read: refused, nothing kept.
        status, body = await served.raw(f"?name={SEGMENT}", data, {**good, SHA256_HEADER: "0" * 64})
        assert status == 400, body
        assert "digest-mismatch" in body
        # No digest, or not hex.
        for header in ({}, {SHA256_HEADER: "sha256=abc"}):
            status, body = await served.raw(f"?name={SEGMENT}", data, {"Content-Type": "x", **header})
            assert (status, "bad-digest-header" in body) == (400, True), body
        # Names: never a path, never lower case, nothing but what PostgreSQL archives; the seg part must fit
        # the cluster's segment size (1 MiB segments: 4096 per "log").
        for name in (
            "../000000010000000000000003",
            "pg_wal%2F000000010000000000000003",
            "000000010000000000000003%00",
            "00000001000000000000000a",
            "000000000000000000000003",
            "000000010000000000001000",
            "00000001.history.tmp",
            "",
        ):
            status, body = await served.raw(f"?name={name}", data, good)
            assert status == 400, (name, body)
        status, body = await served.raw("", data, good)
        assert (status, "name is required" in body) == (400, True), body
        # A segment is exactly wal_segment_size bytes.
        short = data[: SEG // 2]
        status, body = await served.raw(
            f"?name={SEGMENT}", short, {**good, SHA256_HEADER: hashlib.sha256(short).hexdigest()}
        )
        assert (status, "wrong-size" in body) == (400, True), body
        assert served.files() == []
        assert served.incoming() == []


@pytest.mark.anyio
async def test_a_full_spool_or_an_unknown_segment_size_makes_postgresql_retry(short_dir: Path) -> None:
    segment = _file(short_dir, SEGMENT, os.urandom(SEG))
    async with serving(short_dir, max_spool_bytes=SEG + SEG // 2) as served:
        await served.push(segment)
        second = _file(short_dir, "000000010000000000000004", os.urandom(SEG))
        message = await served.refused(second)
        assert "the WAL spool is full" in message
        assert "(HTTP 507)" in message
        assert served.files() == [SEGMENT]
        assert spool_bytes(served.spool) == SEG

    async def unknown() -> int:
        raise ConnectionRefusedError("cannot reach PostgreSQL")

    (short_dir / "b").mkdir()
    async with serving(short_dir / "b", segment_size=unknown) as s:
        message = await s.refused(segment)
        assert "does not know the cluster's WAL segment size yet" in message
        assert "(HTTP 503)" in message
        assert not s.spool.exists() or s.files() == []


@pytest.mark.anyio
async def test_a_client_gone_mid_body_leaves_nothing_in_the_spool(short_dir: Path) -> None:
    async with serving(short_dir) as served:

        def half_then_hang_up() -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(served.socket_path))
            head = (
                f"POST /v1/wal/push?name={SEGMENT} HTTP/1.1\r\nHost: agent\r\nContent-Length: {SEG}\r\n"
                f"{SHA256_HEADER}: {'a' * 64}\r\n\r\n"
            )
            sock.sendall(head.encode() + b"x" * (SEG // 2))
            time.sleep(0.2)
            sock.close()

        await anyio.to_thread.run_sync(half_then_hang_up)
        with anyio.fail_after(10):
            while served.incoming():
                await anyio.sleep(0.05)
        assert served.files() == []

        # Chunked, without Content-Length: the size cannot be checked first, so it is refused.
        status, body = await served.raw(
            f"?name={SEGMENT}", b"", {"Transfer-Encoding": "chunked", SHA256_HEADER: "a" * 64}
        )
        assert (status, "length-required" in body) == (411, True), body


def test_the_client_sends_wal_only_to_a_socket_served_by_a_trusted_user(tmp_path: Path) -> None:
    """A socket PostgreSQL's user could have made (here: served by ``postgres``) gets no WAL."""
    try:
        postgres = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user on this host")
    python = shutil.which("python3", path="/usr/bin:/bin")  # the venv's may be out of the postgres user's reach
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root and a system python3 to serve a socket as another user")
    where = Path(tempfile.mkdtemp(prefix="walpush-", dir="/tmp"))
    try:
        os.chown(where, postgres.pw_uid, postgres.pw_gid)
        sock_path = where / "impostor.sock"
        listener = (
            "import socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); print('up', flush=True)\n"
            "c, _ = s.accept(); time.sleep(5)\n"
        )
        proc = subprocess.Popen(
            [python, "-I", "-c", listener, str(sock_path)],
            stdout=subprocess.PIPE,
            user=postgres.pw_uid,
            group=postgres.pw_gid,
            extra_groups=[],
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"up\n"
            segment = _file(tmp_path, SEGMENT, os.urandom(SEG))
            with pytest.raises(PushError, match="refusing to send it WAL"):
                push(str(segment), PushSettings(str(sock_path), None, "test"))
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.anyio
async def test_pushes_at_once_are_bounded_and_one_name_is_taken_once(short_dir: Path) -> None:
    data = os.urandom(SEG)
    segment = _file(short_dir, SEGMENT, data)
    async with serving(short_dir) as served:
        # The same file pushed twice at once (a retry racing the first): one spools it, the other finds it.
        async with anyio.create_task_group() as tg:
            answers: list[dict[str, Any]] = []

            async def one() -> None:
                answers.append(await served.push(segment))

            tg.start_soon(one)
            tg.start_soon(one)
        assert sorted(a["duplicate"] for a in answers) == [False, True]
        assert served.files() == [SEGMENT]

        # Clients holding MAX_PUSHES_AT_ONCE pushes open: the next is told to come back, not queued.
        stalled: list[socket.socket] = []

        def stall(name: str) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(served.socket_path))
            head = (
                f"POST /v1/wal/push?name={name} HTTP/1.1\r\nHost: agent\r\nContent-Length: {SEG}\r\n"
                f"{SHA256_HEADER}: {'b' * 64}\r\n\r\n"
            )
            sock.sendall(head.encode() + b"x" * 1024)
            stalled.append(sock)

        for n in range(MAX_PUSHES_AT_ONCE):
            await anyio.to_thread.run_sync(stall, f"0000000100000000000000{0x20 + n:02X}")
        with anyio.fail_after(10):
            while len(served.incoming()) < MAX_PUSHES_AT_ONCE:
                await anyio.sleep(0.02)
        other = _file(short_dir, "000000010000000000000030", os.urandom(SEG))
        message = await served.refused(other)
        assert "too many WAL pushes at once" in message
        assert "(HTTP 503)" in message
        for sock in stalled:
            sock.close()
        with anyio.fail_after(10):
            while served.incoming():
                await anyio.sleep(0.02)
        assert (await served.push(other))["duplicate"] is False
        assert served.files() == [SEGMENT, other.name]
