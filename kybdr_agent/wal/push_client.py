"""``kybdr-agent wal-push %p``: PostgreSQL's ``archive_command``, handing one WAL file to the running agent.

PostgreSQL runs it in the data directory, as its own OS user, once per completed WAL file, and counts the file
archived only on exit status 0 — so 0 means the agent answered 200: it holds the file durably and its bytes
hash to what this process read (``X-Content-SHA256``). Every other outcome is one line on stderr (PostgreSQL
puts it in its log) and status 1 — 78 when the configuration cannot work — and PostgreSQL keeps the file in
``pg_wal`` and tries again. Nothing here exits above 125: for PostgreSQL that would mean "the shell could not
run the command" and would restart the archiver.

It runs once per segment, so it must start in milliseconds: standard library only (no pydantic, aiohttp or
structlog — ``kybdr_agent.entry`` routes ``wal-push`` here before anything else is imported), the
configuration read with ``tomllib`` for the three settings it needs, and the file sent with ``sendfile``
over ``http.client`` on the agent's unix socket. Where those settings come from is what the CLI does: the
``--config`` file, else ``/etc/kybdr-agent/agent.toml`` if present, and ``KYBDR_*`` environment variables over
either (``KYBDR_CONTROL__SOCKET``, ``KYBDR_WAL__ENABLED`` …), matched case-insensitively as pydantic-settings
does.

The file's bytes travel, not its path, so the agent may run as another user than PostgreSQL. The socket is
trusted as the CLI trusts it: the process listening must run as root, this user or ``daemon.service_user``
(``SO_PEERCRED``), so WAL — which is the database's data — is never handed to an impostor.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import pwd
import re
import socket
import stat
import struct
import sys
import time
import tomllib

# Not ``typing`` at run time, nor dataclasses or urllib: every import is paid once per WAL segment.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any, Final

DEFAULT_CONFIG_PATH: Final = "/etc/kybdr-agent/agent.toml"
DEFAULT_SOCKET: Final = "/run/kybdr-agent/control.sock"
DEFAULT_SERVICE_USER: Final = "kybdr"
SHA256_HEADER: Final = "X-Content-SHA256"  # the same as wal.routes.SHA256_HEADER (not imported: aiohttp)
MAX_CONFIG_BYTES: Final = 1 << 20
CONNECT_SECONDS: Final = 5.0  # a full listen queue is retried this long
IO_SECONDS: Final = 60.0  # per socket operation, including the agent's fsync before it answers
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 78
_NAME: Final = re.compile(r"[0-9A-F]{8}(?:[0-9A-F]{16}(?:\.partial|\.[0-9A-F]{8}\.backup)?|\.history)")
_UCRED: Final = struct.Struct("3i")
_TRUE: Final = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE: Final = frozenset({"0", "off", "f", "false", "n", "no"})
PROG: Final = "kybdr-agent wal-push"


class PushError(Exception):
    """Why the file was not archived: one line for PostgreSQL's log, and the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class PushSettings:
    """What a push needs: the socket, who may serve it besides root and this user, and where that was read."""

    __slots__ = ("service_user", "socket_path", "source")

    def __init__(self, socket_path: str, service_user: str | None, source: str) -> None:
        self.socket_path = socket_path
        self.service_user = service_user
        self.source = source


# --- configuration -------------------------------------------------------------------------------------


def _read_toml(path: str, *, required: bool) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if required:
            raise PushError(f"config file {path} does not exist", EXIT_CONFIG) from None
        return None
    except OSError as exc:
        raise PushError(f"cannot read config file {path}: {exc.strerror}", EXIT_CONFIG) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise PushError(f"{path}: larger than 1 MiB; not a configuration file", EXIT_CONFIG)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError, ValueError) as exc:
        raise PushError(
            f"{path}: not valid TOML ({type(exc).__name__}); check it with: kybdr-agent config check", EXIT_CONFIG
        ) from None


def _env_section(env: Mapping[str, str], section: str) -> dict[str, Any]:
    """``KYBDR_<SECTION>`` (a JSON object) with ``KYBDR_<SECTION>__<FIELD>`` over it, names case-insensitive."""
    upper = {name.upper(): value for name, value in env.items()}
    merged: dict[str, Any] = {}
    whole = upper.get(f"KYBDR_{section.upper()}")
    if whole is not None:
        try:
            parsed = json.loads(whole)
        except ValueError:
            raise PushError(f"KYBDR_{section.upper()} is not a JSON object", EXIT_CONFIG) from None
        if isinstance(parsed, dict):
            merged.update(parsed)
    prefix = f"KYBDR_{section.upper()}__"
    for name, value in upper.items():
        if name.startswith(prefix):
            merged[name[len(prefix) :].lower()] = value
    return merged


