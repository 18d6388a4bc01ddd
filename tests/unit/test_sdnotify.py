"""systemd notify protocol (kybdr_agent/sdnotify.py) against real datagram sockets standing in for systemd.

Each test binds a ``SOCK_DGRAM`` socket — a file in tmp_path, or a name in the abstract namespace — points
``$NOTIFY_SOCKET`` at it and reads back exactly what systemd would have received.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from kybdr_agent import sdnotify

RECV_TIMEOUT: float = 5.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test runner itself might run under systemd; never let its variables leak into a test."""
    for name in (sdnotify.NOTIFY_SOCKET_ENV, sdnotify.WATCHDOG_USEC_ENV, sdnotify.WATCHDOG_PID_ENV):
        monkeypatch.delenv(name, raising=False)


def _receiver() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(RECV_TIMEOUT)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    with _receiver() as sock:
        sock.bind(str(path))
        monkeypatch.setenv(sdnotify.NOTIFY_SOCKET_ENV, str(path))
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"kybdr-test-{uuid.uuid4()}"
    with _receiver() as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv(sdnotify.NOTIFY_SOCKET_ENV, "@" + name)
        yield sock


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> socket.socket:
    sock: socket.socket = request.getfixturevalue(f"{request.param}_socket")
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    """Everything already queued on ``sock``, without waiting for more."""
    got: list[bytes] = []
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(4096))
    except BlockingIOError:
        return got
    finally:
        sock.settimeout(RECV_TIMEOUT)


# --- notify and its helpers --------------------------------------------------------------------------------


def test_notify_sends_lines_as_one_datagram(notify_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1", "STATUS=hello") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=hello"
    assert _drain(notify_socket) == []


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda: sdnotify.ready(), b"READY=1"),
        (lambda: sdnotify.ready("backing up 3 databases"), b"READY=1\nSTATUS=backing up 3 databases"),
        (lambda: sdnotify.stopping(), b"STOPPING=1"),
        (lambda: sdnotify.status("idle"), b"STATUS=idle"),
        (lambda: sdnotify.status("line one\nline two"), b"STATUS=line one line two"),
        (lambda: sdnotify.watchdog(), b"WATCHDOG=1"),
        (lambda: sdnotify.reloading(123456789), b"RELOADING=1\nMONOTONIC_USEC=123456789"),
    ],
    ids=["ready", "ready-status", "stopping", "status", "status-newline", "watchdog", "reloading"],
)
def test_helpers_send_exact_messages(notify_socket: socket.socket, send: Callable[[], bool], expected: bytes) -> None:
    assert send() is True
    assert notify_socket.recv(4096) == expected


def test_monotonic_now_usec_reads_clock_monotonic() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    now = sdnotify.monotonic_now_usec()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= now <= after


def test_unset_socket_returns_false() -> None:
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False


def test_empty_socket_variable_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET_ENV, "")
    assert sdnotify.notify("READY=1") is False


def test_missing_socket_path_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET_ENV, str(tmp_path / "gone" / "notify.sock"))
    assert sdnotify.notify("READY=1") is False


def test_socket_file_without_listener_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd went away: the socket file is still there but nobody receives (ECONNREFUSED)."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    assert path.exists()
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET_ENV, str(path))
    assert sdnotify.watchdog() is False


def test_unbound_abstract_name_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET_ENV, f"@kybdr-test-{uuid.uuid4()}")
    assert sdnotify.stopping() is False


@pytest.mark.parametrize("value", ["relative/notify.sock", "vsock:2:1234"])
def test_unsupported_address_returns_false(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET_ENV, value)
    assert sdnotify.notify("READY=1") is False


# --- watchdog_interval -------------------------------------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sdnotify.WATCHDOG_USEC_ENV, "60000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv(sdnotify.WATCHDOG_USEC_ENV, "100000")
    assert sdnotify.watchdog_interval() == 0.05


def test_watchdog_interval_for_this_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sdnotify.WATCHDOG_USEC_ENV, "60000000")
    monkeypatch.setenv(sdnotify.WATCHDOG_PID_ENV, str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0


def test_watchdog_interval_none_for_another_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables were inherited from a parent that systemd watches; this process must not ping."""
    monkeypatch.setenv(sdnotify.WATCHDOG_USEC_ENV, "60000000")
    monkeypatch.setenv(sdnotify.WATCHDOG_PID_ENV, str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None


@pytest.mark.parametrize(
    ("usec", "pid"),
    [(None, None), ("", None), ("0", None), ("-5", None), ("sixty", None), ("60000000", "not-a-pid")],
)
def test_watchdog_interval_none_when_absent_or_malformed(
    usec: str | None, pid: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if usec is not None:
        monkeypatch.setenv(sdnotify.WATCHDOG_USEC_ENV, usec)
    if pid is not None:
        monkeypatch.setenv(sdnotify.WATCHDOG_PID_ENV, pid)
    assert sdnotify.watchdog_interval() is None


# --- watchdog_loop -----------------------------------------------------------------------------------------

TICK: float = 0.01


async def _receive(sock: socket.socket, count: int) -> list[bytes]:
    """At least ``count`` datagrams, polling without blocking the event loop; fails after RECV_TIMEOUT."""
    got: list[bytes] = []
    with anyio.fail_after(RECV_TIMEOUT):
        while len(got) < count:
            got.extend(_drain(sock))
            if len(got) < count:
                await anyio.sleep(TICK)
    return got


@pytest.mark.anyio
async def test_watchdog_loop_pings_only_while_healthy(path_socket: socket.socket) -> None:
    state = {"healthy": True, "asked": 0}

    def healthy() -> bool:
        state["asked"] += 1
        return bool(state["healthy"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(sdnotify.watchdog_loop, TICK, healthy)

        pings = await _receive(path_socket, 4)
        assert set(pings) == {b"WATCHDOG=1"}

        # The loop runs on this event loop, so every tick after this line sees False; what is already queued
        # was sent before it.
        state["healthy"] = False
        _drain(path_socket)
        asked = state["asked"]
        with anyio.move_on_after(RECV_TIMEOUT):
            while state["asked"] < asked + 10:
                await anyio.sleep(TICK)
        assert state["asked"] >= asked + 10, "the loop stopped asking healthy()"
        assert _drain(path_socket) == [], "a wedged agent must fall silent"

        state["healthy"] = True
        assert set(await _receive(path_socket, 2)) == {b"WATCHDOG=1"}
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_watchdog_loop_survives_without_systemd() -> None:
    """NOTIFY_SOCKET unset: every ping fails quietly and the loop keeps going until cancelled."""
    asked = 0

    def healthy() -> bool:
        nonlocal asked
        asked += 1
        return True

    async with anyio.create_task_group() as tg:
        tg.start_soon(sdnotify.watchdog_loop, TICK, healthy)
        with anyio.fail_after(RECV_TIMEOUT):
            while asked < 5:
                await anyio.sleep(TICK)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
async def test_watchdog_loop_rejects_non_positive_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        await sdnotify.watchdog_loop(interval, lambda: True)
