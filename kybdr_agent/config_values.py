"""One setting's value, parsed and checked: durations, database names, time zones, cron specs, DSNs, URLs.

Kept apart from the section models (``config_sections``) so each rule is a plain function that can be read,
and reused by several sections, without the models around it. Every check raises ``ValueError``, which
pydantic turns into the one ``ConfigError`` naming the field.
"""

from __future__ import annotations

import ipaddress
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BeforeValidator

from kybdr_agent.backup.schedule import CronSpec, next_run
from kybdr_agent.postgres.conninfo import ConninfoError, check_addresses, parse_dsn

HUNDRED_YEARS_DAYS: Final = 36500
# What botocore accepts as a bucket name (it checks before every request); checked here, once.
_BUCKET: Final = re.compile(r"^[A-Za-z0-9.\-_]{1,255}$")
_HOSTNAME: Final = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w|y)\s*$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_MAX_DURATION: Final = timedelta(days=HUNDRED_YEARS_DAYS)


def parse_duration(value: object) -> object:
    """Durations as people write them: "90s", "30m", "12h", "7d", "4w", "7y" (365 days), or seconds.

    Anything longer than a hundred years is refused before it becomes a ``timedelta``: past about 2.7
    million years ``timedelta`` itself overflows, and that surfaced as a traceback, not a config error.
    """
    seconds: float | None = None
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    if seconds is None:
        return value
    if not math.isfinite(seconds) or abs(seconds) > _MAX_DURATION.total_seconds():
        raise ValueError('must be at most 100 years (e.g. "7y", "30d", "12h")')
    return timedelta(seconds=seconds)


def _show_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit in ("y", "d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:g}s"


def _between(low: timedelta, high: timedelta) -> AfterValidator:
    def check(value: timedelta) -> timedelta:
        if not low <= value <= high:
            raise ValueError(f"must be between {_show_duration(low)} and {_show_duration(high)}")
        return value

    return AfterValidator(check)


Duration = Annotated[timedelta, BeforeValidator(parse_duration), _between(timedelta(0), _MAX_DURATION)]
Age = Annotated[timedelta, BeforeValidator(parse_duration), _between(timedelta(0), _MAX_DURATION)]
MaxAge = Annotated[timedelta, BeforeValidator(parse_duration), _between(timedelta(hours=1), _MAX_DURATION)]
SweepGrace = Annotated[timedelta, BeforeValidator(parse_duration), _between(timedelta(0), timedelta(days=30))]
Interval = Annotated[timedelta, BeforeValidator(parse_duration), _between(timedelta(seconds=1), timedelta(days=1))]


def _database_names(value: list[str]) -> list[str]:
    for name in value:
        if not name or len(name.encode("utf-8", "surrogatepass")) > 63:
            raise ValueError("a PostgreSQL database name is 1 to 63 bytes (longer names are silently truncated)")
    return value


DatabaseNames = Annotated[list[str], AfterValidator(_database_names)]


def check_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None
    return value


def check_dsn(value: str | None) -> str | None:
    """Every libpq connection parameter is accepted (some reach only pg_dump and pg_restore: see
    ``postgres.connection``). Refused: a DSN libpq could not parse, a parameter it does not know (almost
    always a typo), and host, hostaddr and port lists it would refuse when connecting, so the mistake shows
    in ``config check`` rather than at 2 a.m. The message never quotes the DSN: it may hold a password."""
    if value:
        try:
            check_addresses(parse_dsn(value))
        except ConninfoError as exc:
            raise ValueError(str(exc)) from None
    return value


def check_cron(value: str) -> str:
    """The spec must parse and must match some time (``0 0 30 2 *`` parses but never runs)."""
    next_run(CronSpec.parse(value), datetime.now(UTC), UTC)
    return value


def check_endpoint(value: str | None) -> str | None:
    """An http(s) URL of a host, with no credentials in it.

    Credentials in the URL (``https://user:password@minio:9000``) are refused, not masked: botocore signs
    every request with the AWS credentials it finds (environment, profile, instance role) and never uses
    URL userinfo — with aiohttp underneath, userinfo even makes every request fail ("Cannot combine
    AUTHORIZATION header with AUTH argument or credentials encoded in URL") — while the URL itself is
    quoted in config check, errors, the journal and stats. Refusing it keeps the password out of all of them.
    """
    if value is None:
        return value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("not a valid URL (expected e.g. https://minio.internal:9000)") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if "@" in parts.netloc:
        raise ValueError(
            "must not contain credentials (user:password@): S3 requests are signed with the AWS credentials "
            "from the environment or profile, never the URL's"
        )
    host = parts.hostname or ""
    if not host or any(char in value for char in "\t\r\n "):
        raise ValueError("needs a host name (expected e.g. https://minio.internal:9000)")
    if not _HOSTNAME.match(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("the host is not a valid host name or IP address") from None
    if port == 0:
        raise ValueError("the port must be 1-65535")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    return value


def mask_url(url: str) -> str:
    """A URL with any password in its userinfo replaced, for showing it to people."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return urlunsplit((parts.scheme, f"{user}:********@{host}", parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<unparseable URL hidden>"


def check_repository_url(value: str) -> str:
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError("not a valid URL (expected file:///path or s3://bucket/prefix)") from None
    if parts.scheme == "file":
        if not parts.path.startswith("/") or parts.netloc not in ("", "localhost"):
            raise ValueError("a file URL needs an absolute path: file:///var/lib/kybdr/repo")
    elif parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError("an s3 URL needs a bucket: s3://bucket/prefix")
        if not _BUCKET.match(parts.netloc):
            raise ValueError("the bucket name may hold only letters, digits, '.', '-' and '_'")
    else:
        raise ValueError("must start with file:// or s3://")
    return value


def check_listen_address(value: str | None) -> str | None:
    if value:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8080")
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not _HOSTNAME.match(bare):
            try:
                ipaddress.ip_address(bare)
            except ValueError:
                raise ValueError("the host is not a valid host name or IP address") from None
    return value
