"""libpq connection strings, turned into the ``PG*`` environment that pg_dump, pg_restore and asyncpg share.

PURE. ``database.dsn`` may be a URI (``postgresql://user@host:5432/db?sslmode=require``) or key=value pairs
(``host=/run/postgresql port=5432 user=backup``). We never pass it on a command line: argv is visible to
every user in ``ps``, and a DSN may carry a password. Instead each parameter becomes the environment
variable libpq documents for it, so the child processes connect exactly as ``pg_dump`` would by itself.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

# libpq parameter -> environment variable (PostgreSQL docs, "34.15. Environment Variables")
PARAM_ENV: Final = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "service": "PGSERVICE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "sslmode": "PGSSLMODE",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
}


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
    unknown = sorted(set(params) - set(PARAM_ENV))
    if unknown:
        raise ConninfoError(f"the DSN has parameters kybdr-agent does not know: {', '.join(unknown)}")


def libpq_env(params: dict[str, str]) -> dict[str, str]:
    return {PARAM_ENV[key]: value for key, value in params.items()}


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for ``config check`` and logs."""
    try:
        params = parse_dsn(dsn)
    except ValueError:
        return "<unparseable DSN hidden>"
    if "password" not in params:
        return dsn
    shown = {**params, "password": "********"}
    return " ".join(f"{k}={v}" for k, v in shown.items())
