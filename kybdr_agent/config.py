"""Configuration: a TOML file (``--config``, default ``/etc/kybdr-agent/agent.toml``) with ``KYBDR_``-prefixed
environment overrides for nested fields (``KYBDR_REPOSITORY__URL``).

Every section forbids unknown keys, so a typo is an error rather than a silently ignored setting. Secrets are
never values in this file: they are paths (``encryption.key_file``, ``database.password_file``) read when
needed, so ``config check`` can print the whole effective configuration safely.

Every number and duration is bounded: a value that would overflow later (a retention of 2**63 days, an age of
99999999999999 years) or that makes no sense (a housekeeping sweep every 0 s) is refused here, with one
``ConfigError`` naming the field, rather than crashing or spinning the agent hours later. Whatever else goes
wrong while reading the file (deep nesting, a value no parser expected) is one ``ConfigError`` as well.

This module is the whole settings object and its loading; the sections are ``config_sections``, single
values' rules ``config_values``, reading the file and wording its errors ``config_loading``. Every name
those define that other code uses is importable from here.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Final
from urllib.parse import urlsplit

from pydantic import ValidationError, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from kybdr_agent.config_loading import (
    MAX_CONFIG_BYTES,
    MAX_PROBLEMS_SHOWN,
    describe_errors,
    printable,
    read_toml,
    source_name,
)
from kybdr_agent.config_sections import (
    DEFAULT_REPOSITORY_URL,
    MAX_KEEP,
    MAX_SOCKET_PATH_BYTES,
    SEVEN_YEARS_DAYS,
    BackupSettings,
    CompressionSettings,
    ControlSettings,
    DaemonSettings,
    DatabaseSettings,
    DrillSettings,
    DRSettings,
    EncryptionSettings,
    NotifySettings,
    PolicySettings,
    RepositorySettings,
    RestoreSettings,
    TelemetrySettings,
    TokenSettings,
    kms_arn_region,
)
from kybdr_agent.config_values import (
    HUNDRED_YEARS_DAYS,
    Age,
    DatabaseNames,
    Duration,
    Interval,
    MaxAge,
    SweepGrace,
    mask_url,
)
from kybdr_agent.config_wal import WalSettings
from kybdr_agent.errors import ConfigError
from kybdr_agent.postgres.conninfo import mask_dsn

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_REPOSITORY_URL",
    "HUNDRED_YEARS_DAYS",
    "MAX_CONFIG_BYTES",
    "MAX_KEEP",
    "MAX_PROBLEMS_SHOWN",
    "MAX_SOCKET_PATH_BYTES",
    "SEVEN_YEARS_DAYS",
    "Age",
    "AgentSettings",
    "BackupSettings",
    "CompressionSettings",
    "ControlSettings",
    "DRSettings",
    "DaemonSettings",
    "DatabaseNames",
    "DatabaseSettings",
    "DrillSettings",
    "Duration",
    "EncryptionSettings",
    "Interval",
    "MaxAge",
    "NotifySettings",
    "PolicySettings",
    "RepositorySettings",
    "RestoreSettings",
    "SweepGrace",
    "TelemetrySettings",
    "TokenSettings",
    "WalSettings",
    "load_settings",
    "mask_url",
]

DEFAULT_CONFIG_PATH: Final = Path("/etc/kybdr-agent/agent.toml")


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
    restore: RestoreSettings = RestoreSettings()
    dr: DRSettings = DRSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    notify: NotifySettings = NotifySettings()
    wal: WalSettings = WalSettings()

    toml_data: ClassVar[dict[str, Any] | None] = None

    @model_validator(mode="after")
    def _cross_region_needs_s3(self) -> AgentSettings:
        if self.backup.cross_region and self.repository.scheme != "s3":
            raise ValueError("backup.cross_region copies between S3 buckets: repository.url must be s3://")
        return self

    @model_validator(mode="after")
    def _cloudwatch_needs_region(self) -> AgentSettings:
        known = self.telemetry.cloudwatch_region or self.repository.region
        if self.telemetry.cloudwatch and not (known or os.environ.get("AWS_DEFAULT_REGION")):
            raise ValueError(
                "telemetry.cloudwatch needs a region: set telemetry.cloudwatch_region (or repository.region)"
            )
        return self

    @model_validator(mode="after")
    def _encryption_needs_key(self) -> AgentSettings:
        enc = self.encryption
        if self.backup.encryption and enc.key_provider == "file" and enc.key_file is None:
            if enc.kms_key_id:
                raise ValueError(
                    "backup.encryption is on but encryption.key_file is not set: to wrap backups' data keys with "
                    'encryption.kms_key_id, set encryption.key_provider = "kms"'
                )
            raise ValueError(
                "backup.encryption is on but encryption.key_file is not set "
                '(generate one with: kybdr-agent keygen FILE), or use AWS KMS: key_provider = "kms" and kms_key_id'
            )
        return self

    @model_validator(mode="after")
    def _kms_needs_region(self) -> AgentSettings:
        if self.encryption.kms_key_id and not self.kms_region():
            raise ValueError(
                "encryption.kms_key_id needs a region: use the key's ARN, or set encryption.kms_region "
                "(or repository.region)"
            )
        return self

    def kms_region(self) -> str | None:
        """Where ``encryption.kms_key_id`` is asked: ``kms_region``, else the region in the key's ARN, else the
        repository's, else the AWS environment's (``AWS_REGION``, ``AWS_DEFAULT_REGION``)."""
        enc = self.encryption
        return (
            enc.kms_region
            or kms_arn_region(enc.kms_key_id)
            or self.repository.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
        )

    def restore_spool_dir(self) -> Path:
        """Where a parallel restore spools the decoded archive: ``restore.spool_dir``, else backup_dir/spool."""
        return self.restore.spool_dir or self.backup.backup_dir / "spool"

    def wal_spool_dir(self) -> Path:
        """Where WAL waits to be archived: ``wal.spool_dir``, else backup_dir/wal-spool."""
        return self.wal.spool_path(self.backup.backup_dir)

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
        data: dict[str, Any] = _readable_durations(self.model_dump(mode="json"), self.model_dump())
        if self.database.dsn:
            data["database"]["dsn"] = mask_dsn(self.database.dsn)
        if self.drill.dsn:
            data["drill"]["dsn"] = mask_dsn(self.drill.dsn)
        for name in ("primary_dsn", "standby_dsn"):
            if getattr(self.dr, name):
                data["dr"][name] = mask_dsn(getattr(self.dr, name))
        if self.notify.webhook_url:  # a webhook's path is often its secret (Slack, Teams): host only
            parts = urlsplit(self.notify.webhook_url)
            data["notify"]["webhook_url"] = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"
        if self.repository.endpoint_url:  # validation refuses userinfo; masked anyway, whatever reaches here
            data["repository"]["endpoint_url"] = mask_url(self.repository.endpoint_url)
        return data


def _duration_text(value: timedelta) -> str:
    """A duration as this configuration is written (``"90s"``, ``"1h"``, ``"2555d"``), so ``config check``
    prints what the loader reads back, not ISO 8601's ``PT1H`` that it would refuse."""
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _readable_durations(shown: Any, raw: Any) -> Any:
    """``shown`` (a JSON dump) with every value that is a ``timedelta`` in ``raw`` (the same dump in Python
    mode) written as ``_duration_text`` says."""
    if isinstance(raw, timedelta):
        return _duration_text(raw)
    if isinstance(raw, dict) and isinstance(shown, dict):
        return {key: _readable_durations(value, raw.get(key)) for key, value in shown.items()}
    if isinstance(raw, list) and isinstance(shown, list):
        return [_readable_durations(a, b) for a, b in zip(shown, raw, strict=False)]
    return shown


