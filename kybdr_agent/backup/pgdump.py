"""pg_dump, pg_restore and the database connection: how they are found, started and judged.

Credentials reach the children only through their environment (``PG*`` variables built from the DSN and
``database.password_file``), never argv, which every local user can read in ``ps``. The database name goes
through ``PGDATABASE`` too, so a name that looks like a conninfo string can never be parsed as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg

from kybdr_agent.asyncutil import TailBuffer
from kybdr_agent.conninfo import libpq_env, parse_dsn
from kybdr_agent.errors import ConfigError, DumpError

PG_LIB_ROOT: Final = Path("/usr/lib/postgresql")
PIPE_LIMIT: Final = 4 << 20
_SCRUBBED_ENV: Final = ("PGPASSWORD", "PGDATABASE")
# What a libpq client needs from the agent's environment besides PG*: HOME for ~/.pgpass and
# ~/.postgresql/ certificates, the locale for messages, TMPDIR, and the PATH and identity basics.
_CHILD_ENV: Final = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR"})


@dataclass(frozen=True)
class Connection:
    """How to reach the server: libpq environment for the children, keyword arguments for asyncpg."""

    env: dict[str, str] = field(repr=False)
    bin_dir: Path | None = None
    connect_timeout: float = 15.0

    @classmethod
    def from_settings(
        cls, dsn: str | None, password_file: Path | None, bin_dir: Path | None, connect_timeout: float
    ) -> Connection:
        env = {k: v for k, v in os.environ.items() if k.startswith("PG") and k not in _SCRUBBED_ENV}
        if dsn:
            env.update(libpq_env(parse_dsn(dsn)))
            env.pop("PGDATABASE", None)
        if password_file is not None:
            try:
                env["PGPASSWORD"] = password_file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"cannot read database.password_file {password_file}: {exc.strerror}") from None
        elif "PGPASSWORD" in os.environ and not dsn:
            env["PGPASSWORD"] = os.environ["PGPASSWORD"]
        return cls(env=env, bin_dir=bin_dir, connect_timeout=connect_timeout)

    def child_env(self, database: str) -> dict[str, str]:
        """pg_dump's and pg_restore's whole environment: an allow-list, so the agent's own secrets (AWS
        credentials, KYBDR_* settings) never reach a child that has no use for them."""
        base = {k: v for k, v in os.environ.items() if k in _CHILD_ENV or k.startswith("LC_")}
        return {**base, **self.env, "PGDATABASE": database}

    def asyncpg_kwargs(self, database: str) -> dict[str, Any]:
        env = self.env
        kwargs: dict[str, Any] = {"database": database, "timeout": self.connect_timeout}
        if "PGHOST" in env:
            kwargs["host"] = env["PGHOST"]
        if "PGPORT" in env:
            kwargs["port"] = int(env["PGPORT"])
        if "PGUSER" in env:
            kwargs["user"] = env["PGUSER"]
        if "PGPASSWORD" in env:
            kwargs["password"] = env["PGPASSWORD"]
        if "PGPASSFILE" in env:
            kwargs["passfile"] = env["PGPASSFILE"]
        if "PGSSLMODE" in env:
            kwargs["ssl"] = env["PGSSLMODE"]
        if "PGAPPNAME" in env:
            kwargs["server_settings"] = {"application_name": env["PGAPPNAME"]}
        return kwargs

    def describe(self) -> str:
        host = self.env.get("PGHOST", "the default socket")
        port = self.env.get("PGPORT", "5432")
        user = self.env.get("PGUSER", "the OS user")
        return f"{host}:{port} as {user}"

    def binary(self, name: str, server_major: int | None = None) -> str:
        """pg_dump must be at least the server's major version, so prefer that version's binaries."""
        candidates: list[Path] = []
        if self.bin_dir is not None:
            candidates.append(self.bin_dir / name)
        elif server_major is not None:
            candidates.append(PG_LIB_ROOT / str(server_major) / "bin" / name)
        for candidate in candidates:
            if os.access(candidate, os.X_OK):
                return str(candidate)
        if self.bin_dir is not None:
            raise DumpError(f"{name} not found in database.pg_bin_dir {self.bin_dir}")
        found = shutil.which(name)
        if found is None:
            raise DumpError(f"{name} not found (install postgresql-client or set database.pg_bin_dir)")
        return found

    @asynccontextmanager
    async def connect(self, database: str) -> AsyncIterator[asyncpg.Connection]:
        """A session with the agent's own timeouts, closed (or, if the server is gone, dropped) on exit.

        Like pg_dump for its own session, the agent turns off the server's statement, lock and idle
        timeouts: a role or database with ``idle_in_transaction_session_timeout`` would otherwise kill the
        connection that holds pg_dump's snapshot while the dump runs. Closing never raises: the error
        that ended the block is the one worth reporting, not that the server had already gone away.
        """
        try:
            conn = await asyncpg.connect(**self.asyncpg_kwargs(database))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DumpError(
                f"cannot connect to database {database!r} on {self.describe()}: {pg_message(exc)}"
            ) from None
        try:
            with database_errors(f"setting up the session on {database!r}"):
                await conn.execute(session_settings_sql(conn.get_server_version().major))
            yield conn
        finally:
            await close_quietly(conn)


SESSION_TIMEOUTS: Final = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
CLOSE_DEADLINE: Final = 10.0


def session_settings_sql(server_major: int) -> str:
    """The SETs that make a session immune to the server's timeouts (``idle_session_timeout`` is PG 14+)."""
    names = [*SESSION_TIMEOUTS, *(("idle_session_timeout",) if server_major >= 14 else ())]
    return "; ".join(f"set {name} = 0" for name in names)


