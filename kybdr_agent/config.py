"""Configuration: a TOML file (``--config``, default ``/etc/kybdr-agent/agent.toml``) with ``KYBDR_``-prefixed
environment overrides for nested fields (``KYBDR_REPOSITORY__URL``).

Every section forbids unknown keys, so a typo is an error rather than a silently ignored setting. Secrets are
never values in this file: they are paths (``encryption.key_file``, ``database.password_file``) read when
needed, so ``config check`` can print the whole effective configuration safely.

Every number and duration is bounded: a value that would overflow later (a retention of 2**63 days, an age of
99999999999999 years) or that makes no sense (a housekeeping sweep every 0 s) is refused here, with one
``ConfigError`` naming the field, rather than crashing or spinning the agent hours later. Whatever else goes
wrong while reading the file (deep nesting, a value no parser expected) is one ``ConfigError`` as well.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from kybdr_agent.backup.schedule import CronSpec, next_run
from kybdr_agent.backup.streamfmt import MAX_FRAME_SIZE, MIN_FRAME_SIZE
from kybdr_agent.conninfo import ConninfoError, mask_dsn, parse_dsn
from kybdr_agent.errors import ConfigError

DEFAULT_CONFIG_PATH: Final = Path("/etc/kybdr-agent/agent.toml")
DEFAULT_REPOSITORY_URL: Final = "file:///var/lib/kybdr/repo"
SEVEN_YEARS_DAYS: Final = 7 * 365 + 2
HUNDRED_YEARS_DAYS: Final = 36500
MAX_CONFIG_BYTES: Final = 1 << 20
MAX_PROBLEMS_SHOWN: Final = 20
# sockaddr_un.sun_path holds 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES: Final = 107
MAX_KEEP: Final = 100_000
# A region is one DNS label; botocore refuses anything else (with a ValueError at client creation).
_REGION: Final = r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
# What botocore accepts as a bucket name (it checks before every request); checked here, once.
_BUCKET: Final = re.compile(r"^[A-Za-z0-9.\-_]{1,255}$")
_HOSTNAME: Final = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def _no_nul(value: object) -> object:
    """No NUL anywhere: the OS refuses it in paths, environment variables and argv, and Python says so by
    raising ValueError deep inside whatever first uses the value (an exec, an open), long after start-up."""
    if isinstance(value, str | Path) and "\x00" in str(value):
        raise ValueError("must not contain a NUL character")
    if isinstance(value, list | tuple):
        for item in value:
            _no_nul(item)
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul_bytes(cls, value: object) -> object:
        return _no_nul(value)


_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w|y)\s*$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_MAX_DURATION: Final = timedelta(days=HUNDRED_YEARS_DAYS)


def _parse_duration(value: object) -> object:
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


Duration = Annotated[timedelta, BeforeValidator(_parse_duration), _between(timedelta(0), _MAX_DURATION)]
Age = Annotated[timedelta, BeforeValidator(_parse_duration), _between(timedelta(0), _MAX_DURATION)]
MaxAge = Annotated[timedelta, BeforeValidator(_parse_duration), _between(timedelta(hours=1), _MAX_DURATION)]
SweepGrace = Annotated[timedelta, BeforeValidator(_parse_duration), _between(timedelta(0), timedelta(days=30))]
Interval = Annotated[timedelta, BeforeValidator(_parse_duration), _between(timedelta(seconds=10), timedelta(days=1))]


def _database_names(value: list[str]) -> list[str]:
    for name in value:
        if not name or len(name.encode("utf-8", "surrogatepass")) > 63:
            raise ValueError("a PostgreSQL database name is 1 to 63 bytes (longer names are silently truncated)")
    return value


DatabaseNames = Annotated[list[str], AfterValidator(_database_names)]


def _check_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None
    return value


def _check_dsn(value: str | None) -> str | None:
    if value:
        try:
            parse_dsn(value)
        except ConninfoError as exc:
            raise ValueError(str(exc)) from None
    return value


def _check_cron(value: str) -> str:
    """The spec must parse and must match some time (``0 0 30 2 *`` parses but never runs)."""
    next_run(CronSpec.parse(value), datetime.now(UTC), UTC)
    return value


class PolicySettings(_Section):
    """A schedule for some databases and how long what it makes is kept (``[[backup.policies]]``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    schedule: str
    databases: DatabaseNames = Field(min_length=1)
    timezone: str = "UTC"
    jitter_seconds: float = Field(0.0, ge=0, le=86400)
    keep_daily: int = Field(7, ge=0, le=MAX_KEEP)
    keep_weekly: int = Field(4, ge=0, le=MAX_KEEP)
    keep_monthly: int = Field(12, ge=0, le=MAX_KEEP)
    keep_yearly: int = Field(7, ge=0, le=MAX_KEEP)
    min_age: Age = timedelta(hours=1)
    max_age: MaxAge | None = timedelta(days=SEVEN_YEARS_DAYS)

    @field_validator("schedule")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        return _check_cron(value)

    @model_validator(mode="after")
    def _ages_consistent(self) -> PolicySettings:
        if self.max_age is not None and self.max_age < self.min_age:
            raise ValueError("max_age is shorter than min_age: the two rules would contradict each other")
        return self

    @field_validator("timezone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        return _check_zone(value)


class BackupSettings(_Section):
    """The seed's ``BackupConfig``. ``EncryptionKey`` lives in ``[encryption] key_file`` (a path, not a value)."""

    enabled: bool = True
    backup_dir: Path = Field(
        Path("/var/lib/kybdr-agent"), description="the agent's working directory (state, journals)"
    )
    retention_days: int = Field(
        SEVEN_YEARS_DAYS, ge=1, le=HUNDRED_YEARS_DAYS, description="maximum age of any backup (at most 100 years)"
    )
    compression: bool = True
    encryption: bool = True
    cross_region: bool = Field(False, description="copy every backup to cross_region_bucket (server-side)")
    cross_region_bucket: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    cross_region_region: str | None = Field(
        None, pattern=_REGION, description="the DR bucket's region (default: repository's)"
    )
    schedule: str = Field("0 2 * * *", description="schedule of the implicit policy when none is listed")
    policies: list[PolicySettings] = Field(default_factory=list)
    max_parallel: int = Field(2, ge=1, le=64, description="backup jobs running at once (all databases)")

    @field_validator("schedule")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        return _check_cron(value)

    @field_validator("policies")
    @classmethod
    def _unique_names(cls, value: list[PolicySettings]) -> list[PolicySettings]:
        names = [p.name for p in value]
        if len(names) != len(set(names)):
            raise ValueError("policy names must be unique")
        return value

    @model_validator(mode="after")
    def _cross_region_needs_bucket(self) -> BackupSettings:
        if self.cross_region and not self.cross_region_bucket:
            raise ValueError("cross_region = true needs cross_region_bucket")
        return self


class CompressionSettings(_Section):
    algorithm: Literal["zstd", "gzip"] = "zstd"
    level: int | None = Field(None, description="codec level; zstd 1-22 (default 3), gzip 1-9 (default 6)")
    threads: int = Field(1, ge=0, le=16, description="libzstd worker threads (0 = compress in the calling thread)")

    @model_validator(mode="after")
    def _level_in_range(self) -> CompressionSettings:
        if self.level is not None:
            low, high = (1, 22) if self.algorithm == "zstd" else (1, 9)
            if not low <= self.level <= high:
                raise ValueError(f"{self.algorithm} level must be {low}..{high}")
        return self


class EncryptionSettings(_Section):
    key_file: Path | None = Field(None, description="32-byte master key: raw, hex or base64; mode 0600")
    old_key_files: list[Path] = Field(default_factory=list, description="earlier keys, to open older backups")
    frame_size_kib: int = Field(1024, description="plaintext bytes per authenticated frame, in KiB")

    @field_validator("frame_size_kib")
    @classmethod
    def _frame_in_range(cls, value: int) -> int:
        if not MIN_FRAME_SIZE <= value * 1024 <= MAX_FRAME_SIZE:
            raise ValueError(f"must be between 1 and {MAX_FRAME_SIZE // 1024}")
        return value


def _check_endpoint(value: str | None) -> str | None:
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


class RepositorySettings(_Section):
    url: str = DEFAULT_REPOSITORY_URL
    endpoint_url: str | None = Field(None, description="an S3-compatible store's endpoint; no credentials in it")
    region: str | None = Field(None, pattern=_REGION)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    checksums: Literal["sha256", "when_required"] = Field(
        "sha256", description="per-part SHA-256, or only what the API requires (for picky compatible stores)"
    )
    part_size_mib: int = Field(0, ge=0, le=5120, description="0 = size parts from the database's size")
    min_part_size_mib: int = Field(8, ge=5, le=5120)
    max_parts: int = Field(10_000, ge=4, le=10_000, description="1000 for stores with that limit")
    upload_concurrency: int = Field(2, ge=1, le=32)
    connect_timeout_seconds: float = Field(10.0, gt=0, le=300)
    request_timeout_seconds: float = Field(120.0, gt=0, le=3600, description="stall deadline per request")
    max_attempts: int = Field(5, ge=1, le=20)

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
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

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _check_endpoint(value)

    @field_validator("part_size_mib")
    @classmethod
    def _part_minimum(cls, value: int) -> int:
        if value and value < 5:
            raise ValueError("S3 parts are at least 5 MiB (0 sizes them automatically)")
        return value

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def local_path(self) -> Path:
        return Path(urlsplit(self.url).path)

    @property
    def bucket(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def prefix(self) -> str:
        return urlsplit(self.url).path.strip("/")


class DatabaseSettings(_Section):
    dsn: str | None = Field(None, description="libpq DSN; else the PG* environment, as pg_dump uses it")
    password_file: Path | None = Field(None, description="the password, alone in a file of mode 0600 or 0640")
    databases: DatabaseNames = Field(default_factory=list, description="databases backed up by default")
    maintenance_database: str = Field(
        "postgres", min_length=1, max_length=63, description="where restore runs CREATE/DROP DATABASE"
    )
    pg_bin_dir: Path | None = Field(None, description="pg_dump/pg_restore location; default: by server version")
    connect_timeout_seconds: float = Field(15.0, gt=0, le=600)

    @field_validator("dsn")
    @classmethod
    def _dsn_parses(cls, value: str | None) -> str | None:
        return _check_dsn(value)


class TokenSettings(_Section):
    role: Literal["viewer", "operator", "admin"]
    token_file: Path


class ControlSettings(_Section):
    socket: Path = Field(
        Path("/run/kybdr-agent/control.sock"),
        description="absolute path; its directory writable only by its owner (root or the agent's user)",
    )
    socket_mode: int = Field(0o660, ge=0, le=0o777, description="never world-accessible")
    tcp_listen: str | None = Field(None, description='"127.0.0.1:8080" to listen on TCP too (tokens required)')
    tokens: list[TokenSettings] = Field(default_factory=list)
    max_body_bytes: int = Field(65536, ge=1024, le=1 << 20)
    job_history: int = Field(200, ge=10, le=10000)

    @field_validator("socket_mode")
    @classmethod
    def _not_world(cls, value: int) -> int:
        if value & 0o007:
            raise ValueError("the control socket must not be accessible to others (use 0660 or tighter)")
        return value

    @field_validator("socket")
    @classmethod
    def _socket_path(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path, e.g. /run/kybdr-agent/control.sock")
        if len(os.fsencode(value)) > MAX_SOCKET_PATH_BYTES:
            raise ValueError(f"a unix socket path is at most {MAX_SOCKET_PATH_BYTES} bytes")
        return value

    @field_validator("tcp_listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
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

    @model_validator(mode="after")
    def _tcp_needs_tokens(self) -> ControlSettings:
        if self.tcp_listen and not self.tokens:
            raise ValueError("tcp_listen needs at least one [[control.tokens]] entry: TCP requests need a token")
        return self


class DaemonSettings(_Section):
    shutdown_grace_seconds: float = Field(30.0, ge=0, le=3600)
    sweep_older_than: SweepGrace = Field(
        timedelta(0),
        description="grace before leftovers no live job holds a lease on are removed (0s..30d; 0s = at once)",
    )
    housekeeping_interval: Interval = Field(timedelta(hours=1), description="time between sweeps (10s..1d)")
    service_user: str | None = Field(
        "kybdr",
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$",
        description="the user the service runs as (systemd User=); it may own the control socket and secret files",
    )


class DrillSettings(_Section):
    """Restore drills: restore the newest backup of each database into a scratch database and compare."""

    schedule: str | None = Field("0 5 * * 0", description="cron; unset = only on request")
    timezone: str = "UTC"
    dsn: str | None = Field(None, description="server for scratch databases; default: the source server")
    password_file: Path | None = Field(None, description="the password, alone in a file of mode 0600 or 0640")

    @field_validator("timezone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        return _check_zone(value)

    @field_validator("dsn")
    @classmethod
    def _dsn_parses(cls, value: str | None) -> str | None:
        return _check_dsn(value)

    @field_validator("schedule")
    @classmethod
    def _cron_parses(cls, value: str | None) -> str | None:
        return _check_cron(value) if value else value


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KYBDR_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    backup: BackupSettings = BackupSettings()
    compression: CompressionSettings = CompressionSettings()
    encryption: EncryptionSettings = EncryptionSettings()
    repository: RepositorySettings = RepositorySettings()
    database: DatabaseSettings = DatabaseSettings()
    control: ControlSettings = ControlSettings()
    daemon: DaemonSettings = DaemonSettings()
    drill: DrillSettings = DrillSettings()

    toml_data: ClassVar[dict[str, Any] | None] = None

    @model_validator(mode="after")
    def _cross_region_needs_s3(self) -> AgentSettings:
        if self.backup.cross_region and self.repository.scheme != "s3":
            raise ValueError("backup.cross_region copies between S3 buckets: repository.url must be s3://")
        return self

    @model_validator(mode="after")
    def _encryption_needs_key(self) -> AgentSettings:
        if self.backup.encryption and self.encryption.key_file is None:
            raise ValueError(
                "backup.encryption is on but encryption.key_file is not set "
                "(generate one with: kybdr-agent keygen FILE)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if cls.toml_data is not None:
            # The file as load_settings parsed it: read once, so a pipe (--config <(…)) works and the
            # file cannot change between the checks and the use.
            sources += (InitSettingsSource(settings_cls, dict(cls.toml_data)),)
        return sources

    def effective_policies(self) -> list[PolicySettings]:
        """The listed policies, or the seed's single ``backup.schedule`` over ``database.databases``."""
        if self.backup.policies:
            return list(self.backup.policies)
        if not self.database.databases:
            return []
        return [
            PolicySettings(
                name="default",
                schedule=self.backup.schedule,
                databases=list(self.database.databases),
                max_age=timedelta(days=self.backup.retention_days),
            )
        ]

    def masked(self) -> dict[str, Any]:
        """The effective configuration for people: secrets shown only as where they come from."""
        data = self.model_dump(mode="json")
        if self.database.dsn:
            data["database"]["dsn"] = mask_dsn(self.database.dsn)
        if self.drill.dsn:
            data["drill"]["dsn"] = mask_dsn(self.drill.dsn)
        if self.repository.endpoint_url:  # validation refuses userinfo; masked anyway, whatever reaches here
            data["repository"]["endpoint_url"] = mask_url(self.repository.endpoint_url)
        return data


def load_settings(path: Path | None) -> AgentSettings:
    """Load and validate; every problem becomes one ``ConfigError`` naming the field and what is wrong.

    ``path`` None means the default location, which may be absent (defaults + environment); a path the
    operator named must exist. Nothing that goes wrong in here escapes as anything but a ``ConfigError``:
    a configuration is input, and no input may end the agent in a traceback.
    """
    chosen = path or DEFAULT_CONFIG_PATH
    data = _read_toml(chosen, required=path is not None)
    toml_file = chosen if data is not None else None
    runtime = type("AgentSettingsFromFile", (AgentSettings,), {"toml_data": data})
    try:
        settings: AgentSettings = runtime()
    except ValidationError as exc:
        raise ConfigError(_describe_errors(toml_file, exc)) from None
    except SettingsError as exc:  # a KYBDR_* value that is not the JSON its field needs; names no value
        raise ConfigError(f"configuration (KYBDR_* environment): {_printable(str(exc))}") from None
    except RecursionError:
        where = f"{toml_file} or a KYBDR_* variable" if toml_file else "a KYBDR_* variable"
        raise ConfigError(f"configuration: a value in {where} is nested too deeply") from None
    except (ValueError, TypeError, ArithmeticError, LookupError) as exc:
        # Not expected (the validators turn what they check into ValidationError), but a configuration must
        # never end in a traceback. The message is withheld: it could quote a value, and values can be
        # secrets; -v shows the chained exception.
        raise ConfigError(
            f"{_where(toml_file)}: cannot be validated ({type(exc).__name__}); run with -v for details"
        ) from exc
    return settings


def _read_toml(path: Path, *, required: bool) -> dict[str, Any] | None:
    """The parsed file, or None when the default location holds none. Read once, at most 1 MiB."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return None
    except OSError as exc:  # EACCES on a directory in the way: an unreadable config is not "no config"
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"cannot read config file {path}: Is a directory")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a configuration file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): a TOML file must be UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{path}: not valid TOML: {_printable(str(exc))}") from None


def _where(source: Path | None) -> str:
    return str(source) if source else "configuration (defaults and KYBDR_* environment)"


def _printable(text: str, limit: int = 200) -> str:
    """One line of plain text: control characters escaped (no terminal escapes, no forged lines), clipped."""
    cleaned = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def _shown_value(value: object) -> str:
    """Only numbers and booleans are echoed: a string could be a DSN with a password in it, whatever
    field it landed in, and the message already says what a valid value looks like."""
    if isinstance(value, bool):
        return f" (got {value!r})"
    if isinstance(value, int) and abs(value) < 10**30:
        return f" (got {value!r})"
    if isinstance(value, float):
        return f" (got {value!r})"
    return ""


def _redacted(message: str, value: object) -> str:
    """A validator's message with the offending string taken out: some quote it (a cron parser saying what
    it could not parse), and a string in the wrong field may be a DSN with a password in it."""
    if isinstance(value, str) and len(value) >= 3:
        for shown in (repr(value), value):
            message = message.replace(shown, "(the value)")
    return message


def _describe_errors(source: Path | None, exc: ValidationError) -> str:
    errors = exc.errors()
    lines = [f"{_where(source)}: {len(errors)} problem(s):"]
    for err in errors[:MAX_PROBLEMS_SHOWN]:
        loc = _printable(".".join(str(part) for part in err["loc"]) or "(top level)", 120)
        message = _printable(_redacted(err["msg"].removeprefix("Value error, "), err.get("input")), 300)
        shown = ""
        if err["type"] not in ("missing", "extra_forbidden"):
            shown = _shown_value(err.get("input"))
        if err["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling against config/agent.example.toml)"
        lines.append(f"  {loc}: {message}{shown}")
    if len(errors) > MAX_PROBLEMS_SHOWN:
        lines.append(f"  … and {len(errors) - MAX_PROBLEMS_SHOWN} more")
    return "\n".join(lines)
