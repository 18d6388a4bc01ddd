"""The systemd notify protocol: readiness, status, reload and watchdog pings, in a few dozen lines of our own.

The unit is ``Type=notify`` with ``WatchdogSec=``, so systemd learns from us when the agent is ready, what it
is doing, when it reloads or stops, and that it is still alive. The protocol is one datagram of
``KEY=value`` lines sent to the unix socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an
abstract socket). The ``sdnotify`` package is not used: it connects once in its constructor (so a restarted
systemd is never found again) and swallows every error unless in debug mode. Here each message opens a
fresh socket, sends without a kept connection, and reports failure as ``False`` — never an exception,
because a daemon must not die because systemd went away or was never there (a foreground run, a test).

The watchdog loop pings only while the agent says it is healthy: a wedged agent falls silent and systemd
restarts it, which is the whole point of ``WatchdogSec=``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Final

import anyio

from kybdr_agent.telemetry import get_logger

NOTIFY_SOCKET_ENV: Final = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV: Final = "WATCHDOG_USEC"
WATCHDOG_PID_ENV: Final = "WATCHDOG_PID"
# A send only blocks when systemd's receive queue is full; bound that, since it may run on the event loop.
SEND_TIMEOUT_SECONDS: Final = 0.5
# systemd asks for pings at least every WatchdogSec; pinging at half of it leaves room for a late tick.
WATCHDOG_SAFETY_DIVISOR: Final = 2
USEC_PER_SECOND: Final = 1_000_000

log = get_logger("kybdr_agent.sdnotify")


def _address() -> str | None:
    """``$NOTIFY_SOCKET`` as a socket address, or None when unset or of a kind we do not speak (vsock)."""
    raw = os.environ.get(NOTIFY_SOCKET_ENV)
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]  # Linux abstract namespace: "@" stands for the leading NUL byte.
    if raw.startswith("/"):
        return raw
    return None


def notify(*lines: str) -> bool:
    """Send ``lines`` as one datagram to ``$NOTIFY_SOCKET``; True if it was sent, False otherwise.

    False when the variable is unset (not started by systemd) or the socket is missing, refuses or stalls.
    Never raises for those: the caller may log, the daemon carries on.
    """
    address = _address()
    if address is None:
        return False
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_SECONDS)
            sock.sendto(payload, address)
    except OSError:
        return False
    return True


def _one_line(text: str) -> str:
    """A value must not contain a newline: it would start a new ``KEY=value`` assignment."""
    return " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Start-up (or a reload) finished: systemd moves the unit to active and ``systemctl start`` returns."""
    if status is None:
        return notify("READY=1")
    return notify("READY=1", f"STATUS={_one_line(status)}")


def stopping() -> bool:
    """Shutdown has begun; systemd shows "deactivating" and waits up to ``TimeoutStopSec=``."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Free-form one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    """One keep-alive ping; see :func:`watchdog_loop`."""
    return notify("WATCHDOG=1")


def monotonic_now_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, the clock ``MONOTONIC_USEC=`` is read against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading(monotonic_usec: int) -> bool:
    """A reload (SIGHUP) has begun; send :func:`ready` when it is done.

    ``MONOTONIC_USEC`` is required by ``Type=notify-reload`` (systemd 253+) to match the message to the
    reload it started; older systemd and ``Type=notify`` ignore it, so it is always sent.
    """
    return notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when systemd expects none from this process.

    Half of ``$WATCHDOG_USEC``, provided ``$WATCHDOG_PID`` is unset or names this process (a child that
    inherited the environment must not ping on its parent's behalf). Malformed values mean no watchdog.
    """
    raw_usec = os.environ.get(WATCHDOG_USEC_ENV)
    if not raw_usec:
        return None
    raw_pid = os.environ.get(WATCHDOG_PID_ENV)
    if raw_pid:
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / (WATCHDOG_SAFETY_DIVISOR * USEC_PER_SECOND)


async def watchdog_loop(interval: float, healthy: Callable[[], bool]) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds while ``healthy()`` is True; runs until cancelled.

    ``healthy()`` is asked before every ping. While it answers False no ping is sent, so systemd's watchdog
    fires and restarts the agent unless it recovers in time. Only changes are logged, never every tick.
    """
    if not interval > 0:
        raise ValueError(f"watchdog interval must be positive, got {interval!r}")
    was_healthy = True
    was_sent = True
    while True:
        is_healthy = healthy()
        if is_healthy != was_healthy:
            if is_healthy:
                log.info("watchdog.resumed")
            else:
                log.warning("watchdog.withheld", reason="agent reports itself unhealthy")
            was_healthy = is_healthy
        if is_healthy:
            sent = watchdog()
            if sent != was_sent:
                if sent:
                    log.info("watchdog.delivered")
                else:
                    log.warning("watchdog.undeliverable", socket=os.environ.get(NOTIFY_SOCKET_ENV))
                was_sent = sent
        await anyio.sleep(interval)