async def close_quietly(conn: Any) -> None:
    """Close politely within a bound; if the server or the socket is gone, just drop the connection."""
    with anyio.CancelScope(shield=True):
        try:
            await conn.close(timeout=CLOSE_DEADLINE)
        except DATABASE_ERRORS:
            conn.terminate()


DATABASE_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@contextlib.contextmanager
def database_errors(what: str) -> Iterator[None]:
    """Turn the server's refusals (permissions, locks, a lost connection) into an operator's error."""
    try:
        yield
    except DATABASE_ERRORS as exc:
        raise DumpError(f"{what}: {pg_message(exc)}") from None


def pg_message(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def tool_version(binary: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        binary, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    return out.decode().strip()


async def drain_into(stream: asyncio.StreamReader | None, tail: TailBuffer) -> None:
    if stream is None:
        return
    while chunk := await stream.read(64 * 1024):
        tail.feed(chunk)


def failure_message(what: str, returncode: int, stderr: TailBuffer) -> str:
    detail = stderr.text() or "(no output on stderr)"
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
    return f"{what} {how}: {detail}"


@asynccontextmanager
async def child_process(
    argv: list[str], *, env: dict[str, str], stdin: int | None = None, stdout: int | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``stdin``/``stdout`` take asyncio's PIPE/DEVNULL constants or a file descriptor for the child."""
    """Start a child; whatever happens in the block, it is not left running (terminate, then kill)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=stdin, stdout=stdout, stderr=asyncio.subprocess.PIPE, env=env, limit=PIPE_LIMIT
    )
    try:
        yield proc
    finally:
        with anyio.CancelScope(shield=True):
            await stop_process(proc)


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    with anyio.move_on_after(grace):
        await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


PIPE_SIZE: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031  # Linux fcntl; not exported by the fcntl module on every Python


class PipeReader:
    """Blocking reads of a child's stdout, meant to run in a worker thread.

    Reading pg_dump's pipe off the event loop lets the loop stay idle and the read overlap with
    compression in another thread (both release the GIL). The pipe is enlarged to 1 MiB so pg_dump can
    keep writing while a chunk is being handed over. The descriptor is closed by whoever finishes last:
    ``close()`` from the owner, or the reading thread if a read was in progress at that moment.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only at end of stream. Empty bytes means EOF."""
        with self._lock:
            if self._closed:
                return b""
            self._busy = True
        try:
            pieces: list[bytes] = []
            total = 0
            while total < size:
                piece = os.read(self._fd, size - total)
                if not piece:
                    break
                pieces.append(piece)
                total += len(piece)
            return b"".join(pieces)
        finally:
            with self._lock:
                self._busy = False
                if self._close_requested():
                    os.close(self._fd)

    def _close_requested(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._busy:
                os.close(self._fd)
