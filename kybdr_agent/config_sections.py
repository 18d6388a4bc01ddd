"""The tables of ``agent.toml``: one frozen model per section, its fields' bounds and its cross-field rules.

Every section forbids unknown keys, so a typo is an error rather than a silently ignored setting; how one
value is parsed or checked lives in ``config_values``, and the whole settings object in ``config``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kybdr_agent.backup.retention import SEVEN_YEARS_DAYS as SEVEN_YEARS_DAYS  # re-exported by config
from kybdr_agent.backup.streamfmt import MAX_FRAME_SIZE, MIN_FRAME_SIZE
from kybdr_agent.config_values import (
    HUNDRED_YEARS_DAYS,
    Age,
    DatabaseNames,
    Duration,
    Interval,
    MaxAge,
    SweepGrace,
    check_cron,
    check_dsn,
    check_endpoint,
    check_listen_address,
    check_repository_url,
    check_zone,
)

DEFAULT_REPOSITORY_URL: Final = "file:///var/lib/kybdr/repo"
# sockaddr_un.sun_path holds 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES: Final = 107
MAX_KEEP: Final = 100_000
# A region is one DNS label; botocore refuses anything else (with a ValueError at client creation).
_REGION: Final = r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"


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


class PolicySettings(_Section):
    """A schedule for some databases and how long what it makes is kept (``[[backup.policies]]``).

    ``kind = "physical"``: a base backup of the whole cluster ``[database]`` reaches (pg_basebackup), so the
    policy names no databases; its backups are kept by its rules, per cluster."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["logical", "physical"] = "logical"
    schedule: str
    databases: DatabaseNames = Field(default_factory=list)
    timezone: str = "UTC"
    jitter_seconds: float = Field(0.0, ge=0, le=86400)
    keep_daily: int = Field(7, ge=0, le=MAX_KEEP)
    keep_weekly: int = Field(4, ge=0, le=MAX_KEEP)
    keep_monthly: int = Field(12, ge=0, le=MAX_KEEP)
    keep_yearly: int = Field(7, ge=0, le=MAX_KEEP)
    min_age: Age = timedelta(hours=1)
    max_age: MaxAge | None = timedelta(days=SEVEN_YEARS_DAYS)
    stale_after: Duration | None = Field(
        None,
        description="alert and `check` CRITICAL when the newest good backup is older "
        "(default: the schedule's longest gap + jitter + 1h)",
    )

    @field_validator("schedule")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        return check_cron(value)

    @model_validator(mode="after")
    def _databases_for_kind(self) -> PolicySettings:
        if self.kind == "physical" and self.databases:
            raise ValueError("a physical policy backs up the whole cluster: it lists no databases")
        if self.kind == "logical" and not self.databases:
            raise ValueError('databases: list at least one database (or set kind = "physical")')
        return self

    @model_validator(mode="after")
    def _ages_consistent(self) -> PolicySettings:
        if self.max_age is not None and self.max_age < self.min_age:
            raise ValueError("max_age is shorter than min_age: the two rules would contradict each other")
        return self

    @field_validator("timezone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        return check_zone(value)


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
        return check_cron(value)

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


_KMS_KEY: Final = (
    r"^(arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:(key/[A-Za-z0-9-]{1,128}|alias/[A-Za-z0-9/_-]{1,250})"
    r"|mrk-[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|alias/[A-Za-z0-9/_-]{1,250})$"
)


class EncryptionSettings(_Section):
    """Where master keys come from. ``key_provider`` picks the key that wraps new backups' data keys: a key
    file (``key_file``) or AWS KMS envelope encryption (``kms_key_id``). Older keys stay able to open the
    backups they wrapped: ``old_key_files``, and ``kms_key_id`` when the provider is a file."""

    key_provider: Literal["file", "kms"] = Field(
        "file", description='"file": key_file wraps data keys; "kms": AWS KMS GenerateDataKey under kms_key_id'
    )
    key_file: Path | None = Field(None, description="32-byte master key: raw, hex or base64; mode 0600")
    kms_key_id: str | None = Field(
        None,
        pattern=_KMS_KEY,
        description="AWS KMS key (ARN, key id or alias; terraform's encryption_kms_key_id): wraps new backups' "
        'data keys with key_provider = "kms", and opens the backups it wrapped either way',
    )
    kms_region: str | None = Field(
        None, pattern=_REGION, description="KMS region (default: the region in kms_key_id's ARN, else repository's)"
    )
    old_key_files: list[Path] = Field(default_factory=list, description="earlier keys, to open older backups")
    frame_size_kib: int = Field(1024, description="plaintext bytes per authenticated frame, in KiB")

    @field_validator("frame_size_kib")
    @classmethod
    def _frame_in_range(cls, value: int) -> int:
        if not MIN_FRAME_SIZE <= value * 1024 <= MAX_FRAME_SIZE:
            raise ValueError(f"must be between 1 and {MAX_FRAME_SIZE // 1024}")
        return value

    @model_validator(mode="after")
    def _provider_has_its_key(self) -> EncryptionSettings:
        if self.key_provider == "kms":
            if not self.kms_key_id:
                raise ValueError('key_provider = "kms" needs kms_key_id (terraform output encryption_kms_key_id)')
            if self.key_file is not None:
                raise ValueError(
                    'key_provider = "kms" does not use key_file: move it to old_key_files, where it keeps '
                    "opening the backups it wrapped (until `kybdr-agent key rotate` re-wraps them)"
                )
        named = kms_arn_region(self.kms_key_id)
        if self.kms_region and named and self.kms_region != named:
            raise ValueError(f"kms_region {self.kms_region} differs from the region of kms_key_id's ARN ({named})")
        return self


def kms_arn_region(key_ref: str | None) -> str | None:
    """The region of a KMS key or alias ARN (``arn:aws:kms:REGION:…``); None for a bare id or alias."""
    if key_ref is None or not key_ref.startswith("arn:"):
        return None
    return key_ref.split(":")[3] or None


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
        return check_repository_url(value)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return check_endpoint(value)

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
        return check_dsn(value)


class TokenSettings(_Section):
    role: Literal["viewer", "operator", "admin"]
    token_file: Path
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.@-]{1,64}$",
        description="who the token is, in the audit trail (default: the token file's name)",
    )

    @property
    def caller(self) -> str:
        return self.name or self.token_file.name


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
        return check_listen_address(value)

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
    housekeeping_interval: Interval = Field(timedelta(hours=1), description="time between sweeps (1s..1d)")
    service_user: str | None = Field(
        "kybdr",
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$",
        description="the user the service runs as (systemd User=); it may own the control socket and secret files",
    )


