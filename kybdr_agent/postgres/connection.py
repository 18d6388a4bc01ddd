"""Reaching PostgreSQL: connection settings from the DSN and password file, the agent's own sessions,
and where the server's client binaries are. Used by the backup component and, next, by DR probes.

Credentials reach child processes only through their environment (``PG*`` variables built from the DSN and
``database.password_file``), never argv, which every local user can read in ``ps``. The database name goes
through ``PGDATABASE`` too, so a name that looks like a conninfo string can never be parsed as one.

Where each libpq parameter goes. pg_dump and pg_restore get every parameter that has a ``PG*`` variable
(``conninfo.PARAM_ENV``), so they connect exactly as libpq reads the DSN. The agent's own asyncpg sessions
honour what asyncpg can:

* ``host``, ``hostaddr``, ``port``: the same servers in the same order (shuffled for
  ``load_balance_hosts=random``). A host item is connected to by name, so certificate checks and
  ``.pgpass`` see the name; ``hostaddr`` is used where the host item is empty.
* ``user``, ``password``, ``passfile``, ``service`` (the service file fills only what neither the DSN nor
  the ``PG*`` environment sets, where libpq lets it override the environment).
* ``sslmode`` (and PostgreSQL 15's ``requiressl=1``), ``sslrootcert``, ``sslcert``, ``sslkey``,
  ``sslpassword``, ``sslcrl``, ``ssl_min_protocol_version``, ``ssl_max_protocol_version``,
  ``sslnegotiation``, ``target_session_attrs``, ``krbsrvname``, ``gsslib``.
* ``application_name`` (else ``fallback_application_name``) and ``options``, sent in the startup packet as
  libpq sends them.

Only the children: ``channel_binding``, ``require_auth``, ``gssencmode``, ``gssdelegation``,
``sslcertmode``, ``sslcrldir``, ``sslsni``, ``sslcompression``, ``requirepeer``, ``client_encoding``
(asyncpg speaks UTF-8 only) and ``connect_timeout`` (the agent's sessions use
``database.connect_timeout_seconds``). So ``channel_binding=require`` or ``gssencmode=require`` binds
pg_dump and pg_restore but not the agent's short metadata sessions. ``sslpassword`` reaches only the agent's
sessions, and ``keepalives*``, ``tcp_user_timeout`` and ``replication`` neither: libpq has no environment
variable for them. ``dbname`` is never used: each operation names its database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlencode

import anyio
import asyncpg

from kybdr_agent.errors import ConfigError, DumpError
from kybdr_agent.postgres.conninfo import (
    NO_ENV_PARAMS,
    ConninfoError,
    Endpoint,
    endpoints,
    env_params,
    libpq_env,
    parse_dsn,
)

PG_LIB_ROOT: Final = Path("/usr/lib/postgresql")
_SCRUBBED_ENV: Final = ("PGPASSWORD", "PGDATABASE")
# What a libpq client needs from the agent's environment besides PG*: HOME for ~/.pgpass and
# ~/.postgresql/ certificates, the locale for messages, TMPDIR, and the PATH and identity basics.
_CHILD_ENV: Final = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR"})
# asyncpg reads these only from a DSN (not as keyword arguments), so they travel in a host-less one.
_ASYNCPG_DSN_PARAMS: Final = (
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslnegotiation",
    "service",
)
_ASYNCPG_KWARGS: Final = ("user", "password", "passfile", "target_session_attrs", "krbsrvname", "gsslib")
# An empty host item means libpq's default socket directory, which depends on how libpq was built: try the
# usual ones, then TCP on localhost (asyncpg's own list when it is given no host at all).
_DEFAULT_HOSTS: Final = ("/run/postgresql", "/var/run/postgresql", "/tmp", "localhost")  # noqa: S108


@dataclass(frozen=True)
class Connection:
    """How to reach the server: libpq environment for the children, keyword arguments for asyncpg.

    ``extra`` holds the DSN's parameters that have no ``PG*`` variable (see the module docstring).
    """

    env: dict[str, str] = field(repr=False)
    bin_dir: Path | None = None
    connect_timeout: float = 15.0
    extra: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(
        cls, dsn: str | None, password_file: Path | None, bin_dir: Path | None, connect_timeout: float
    ) -> Connection:
        """The DSN over the agent's ``PG*`` environment, as libpq would combine them; a DSN or environment
        libpq would refuse at connect time (three ports for two hosts, say) is a ``ConfigError`` now."""
        env = {k: v for k, v in os.environ.items() if k.startswith("PG") and k not in _SCRUBBED_ENV}
        extra: dict[str, str] = {}
        if dsn:
            try:
                params = parse_dsn(dsn)
            except ConninfoError as exc:
                raise ConfigError(f"the DSN cannot be used: {exc}") from None
            env.update(libpq_env(params))
            env.pop("PGDATABASE", None)
            extra = {k: v for k, v in params.items() if k in NO_ENV_PARAMS}
        if password_file is not None:
            try:
                env["PGPASSWORD"] = password_file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"cannot read database.password_file {password_file}: {exc.strerror}") from None
        elif "PGPASSWORD" in os.environ and not dsn:
            env["PGPASSWORD"] = os.environ["PGPASSWORD"]
        try:
            endpoints(env_params(env))
        except ConninfoError as exc:
            raise ConfigError(f"the database servers (from the DSN and PG* environment): {exc}") from None
        return cls(env=env, bin_dir=bin_dir, connect_timeout=connect_timeout, extra=extra)

    @property
    def params(self) -> dict[str, str]:
        """Every libpq parameter in effect: the environment's, then those only a DSN can carry."""
        return {**env_params(self.env), **self.extra}

    def child_env(self, database: str, session: asyncpg.Connection | None = None) -> dict[str, str]:
        """pg_dump's and pg_restore's whole environment: an allow-list, so the agent's own secrets (AWS
        credentials, KYBDR_* settings) never reach a child that has no use for them.

        Given the agent's ``session``, the child is sent to the server that session reached rather than to
        whichever of several hosts libpq would pick: pg_dump must import the snapshot that session exported,
        and pg_restore must fill the database it created.
        """
        base = {k: v for k, v in os.environ.items() if k in _CHILD_ENV or k.startswith("LC_")}
        env = {**base, **self.env, "PGDATABASE": database}
        reached = self._reached(session) if session is not None else None
        if reached is not None:
            endpoint, host = reached
            for name in ("PGHOST", "PGHOSTADDR", "PGLOADBALANCEHOSTS"):
                env.pop(name, None)
            env["PGHOST"] = host
            if endpoint.hostaddr:
                env["PGHOSTADDR"] = endpoint.hostaddr
            env["PGPORT"] = str(endpoint.port)
        return env

    def asyncpg_kwargs(self, database: str) -> dict[str, Any]:
        """``asyncpg.connect``'s arguments for ``database``: what asyncpg can honour of the libpq parameters."""
        params = self.params
        kwargs: dict[str, Any] = {"database": database, "timeout": self.connect_timeout}
        points = endpoints(params)
        if len(points) == 1 and not points[0].host and not points[0].hostaddr:
            kwargs["port"] = points[0].port  # libpq's default host: asyncpg searches the same places
        else:
            addresses = [(host, endpoint.port) for endpoint, host in _addresses(points)]
            if params.get("load_balance_hosts") == "random":
                secrets.SystemRandom().shuffle(addresses)
            kwargs["host"] = [host for host, _ in addresses]
            kwargs["port"] = [port for _, port in addresses]
        for key in _ASYNCPG_KWARGS:
            if params.get(key):
                kwargs[key] = params[key]
        sslmode = params.get("sslmode") or ("require" if params.get("requiressl") == "1" else "")
        if sslmode:
            kwargs["ssl"] = sslmode
        settings: dict[str, str] = {}
        application_name = params.get("application_name") or params.get("fallback_application_name")
        if application_name:
            settings["application_name"] = application_name
        if params.get("options"):
            settings["options"] = params["options"]
        if settings:
            kwargs["server_settings"] = settings
        in_dsn = {key: params[key] for key in _ASYNCPG_DSN_PARAMS if params.get(key)}
        if in_dsn:
            kwargs["dsn"] = "postgresql://?" + urlencode(in_dsn, quote_via=quote)
        return kwargs

    def describe(self) -> str:
        """Where and as whom, for messages: never a password."""
        params = self.params
        where = ", ".join(endpoint.describe() for endpoint in endpoints(params))
        return f"{where} as {params.get('user') or 'the OS user'}"

    def _reached(self, session: asyncpg.Connection) -> tuple[Endpoint, str] | None:
        """The endpoint (and the host item or default socket directory) ``session`` is connected to, if
        there was a choice. asyncpg keeps the address it connected to as ``_addr``: the (host, port) it was
        given, or the socket's path; if a later asyncpg drops it, the children are simply not pinned."""
        points = endpoints(self.params)
        addr = getattr(session, "_addr", None)
        if len(points) == 1 or addr is None:
            return None
        for endpoint, host in _addresses(points):
            if addr in ((host, endpoint.port), os.path.join(host, f".s.PGSQL.{endpoint.port}")):
                return endpoint, host
        return None

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


def _addresses(points: list[Endpoint]) -> list[tuple[Endpoint, str]]:
    """Each endpoint with the host asyncpg is given for it: the host item, else the hostaddr, else (an empty
    item, libpq's default socket) each of the usual default places in turn."""
    found: list[tuple[Endpoint, str]] = []
    for endpoint in points:
        if endpoint.host or endpoint.hostaddr:
            found.append((endpoint, endpoint.host or endpoint.hostaddr))
        else:
            found.extend((endpoint, host) for host in _DEFAULT_HOSTS)
    return found