def load_settings(path: Path | None, *, default_path: Path = DEFAULT_CONFIG_PATH) -> AgentSettings:
    """Load and validate; every problem becomes one ``ConfigError`` naming the field and what is wrong.

    ``path`` None means the default location, which may be absent (defaults + environment); a path the
    operator named must exist. Nothing that goes wrong in here escapes as anything but a ``ConfigError``:
    a configuration is input, and no input may end the agent in a traceback.
    """
    chosen = path or default_path
    data = read_toml(chosen, required=path is not None)
    toml_file = chosen if data is not None else None
    runtime = type("AgentSettingsFromFile", (AgentSettings,), {"toml_data": data})
    try:
        settings: AgentSettings = runtime()
    except ValidationError as exc:
        raise ConfigError(describe_errors(toml_file, exc)) from None
    except SettingsError as exc:  # a KYBDR_* value that is not the JSON its field needs; names no value
        raise ConfigError(f"configuration (KYBDR_* environment): {printable(str(exc))}") from None
    except RecursionError:
        where = f"{toml_file} or a KYBDR_* variable" if toml_file else "a KYBDR_* variable"
        raise ConfigError(f"configuration: a value in {where} is nested too deeply") from None
    except (ValueError, TypeError, ArithmeticError, LookupError) as exc:
        # Not expected (the validators turn what they check into ValidationError), but a configuration must
        # never end in a traceback. The message is withheld: it could quote a value, and values can be
        # secrets; -v shows the chained exception.
        raise ConfigError(
            f"{source_name(toml_file)}: cannot be validated ({type(exc).__name__}); run with -v for details"
        ) from exc
    return settings