class RestoreSettings(_Section):
    """Restores. A parallel restore (``--jobs`` > 1) streams the data and builds indexes and constraints with
    N workers, which read the archive's table of contents from a file: it is spooled to ``spool_dir``
    (created 0700, the file 0600, deleted afterwards; kilobytes, checked for 80 MiB of room)."""

    spool_dir: Path | None = Field(
        None,
        description="where --jobs > 1 spools the archive's table of contents (default: backup.backup_dir/spool)",
    )

    @field_validator("spool_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value


class DrillSettings(_Section):
    """Restore drills: restore the newest backup of each database into a scratch database and compare."""

    schedule: str | None = Field("0 5 * * 0", description="cron; unset = only on request")
    timezone: str = "UTC"
    dsn: str | None = Field(None, description="server for scratch databases; default: the source server")
    password_file: Path | None = Field(None, description="the password, alone in a file of mode 0600 or 0640")

    @field_validator("timezone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        return check_zone(value)

    @field_validator("dsn")
    @classmethod
    def _dsn_parses(cls, value: str | None) -> str | None:
        return check_dsn(value)

    @field_validator("schedule")
    @classmethod
    def _cron_parses(cls, value: str | None) -> str | None:
        return check_cron(value) if value else value


_ARN: Final = r"^arn:aws[a-z-]*:[a-z0-9-]+:[a-z0-9-]*:[0-9]{0,12}:.+$"


def _http_url(value: str | None) -> str | None:
    """A health, witness or peer URL: http(s), a host, no credentials (a token goes in a file)."""
    if value is None:
        return value
    return check_endpoint(value)


class DRSettings(_Section):
    """``[dr]``: the seed's ``DRConfig`` in snake_case (the keys terraform's ``agent_config`` output hands
    the agent) plus what a fenced, witnessed failover needs. Off unless ``enabled``."""

    enabled: bool = False
    role: Literal["dr", "primary"] = Field(
        "dr", description='"dr": beside the standby, watches and acts; "primary": beside the primary, answers as peer'
    )
    primary_region: str | None = Field(None, pattern=_REGION)
    dr_region: str | None = Field(None, pattern=_REGION)
    health_check_url: str | None = Field(None, description="the primary region's health URL")
    dr_health_check_url: str | None = Field(None, description="the DR region's health URL")
    health_check_interval: Interval = Field(timedelta(seconds=10), description="time between probes (1s..1d)")
    probe_timeout: Duration = Field(
        timedelta(seconds=3), description="hard bound on each probe, TCP connect included (below the interval)"
    )
    failover_threshold: int = Field(3, ge=1, le=100, description="consecutive failed probes of the active region")
    auto_failover: bool = False
    failback_threshold: int = Field(12, ge=1, le=10_000, description="consecutive healthy probes before failback")
    auto_failback: bool = False
    route53_zone_id: str | None = Field(None, pattern=r"^[A-Z0-9]{1,32}$")
    route53_domain: str | None = Field(None, min_length=1, max_length=253, pattern=r"^[A-Za-z0-9_.*-]+\.?$")
    load_balancer_arn: str | None = Field(None, pattern=_ARN)
    dr_load_balancer_arn: str | None = Field(None, pattern=_ARN)
    primary_dsn: str | None = Field(None, description="libpq DSN of the primary region's database")
    standby_dsn: str | None = Field(None, description="libpq DSN of the DR region's database (the standby)")
    password_file: Path | None = Field(None, description="password for both DSNs; default database.password_file")
    witness_urls: list[str] = Field(
        default_factory=list, description="third vantage points: 2xx while they see the primary healthy"
    )
    peer_url: str | None = Field(None, description="the other agent's control API over TCP")
    peer_token_file: Path | None = Field(None, description="bearer token for peer_url (admin on the peer)")
    max_lag_bytes: int = Field(16 << 20, ge=0, le=1 << 40, description="automatic failover refused above this lag")
    max_staleness: Duration = Field(timedelta(seconds=30), description="refused when the last WAL receipt is older")
    cooldown: Duration = Field(timedelta(minutes=10), description="minimum time between automatic role changes")
    flap_budget: int = Field(2, ge=1, le=100, description="automatic role changes per hour before halting")
    partition_timeout: Duration = Field(
        timedelta(seconds=20), description="a primary cut off from peer and witnesses this long fences itself"
    )
    catchup_timeout: Duration = Field(timedelta(seconds=30), description="wait for replay to reach receive")
    promote_timeout: Duration = Field(timedelta(seconds=60), description="pg_promote wait")
    dns_sync_timeout: Duration = Field(timedelta(seconds=120), description="wait for Route53 INSYNC")
    dns_ttl: int = Field(60, ge=0, le=86400, description="seconds clients may keep the old answer (reported)")
    aws_endpoint_url: str | None = Field(None, description="Route53/ELBv2/S3 control-plane endpoint override")
    fence_command: list[str] | None = Field(
        None, description="argv run to fence the old primary (no shell); exit 0 = fenced"
    )
    pgdata: Path | None = Field(None, description="this host's data directory, for dr rejoin")

    @field_validator("health_check_url", "dr_health_check_url", "peer_url", "aws_endpoint_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return _http_url(value)

    @field_validator("witness_urls")
    @classmethod
    def _witnesses(cls, value: list[str]) -> list[str]:
        for url in value:
            _http_url(url)
        if len(set(value)) != len(value):
            raise ValueError("a witness is listed twice (it would vote twice)")
        return value

    @field_validator("primary_dsn", "standby_dsn")
    @classmethod
    def _dsn_parses(cls, value: str | None) -> str | None:
        return check_dsn(value)

    @field_validator("fence_command")
    @classmethod
    def _argv(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0]):
            raise ValueError("must name a program: an argv list such as ['/usr/local/bin/fence', '--now']")
        return value

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> DRSettings:
        if not self.enabled:
            return self
        if self.probe_timeout >= self.health_check_interval:
            raise ValueError("probe_timeout must be shorter than health_check_interval")
        needed: tuple[str, ...]
        if self.role == "dr":
            needed = (
                "primary_region", "dr_region", "health_check_url", "primary_dsn", "standby_dsn",
                "route53_zone_id", "route53_domain", "load_balancer_arn", "dr_load_balancer_arn",
            )  # fmt: skip
        else:
            needed = ("primary_dsn",)
        missing = [name for name in needed if getattr(self, name) in (None, "")]
        if missing:
            raise ValueError(f"dr.enabled with role {self.role!r} needs: {', '.join(missing)}")
        if self.role == "primary" and not (self.peer_url or self.witness_urls):
            raise ValueError("role 'primary' needs peer_url or witness_urls: whom it stays in contact with")
        if self.peer_url and self.peer_token_file is None:
            raise ValueError("peer_url needs peer_token_file (the peer's API over TCP requires a token)")
        return self


class TelemetrySettings(_Section):
    """``[telemetry]``: Prometheus (``GET /metrics`` always; a token-free scrape listener optionally),
    CloudWatch ``PutMetricData`` and OpenTelemetry traces by OTLP. Endpoints for AWS follow botocore's
    ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_CLOUDWATCH`` environment."""

    metrics_listen: str | None = Field(
        None, description='"127.0.0.1:9187": serve only GET /metrics there, without a token (for scrapers)'
    )
    cloudwatch: bool = Field(False, description="publish the metrics terraform's alarms and dashboards read")
    cloudwatch_namespace: str = Field("KybdrAgent", pattern=r"^[A-Za-z0-9._/#:-]{1,255}$")
    cloudwatch_region: str | None = Field(None, pattern=_REGION, description="default: repository.region")
    cloudwatch_interval: Interval = Field(timedelta(seconds=60), description="how often buffered metrics are sent")
    otlp_endpoint: str | None = Field(
        None, description='OTLP/HTTP collector, e.g. "http://127.0.0.1:4318": traces are exported there when set'
    )

    @field_validator("metrics_listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        return check_listen_address(value)

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _http_url(value)


class NotifySettings(_Section):
    """``[notify]``: where alerts go (SNS, a JSON webhook) and the thresholds only alerts use."""

    sns_topic_arn: str | None = Field(
        None, pattern=r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}$", description="alert topic"
    )
    webhook_url: str | None = Field(None, description="POST a JSON document per alert to this URL")
    webhook_token_file: Path | None = Field(None, description="bearer token for the webhook (mode 0600)")
    min_free_bytes: int = Field(
        10 << 30, ge=0, le=1 << 60, description="alert when a folder repository's filesystem has less free"
    )
    max_lag_bytes: int | None = Field(
        None, ge=1, le=1 << 60, description="alert when DR replication lag exceeds this (default: dr.max_lag_bytes)"
    )
    timeout: Duration = Field(timedelta(seconds=10), description="per attempt, per channel")
    max_attempts: int = Field(5, ge=1, le=20, description="attempts per message per channel before it is dropped")

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        return _http_url(value)
