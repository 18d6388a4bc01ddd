"""What the CLI uses to talk to a running agent over its unix socket, and who it agrees to talk to.

The socket is the agent's identity: whoever listens on ``control.socket`` receives the CLI's requests
(``restore --force`` included) and answers its ``status``. So the socket is trusted only where nobody else
could have put it: its directory, and every directory above, writable by no one but root, the user running
the command and the service's user (``trusted_owners``); the socket file owned by one of them; and the
process listening on it (``SO_PEERCRED``) running as one of them. The agent applies the same directory rule
to itself before it listens (``check_socket_location``), so a configuration that names a shared directory
such as ``/tmp`` is refused by ``config check`` and ``run`` alike.

When the socket fails these checks the CLI refuses to talk to it, and does not quietly run the command in
its own process instead either: an impostor there means something is wrong on the host, and a second
process doing the same backup or restore as the real agent would be another problem. ``--local`` is the
explicit way to run a command in-process.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from kybdr_agent.errors import ConfigError, KybdrError
from kybdr_agent.pathutil import NothingExists, nearest_existing
from kybdr_agent.secret_files import describe_owner

_WRITABLE_BY_OTHERS: Final = stat.S_IWGRP | stat.S_IWOTH
_UCRED: Final = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


class AgentUnavailable(KybdrError):
    """No agent answers on the control socket."""


class ApiError(KybdrError):
    """The agent answered with a problem document."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        detail = problem.get("detail")
        super().__init__(f"{problem.get('title', 'error')}{': ' + str(detail) if detail else ''} (HTTP {status})")


class UnsafeSocket(ConfigError):
    """The control socket, or a directory it lives in, could belong to someone other than the agent."""


def _chain(directory: Path) -> list[Path]:
    """``directory`` and every directory above it, as named and as resolved (a symlink's target counts)."""
    chain = [directory, *directory.parents]
    resolved = Path(os.path.realpath(directory))
    if resolved != directory:
        chain += [resolved, *resolved.parents]
    return chain


def check_socket_location(path: Path, owners: Iterable[int]) -> None:
    """Refuse a socket path whose directory someone untrusted could write, now or once it is created.

    The socket's own directory must be writable by its owner only, and that owner trusted: anyone else who
    may create entries there can listen on the name before the agent does (the sticky bit of /tmp does not
    stop that: it protects existing entries, not free names). Directories above it may be shared if they
    are sticky (/tmp), since then nobody can rename the trusted directory away. A directory that does not
    exist yet is judged by the nearest one that does, which is where the agent would create it.
    """
    trusted = frozenset(owners)
    try:
        directory, info = nearest_existing(path.parent)
    except NothingExists:
        raise UnsafeSocket(f"control.socket {path}: no directory of it exists") from None
    except OSError as exc:
        raise UnsafeSocket(f"control.socket {path}: cannot inspect {exc.filename}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeSocket(f"control.socket {path}: {directory} is not a directory")
    own = {directory, Path(os.path.realpath(directory))}
    for entry in _chain(directory):
        try:
            info = os.stat(entry)
        except OSError as exc:
            raise UnsafeSocket(f"control.socket {path}: cannot inspect {entry}: {exc.strerror}") from None
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in trusted:
            raise UnsafeSocket(
                f"control.socket {path}: {entry} is owned by {describe_owner(info.st_uid)}, who could put "
                "another program's socket there; use a directory owned by root or the agent's user "
                "(daemon.service_user), e.g. /run/kybdr-agent"
            )
        if mode & _WRITABLE_BY_OTHERS and (entry in own or not mode & stat.S_ISVTX):
            raise UnsafeSocket(
                f"control.socket {path}: {entry} is writable by others (mode {mode:04o}), so anyone could listen "
                "there first and impersonate the agent; use a directory only its owner can write, "
                "e.g. /run/kybdr-agent"
            )


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except (OSError, AttributeError, struct.error):  # not Linux: the file owner is what we have
        return None
    return int(uid)


class AgentBusy(AgentUnavailable):
    """The agent's socket exists and its listen queue stayed full: an agent is running, so the CLI must
    not fall back to running the command in-process beside it."""


_BUSY_RETRY_SECONDS: Final = 5.0


def _connect_through_full_backlog(sock: socket.socket, path: Path) -> None:
    """A unix socket whose listen queue is full refuses with EAGAIN at once instead of waiting as TCP
    does; a listener is there, so retry briefly rather than take "no agent" for an answer."""
    deadline = time.monotonic() + _BUSY_RETRY_SECONDS
    pause = 0.01
    while True:
        try:
            sock.connect(str(path))
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise AgentBusy(
                    f"the agent on {path} is not accepting connections (its queue stayed full for "
                    f"{_BUSY_RETRY_SECONDS:.0f} s); try again"
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
        else:
            return


def agent_listening(path: Path, owners: Iterable[int] | None = None) -> bool:
    """True if an agent accepts connections on the socket (a stale file from a crash does not).

    With ``owners`` (what the CLI passes), the socket must also be one the agent could have made: its
    location safe (``check_socket_location``), the file owned by a trusted user, and the listening process
    running as one; otherwise ``UnsafeSocket``, and nothing has been sent to it. A path that is not a
    socket at all (a file, nothing) means no agent.
    """
    trusted = frozenset(owners) if owners is not None else None
    if trusted is not None:
        check_socket_location(path, trusted)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise AgentUnavailable(
                f"cannot reach the agent's socket {path}: permission denied (join the socket's group, e.g. "
                "kybdr, or pass --local to run the command in this process)"
            ) from None
        return False
    if not stat.S_ISSOCK(info.st_mode):
        return False
    if trusted is not None and info.st_uid not in trusted:
        raise UnsafeSocket(_impostor(path, f"is owned by {describe_owner(info.st_uid)}"))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        _connect_through_full_backlog(probe, path)
        peer = _peer_uid(probe) if trusted is not None else None
    except AgentBusy:
        raise
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise AgentUnavailable(
                f"cannot reach the agent's socket {path}: permission denied (join the socket's group, e.g. "
                "kybdr, or pass --local to run the command in this process)"
            ) from None
        return False
    finally:
        probe.close()
    if trusted is not None and peer is not None and peer not in trusted:
        raise UnsafeSocket(_impostor(path, f"is served by a process of {describe_owner(peer)}"))
    return True


def _impostor(path: Path, what: str) -> str:
    return (
        f"control.socket {path} {what}, not by root, you or daemon.service_user: refusing to talk to it "
        "(it may be impersonating the agent), and not running the command in this process instead either; "
        "find out who made it, remove it, or pass --local to run the command here"
    )


class ControlClient:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, params: dict[str, str] | None = None
    ) -> Any:
        import aiohttp  # only when an agent answers: aiohttp costs 0.2 s of start-up for one-shot commands

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.request(method, f"http://kybdr-agent{path}", json=body, params=params) as response,
            ):
                raw = await response.read()
                try:
                    data = json.loads(raw) if raw else None
                except ValueError:
                    data = {"title": raw.decode("utf-8", "replace")[:200]}
                if response.status >= 400:
                    raise ApiError(response.status, data if isinstance(data, dict) else {"title": str(data)[:200]})
                return data
        except aiohttp.ClientConnectorError as exc:
            raise AgentUnavailable(f"the agent is not running (nothing answers on {self.socket_path}): {exc}") from None
        except aiohttp.ClientError as exc:
            raise AgentUnavailable(f"the connection to the agent on {self.socket_path} broke: {exc}") from None