def _setting(toml: Mapping[str, Any], env: Mapping[str, Any], section: str, name: str) -> Any:
    if name in env:
        return env[name]
    table = toml.get(section)
    return table.get(name) if isinstance(table, dict) else None


def _boolean(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise PushError(f"{what} must be true or false", EXIT_CONFIG)


def load_push_settings(config: str | None, env: Mapping[str, str]) -> PushSettings:
    """What a push needs from the agent's configuration; refuses unless ``[wal]`` is on in archive_command mode."""
    path = config or DEFAULT_CONFIG_PATH
    toml = _read_toml(path, required=config is not None) or {}
    source = path if toml or config else "the defaults and KYBDR_* environment"
    wal_env, control_env, daemon_env = (_env_section(env, s) for s in ("wal", "control", "daemon"))
    enabled = _setting(toml, wal_env, "wal", "enabled")
    mode = _setting(toml, wal_env, "wal", "mode")
    if not _boolean(False if enabled is None else enabled, "wal.enabled"):
        raise PushError(
            f'WAL archiving is not enabled in {source}: set [wal] enabled = true and mode = "archive_command", '
            "then restart the agent",
            EXIT_CONFIG,
        )
    if (mode or "stream") != "archive_command":
        raise PushError(
            f"{source}: wal.mode is {mode or 'stream'!r}; archive_command = 'kybdr-agent wal-push %p' needs "
            'wal.mode = "archive_command" (in stream mode the agent receives WAL itself: remove the archive_command)',
            EXIT_CONFIG,
        )
    socket_path = _setting(toml, control_env, "control", "socket") or DEFAULT_SOCKET
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        raise PushError(f"{source}: control.socket must be an absolute path", EXIT_CONFIG)
    daemon_toml = toml.get("daemon")
    named = "service_user" in daemon_env or (isinstance(daemon_toml, dict) and "service_user" in daemon_toml)
    user = _setting(toml, daemon_env, "daemon", "service_user") if named else DEFAULT_SERVICE_USER
    return PushSettings(socket_path, user if isinstance(user, str) and user else None, source)


# --- the push ------------------------------------------------------------------------------------------


def _trusted_uids(service_user: str | None) -> frozenset[int]:
    uids = {0, os.geteuid()}
    if service_user:
        with contextlib.suppress(KeyError, ValueError):  # no such user here adds nobody
            uids.add(pwd.getpwnam(service_user).pw_uid)
    return frozenset(uids)


def _connect_error(path: str, exc: OSError) -> PushError:
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return PushError(f"the agent is not running (nothing answers on {path})")
    if exc.errno == errno.EACCES:
        return PushError(
            f"permission denied on {path}: PostgreSQL's OS user must be in the socket's group "
            "(see the README, archive_command mode)"
        )
    return PushError(f"cannot connect to the agent on {path}: {exc.strerror or exc}")


def _open_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_SECONDS)
    deadline = time.monotonic() + CONNECT_SECONDS
    while True:
        try:
            sock.connect(path)
        except BlockingIOError:  # a full listen queue on a unix socket refuses at once instead of queueing
            if time.monotonic() >= deadline:
                sock.close()
                raise PushError(f"the agent on {path} is not accepting connections (its queue stayed full)") from None
            time.sleep(0.01)
        except OSError as exc:
            sock.close()
            raise _connect_error(path, exc) from None
        else:
            return sock


def _connect(settings: PushSettings) -> socket.socket:
    """A connection to the agent, only if the process listening is one the agent could be."""
    sock = _open_socket(settings.socket_path)
    try:
        _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError as exc:
        sock.close()
        raise _connect_error(settings.socket_path, exc) from None
    if uid not in _trusted_uids(settings.service_user):
        sock.close()
        raise PushError(
            f"{settings.socket_path} is served by a process of uid {uid}, not root, this user or "
            f"daemon.service_user ({settings.service_user or 'unset'}): refusing to send it WAL"
        )
    sock.settimeout(IO_SECONDS)
    return sock


def _hash_file(fd: int, size: int) -> str:
    hasher = hashlib.sha256()
    offset = 0
    while offset < size:
        block = os.pread(fd, min(1 << 20, size - offset), offset)
        if not block:
            raise PushError(f"the file shrank while being read ({offset} of {size} bytes)")
        hasher.update(block)
        offset += len(block)
    return hasher.hexdigest()


