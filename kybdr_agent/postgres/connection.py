"""Reaching PostgreSQL: connection settings from the DSN and password file, the agent's own sessions,
and where the server's client binaries are. Used by the backup component and, next, by DR probes.

Credentials reach child processes only through their environment (``PG*`` variables built from the DSN and
``database.password_file``), never argv, which every local user can read in ``ps``. The database name goes
through ``PGDATABASE`` too, so a name that looks like a conninfo string can never be parsed as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg

from kybdr_agent.errors import ConfigError, DumpError
from kybdr_agent.postgres.conninfo import libpq_env, parse_dsn

PG_LIB_ROOT: Final = Path("/usr/lib/postgresql")
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
