"""libpq connection strings, turned into the ``PG*`` environment that pg_dump and pg_restore use, and the
servers (host, hostaddr, port) they would try.

PURE. ``database.dsn`` may be a URI (``postgresql://user@h1:5432,h2:5433/db?sslmode=require``) or key=value
pairs (``host=/run/postgresql,db2 port=5432,5433 user=backup``). We never pass it on a command line: argv is
visible to every user in ``ps``, and a DSN may carry a password. Instead each parameter becomes the
environment variable libpq documents for it, so the child processes connect exactly as ``pg_dump`` would by
itself. An older libpq ignores the variables it does not know (``PGREQUIREAUTH`` under PostgreSQL 15's), so a
parameter newer than the installed client tools never breaks them; it just has no effect there.

Every connection parameter documented for PostgreSQL 15 to 17 is accepted; an unknown one is refused,
because it is almost always a typo (``sslmod=require``) that would otherwise silently weaken a connection.
A few parameters have no environment variable (``NO_ENV_PARAMS``): they cannot reach the children at all.
What the agent's own asyncpg sessions make of each parameter is described in ``postgres.connection``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

# libpq parameter -> environment variable (PostgreSQL 15-17 docs, "Environment Variables", and libpq's
# PQconninfoOptions table). Parameters that only some versions know: requiressl (15; removed in 16),
# require_auth, sslcertmode, gssdelegation and load_balance_hosts (16+), sslnegotiation (17+).
PARAM_ENV: Final = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "channel_binding": "PGCHANNELBINDING",
    "require_auth": "PGREQUIREAUTH",
    "service": "PGSERVICE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "client_encoding": "PGCLIENTENCODING",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "sslmode": "PGSSLMODE",
    "requiressl": "PGREQUIRESSL",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "sslcompression": "PGSSLCOMPRESSION",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcertmode": "PGSSLCERTMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "requirepeer": "PGREQUIREPEER",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "gsslib": "PGGSSLIB",
    "gssdelegation": "PGGSSDELEGATION",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
}
ENV_PARAM: Final = {env: param for param, env in PARAM_ENV.items()}
# Documented libpq parameters with no environment variable. Accepted, but pg_dump and pg_restore never see
# them (that would take argv); the agent's own session uses sslpassword and fallback_application_name.
NO_ENV_PARAMS: Final = frozenset(
    {
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "sslpassword",
        "replication",
    }
)
KNOWN_PARAMS: Final = frozenset(PARAM_ENV) | NO_ENV_PARAMS
# Masked wherever a DSN is shown: the server password and the passphrase of the client key.
SECRET_PARAMS: Final = frozenset({"password", "sslpassword"})
DEFAULT_PORT: Final = 5432


class ConninfoError(ValueError):
    """The DSN cannot be parsed; the message never repeats the DSN (it may hold a password)."""


_SPACE: Final = frozenset(" \t\n\r\f\v")  # C isspace() in the C locale, as libpq uses
_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_dsn(dsn: str) -> dict[str, str]:
    """Parse a DSN as libpq does. Errors never quote the DSN: it may hold a password."""
    body = dsn.lstrip("".join(_SPACE))
    if not body.strip("".join(_SPACE)):
        return {}
    for scheme in ("postgresql://", "postgres://"):
        if body.startswith(scheme):
            return _parse_uri(body[len(scheme) :].rstrip("".join(_SPACE)))
    return _parse_keyvalue(body)


def _parse_uri(rest: str) -> dict[str, str]:
    """``[user[:password]@][host[:port][,...]][/dbname][?key=value&...]``, percent-decoded ('+' is literal)."""
    rest, _, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    params: dict[str, str] = {}
    userspec, at, hostspec = authority.rpartition("@")
    if at:
        user, colon, password = userspec.partition(":")
        if user:
            params["user"] = unquote(user)
        if colon:
            params["password"] = unquote(password)
    hosts: list[str] = []
    ports: list[str] = []
    for item in hostspec.split(",") if hostspec else []:
        if item.startswith("["):
            close = item.find("]")
            if close < 0:
                raise ConninfoError("the DSN has an IPv6 host without its closing ']'")
            host, after = item[1:close], item[close + 1 :]
            if after and not after.startswith(":"):
                raise ConninfoError("the DSN has characters after an IPv6 host")
            port = after[1:]
        else:
            host, _, port = item.partition(":")
        if port and not port.isdigit():
            raise ConninfoError("the DSN's port is not a number")
        hosts.append(unquote(host))
        ports.append(port)
    if any(hosts):
        params["host"] = ",".join(hosts)
    if any(ports):
        params["port"] = ",".join(ports)
    if path:
        params["dbname"] = unquote(path)
    for pair in query.split("&") if query else []:
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConninfoError("the DSN has a query parameter without '='")
        params[unquote(key)] = unquote(value)
    _check_keys(params)
    return params


def _parse_keyvalue(dsn: str) -> dict[str, str]:
    params: dict[str, str] = {}
    i, n = 0, len(dsn)
    while i < n:
        while i < n and dsn[i] in _SPACE:
            i += 1
        if i >= n:
            break
        start = i
        while i < n and dsn[i] != "=" and dsn[i] not in _SPACE:
            i += 1
        key = dsn[start:i]
        while i < n and dsn[i] in _SPACE:
            i += 1
        if i >= n or dsn[i] != "=" or not _KEY.fullmatch(key):
            raise ConninfoError("the DSN is not key=value pairs (a parameter has no '=' after its name)")
        i += 1
        while i < n and dsn[i] in _SPACE:
            i += 1
        value_chars: list[str] = []
        if i < n and dsn[i] == "'":
            i += 1
            while i < n and dsn[i] != "'":
                if dsn[i] == "\\" and i + 1 < n:
                    i += 1
                value_chars.append(dsn[i])
                i += 1
            if i >= n:
                raise ConninfoError("the DSN has an unterminated quoted value")
            i += 1
        else:
            while i < n and dsn[i] not in _SPACE:
                if dsn[i] == "\\" and i + 1 < n:
                    i += 1
                value_chars.append(dsn[i])
                i += 1
        params[key] = "".join(value_chars)
    _check_keys(params)
    return params


def _check_keys(params: dict[str, str]) -> None:
    unknown = sorted(set(params) - KNOWN_PARAMS)
    if unknown:
        raise ConninfoError(f"the DSN has parameters libpq does not know: {', '.join(unknown)}")


def libpq_env(params: Mapping[str, str]) -> dict[str, str]:
    """The ``PG*`` variables for ``params``; those without one (``NO_ENV_PARAMS``) are left out."""
    return {PARAM_ENV[key]: value for key, value in params.items() if key in PARAM_ENV}


def env_params(env: Mapping[str, str]) -> dict[str, str]:
    """The libpq parameters a ``PG*`` environment sets: ``libpq_env`` read backwards."""
    return {ENV_PARAM[name]: value for name, value in env.items() if name in ENV_PARAM}


@dataclass(frozen=True)
class Endpoint:
    """One server libpq would try: ``host`` (a name, an IP address or a socket directory; "" for libpq's
    default socket), ``hostaddr`` (the numeric address to connect to instead of looking ``host`` up; "" if
    none) and the port."""

    host: str
    hostaddr: str
    port: int

    def describe(self) -> str:
        if self.host and self.hostaddr:
            return f"{self.host} ({self.hostaddr}):{self.port}"
        return f"{self.host or self.hostaddr or 'the default socket'}:{self.port}"


def endpoints(params: Mapping[str, str]) -> list[Endpoint]:
    """The servers libpq tries, in order, for these parameters, with libpq's rules for the three lists.

    ``host`` and ``hostaddr`` are comma-separated lists; when both are given they must be as long as each
    other. ``port`` is one port for every host or one per host; an empty item means the default (5432), as
    does an empty host item mean the default socket. Refuses what libpq would refuse when it connects
    (mismatched lists, a port that is not a number from 1 to 65535, a hostaddr that is not an IP address),
    so the mistake is reported when the configuration is checked. Messages never quote the values.
    """
    hosts = params.get("host", "").split(",")
    addrs = params.get("hostaddr", "").split(",")
    if "host" in params and "hostaddr" in params and len(hosts) != len(addrs):
        raise ConninfoError(f"{len(hosts)} host name(s) but {len(addrs)} hostaddr value(s) (give one per host)")
    count = len(hosts) if "host" in params or "hostaddr" not in params else len(addrs)
    hosts = hosts if "host" in params else [""] * count
    addrs = addrs if "hostaddr" in params else [""] * count
    ports = [_port(item) for item in params.get("port", "").split(",")]
    if len(ports) == 1:
        ports *= count
    elif len(ports) != count:
        raise ConninfoError(f"{len(ports)} ports for {count} host(s) (give one port, or one per host)")
    for addr in addrs:
        if addr:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ConninfoError("a hostaddr is not a numeric IP address") from None
    return [Endpoint(host, addr, port) for host, addr, port in zip(hosts, addrs, ports, strict=True)]


def _port(item: str) -> int:
    item = item.strip()
    if not item:
        return DEFAULT_PORT
    if not item.isascii() or not item.isdigit() or not 0 < int(item) < 65536:
        raise ConninfoError("a port is not a number from 1 to 65535")
    return int(item)


def check_addresses(params: Mapping[str, str]) -> None:
    """What ``endpoints`` checks, as far as a DSN alone can be judged: the ports always, and the lengths of
    the lists when the DSN names its hosts (otherwise they come from ``PGHOST`` when the agent starts)."""
    if "host" in params or "hostaddr" in params:
        endpoints(params)
    else:
        for item in params.get("port", "").split(","):
            _port(item)


_NEEDS_QUOTES: Final = re.compile(r"[\s'\\]")


def _quote_value(value: str) -> str:
    """A value as libpq's key=value syntax reads it back: quoted when empty or holding space, ' or \\."""
    if value and not _NEEDS_QUOTES.search(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def mask_dsn(dsn: str) -> str:
    """The DSN with any password (and any client-key passphrase) replaced, for ``config check`` and logs."""
    try:
        params = parse_dsn(dsn)
    except ValueError:
        return "<unparseable DSN hidden>"
    if not SECRET_PARAMS & params.keys():
        return dsn
    shown = {k: "********" if k in SECRET_PARAMS else v for k, v in params.items()}
    return " ".join(f"{k}={_quote_value(v)}" for k, v in shown.items())


def dbname_only(database: str) -> str:
    """``database`` as a connection string that names only it, for a child's ``--dbname``/``-l``: libpq
    expands a ``dbname`` holding ``=`` or a URI as a whole connection string, so a database called
    ``dbname=prod`` would otherwise reach ``prod``."""
    escaped = database.replace("\\", "\\\\").replace("'", "\\'")
    return f"dbname='{escaped}'"