def _problem_line(status: int, raw: bytes) -> str:
    try:
        problem = json.loads(raw)
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        return f"the agent answered HTTP {status}"
    if status == 404 and problem.get("title") == "Not Found":
        return (
            'the agent does not accept WAL (is [wal] enabled with mode = "archive_command", and the agent restarted?)'
        )
    title, detail = str(problem.get("title", "error")), str(problem.get("detail", ""))
    text = f"{title}: {detail}" if detail else title
    return "".join(ch if ch.isprintable() else " " for ch in text)[:400] + f" (HTTP {status})"


def push(path: str, settings: PushSettings) -> dict[str, Any]:
    """Send one WAL file; the agent's answer when it holds it durably, else ``PushError``."""
    name = os.path.basename(path)
    if not _NAME.fullmatch(name):
        raise PushError(f"{name[:80]!r} is not a WAL file name: archive_command must be 'kybdr-agent wal-push %p'")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PushError(f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PushError(f"{path} is not a regular file")
        size = info.st_size
        digest = _hash_file(fd, size)
        sock = _connect(settings)
        conn = http.client.HTTPConnection("kybdr-agent", timeout=IO_SECONDS)
        conn.sock = sock
        try:
            # The name matched _NAME: nothing in it to quote.
            conn.putrequest("POST", f"/v1/wal/push?name={name}", skip_accept_encoding=True)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(size))
            conn.putheader(SHA256_HEADER, digest)
            conn.endheaders()
            try:
                with os.fdopen(os.dup(fd), "rb") as body:
                    sent = sock.sendfile(body, 0, size) if size else 0
            except (BrokenPipeError, ConnectionResetError):
                sent = -1  # the agent refused before reading it all: its answer is still there to read
            if 0 <= sent < size:
                raise PushError(f"sent {sent} of {size} bytes: the file shrank while being sent")
            response = conn.getresponse()
            raw = response.read(1 << 16)
        except (OSError, http.client.HTTPException) as exc:
            raise PushError(f"the connection to the agent broke: {getattr(exc, 'strerror', None) or exc}") from None
        finally:
            conn.close()
    finally:
        os.close(fd)
    if response.status != 200:
        raise PushError(_problem_line(response.status, raw))
    try:
        answer = json.loads(raw)
    except ValueError:
        raise PushError("the agent's answer is not JSON") from None
    if not isinstance(answer, dict) or answer.get("sha256") != digest or answer.get("bytes") != size:
        raise PushError("the agent's answer does not confirm this file's size and SHA-256")
    return answer


# --- command line --------------------------------------------------------------------------------------


def _parse(argv: Sequence[str]) -> tuple[str | None, bool, str]:
    """``[--config FILE] [-v] [--local] wal-push PATH`` (``--local`` means nothing here: the agent must hold it)."""
    config: str | None = None
    verbose = False
    rest = list(argv)
    while rest and rest[0] != "wal-push":
        arg = rest.pop(0)
        if arg == "--config" and rest:
            config = rest.pop(0)
        elif arg.startswith("--config="):
            config = arg.partition("=")[2]
        elif arg in ("-v", "--verbose"):
            verbose = True
        elif arg != "--local":
            raise PushError(f"unexpected argument {arg[:80]!r}; usage: kybdr-agent [--config FILE] wal-push PATH", 2)
    if len(rest) != 2 or rest[0] != "wal-push" or rest[1].startswith("-"):
        raise PushError(
            "usage: kybdr-agent [--config FILE] wal-push PATH   (archive_command = 'kybdr-agent wal-push %p')", 2
        )
    return config, verbose, rest[1]


def main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    started = time.monotonic()
    name = "?"
    try:
        config, verbose, path = _parse(argv)
        name = os.path.basename(path)[:80] or path[:80]
        settings = load_push_settings(config, os.environ if env is None else env)
        answer = push(path, settings)
    except PushError as exc:
        sys.stderr.write(f"{PROG}: {name}: {exc}\n")
        return exc.status
    except Exception as exc:  # noqa: BLE001 - PostgreSQL logs one line and retries; a traceback helps no one there
        sys.stderr.write(f"{PROG}: {name}: unexpected {type(exc).__name__}: {exc}\n")
        return EXIT_FAILED
    if verbose:
        kept = "already held" if answer.get("duplicate") else "spooled"
        sys.stderr.write(f"{PROG}: {name}: {kept}, {answer.get('bytes')} bytes, {time.monotonic() - started:.3f} s\n")
    return EXIT_OK
