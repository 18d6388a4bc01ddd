"""Configuration: a TOML file (``--config``, default ``/etc/kybdr-agent/agent.toml``) with ``KYBDR_``-prefixed
environment overrides for nested fields (``KYBDR_REPOSITORY__URL``).

Every section forbids unknown keys, so a typo is an error rather than a silently ignored setting. Secrets are
never values in this file: they are paths (``encryption.key_file``, ``database.password_file``) read when
needed, so ``config check`` can print the whole effective configuration safely.
"""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from kybdr_agent.backup.schedule import CronSpec, next_run
from kybdr_agent.backup.streamfmt import MAX_FRAME_SIZE, MIN_FRAME_SIZE
from kybdr_agent.conninfo import ConninfoError, mask_dsn, parse_dsn
from kybdr_agent.errors import ConfigError

DEFAULT_CONFIG_PATH: Final = Path("/etc/kybdr-agent/agent.toml")
DEFAULT_REPOSITORY_URL: Final = "file:///var/lib/kybdr/repo"
SEVEN_YEARS_DAYS: Final = 7 * 365 + 2


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w|y)\s*$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def _parse_duration(value: object) -> object:
    """Durations as people write them: "90s", "30m", "12h", "7d", "4w", "7y" (365 days), or seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    return value


Duration = Annotated[timedelta, BeforeValidator(_parse_duration)]


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
    databases: list[str] = Field(min_length=1)
    timezone: str = "UTC"
    jitter_seconds: float = Field(0.0, ge=0, le=86400)
    keep_daily: int = Field(7, ge=0)
    keep_weekly: int = Field(4, ge=0)
    keep_monthly: int = Field(12, ge=0)
    keep_yearly: int = Field(7, ge=0)
    min_age: Duration = timedelta(hours=1)
    max_age: Duration | None = timedelta(days=SEVEN_YEARS_DAYS)

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
    retention_days: int = Field(SEVEN_YEARS_DAYS, ge=1, description="maximum age of any backup")
    compression: bool = True
    encryption: bool = True
    cross_region: bool = Field(False, description="copy every backup to cross_region_bucket (server-side)")
    cross_region_bucket: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    cross_region_region: str | None = Field(None, description="the DR bucket's region (default: repository's)")
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


class RepositorySettings(_Section):
    url: str = DEFAULT_REPOSITORY_URL
    endpoint_url: str | None = None
    region: str | None = None
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
        parts = urlsplit(value)
        if parts.scheme == "file":
            if not parts.path.startswith("/") or parts.netloc not in ("", "localhost"):
                raise ValueError("a file URL needs an absolute path: file:///var/lib/kybdr/repo")
        elif parts.scheme == "s3":
            if not parts.netloc:
                raise ValueError("an s3 URL needs a bucket: s3://bucket/prefix")
        else:
            raise ValueError("must start with file:// or s3://")
        return value

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
    password_file: Path | None = None
    databases: list[str] = Field(default_factory=list, description="databases backed up by default")
    maintenance_database: str = Field("postgres", description="where restore runs CREATE/DROP DATABASE")
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
    socket: Path = Path("/run/kybdr-agent/control.sock")
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

    @field_validator("tcp_listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8080")
        return value

    @model_validator(mode="after")
    def _tcp_needs_tokens(self) -> ControlSettings:
        if self.tcp_listen and not self.tokens:
            raise ValueError("tcp_listen needs at least one [[control.tokens]] entry: TCP requests need a token")
        return self


class DaemonSettings(_Section):
    shutdown_grace_seconds: float = Field(30.0, ge=0, le=3600)
    sweep_older_than: Duration = Field(timedelta(hours=6), description="leftovers older than this are removed")
    housekeeping_interval: Duration = timedelta(hours=1)


class DrillSettings(_Section):
    """Restore drills: restore the newest backup of each database into a scratch database and compare."""

    schedule: str | None = Field("0 5 * * 0", description="cron; unset = only on request")
    timezone: str = "UTC"
    dsn: str | None = Field(None, description="server for scratch databases; default: the source server")
    password_file: Path | None = None

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
        toml_file = cls.model_config.get("toml_file")
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if toml_file:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=toml_file),)
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
        return data


def load_settings(path: Path | None) -> AgentSettings:
    """Load and validate; every problem becomes one ``ConfigError`` naming the field and what is wrong.

    ``path`` None means the default location, which may be absent (defaults + environment); a path the
    operator named must exist.
    """
    chosen = path or DEFAULT_CONFIG_PATH
    if path is not None and not chosen.exists():
        raise ConfigError(f"config file {chosen} does not exist")
    toml_file = chosen if chosen.exists() else None
    if toml_file is not None:
        try:
            tomllib.loads(toml_file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{toml_file}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {toml_file}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{toml_file}: not UTF-8 text (byte {exc.start}): a TOML file must be UTF-8") from None
    runtime = type(
        "AgentSettingsFromFile",
        (AgentSettings,),
        {"model_config": {**AgentSettings.model_config, "toml_file": toml_file}},
    )
    try:
        settings: AgentSettings = runtime()
    except ValidationError as exc:
        raise ConfigError(_describe_errors(toml_file, exc)) from None
    return settings


def _describe_errors(source: Path | None, exc: ValidationError) -> str:
    where = str(source) if source else "configuration (defaults and KYBDR_* environment)"
    lines = [f"{where}: {exc.error_count()} problem(s):"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        shown = ""
        value = err.get("input")
        # Only numbers and booleans are echoed: a string could be a DSN with a password in it, whatever
        # field it landed in, and the message already says what a valid value looks like.
        if err["type"] not in ("missing", "extra_forbidden") and isinstance(value, int | float | bool):
            shown = f" (got {value!r})"
        if err["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling against config/agent.example.toml)"
        lines.append(f"  {loc}: {message}{shown}")
    return "\n".join(lines)
