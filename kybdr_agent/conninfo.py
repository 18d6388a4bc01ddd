"""libpq connection strings, turned into the ``PG*`` environment that pg_dump, pg_restore and asyncpg share.

PURE. ``database.dsn`` may be a URI (``postgresql://user@host:5432/db?sslmode=require``) or key=value pairs
(``host=/run/postgresql port=5432 user=backup``). We never pass it on a command line: argv is visible to
every user in ``ps``, and a DSN may carry a password. Instead each parameter becomes the environment
variable libpq documents for it, so the child processes connect exactly as ``pg_dump`` would by itself.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit

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


def parse_dsn(dsn: str) -> dict[str, str]:
    dsn = dsn.strip()
    if not dsn:
        return {}
    if dsn.startswith(("postgresql://", "postgres://")):
        return _parse_uri(dsn)
    return _parse_keyvalue(dsn)


def _parse_uri(dsn: str) -> dict[str, str]:
    parts = urlsplit(dsn)
    params: dict[str, str] = {}
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password:
        params["password"] = unquote(parts.password)
    netloc_host = parts.netloc.rpartition("@")[2]
    host, _, port = netloc_host.partition(":") if not netloc_host.startswith("[") else (netloc_host, "", "")
    if host:
        params["host"] = unquote(host)
    if port:
        if not port.isdigit():
            raise ConninfoError("the DSN's port is not a number")
        params["port"] = port
    if parts.path and parts.path != "/":
        params["dbname"] = unquote(parts.path.lstrip("/"))
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        params[key] = value
    _check_keys(params)
    return params


def _parse_keyvalue(dsn: str) -> dict[str, str]:
    params: dict[str, str] = {}
    i, n = 0, len(dsn)
    while i < n:
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n:
            break
        eq = dsn.find("=", i)
        if eq < 0:
            raise ConninfoError("the DSN is not key=value pairs (a key has no '=')")
        key = dsn[i:eq].strip()
        i = eq + 1
        while i < n and dsn[i].isspace():
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
            while i < n and not dsn[i].isspace():
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
    except ConninfoError:
        return "<unparseable DSN hidden>"
    if "password" not in params:
        return dsn
    shown = {**params, "password": "********"}
    return " ".join(f"{k}={v}" for k, v in shown.items())
