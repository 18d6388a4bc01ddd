"""The backup component's own configuration: the sections it reads, and nothing else of the agent's.

The composition root projects ``AgentSettings`` onto this once per start or reload; the service, the
scheduler and housekeeping see only this. So the backup code cannot come to depend on the control socket's
or (next) the DR section's settings, and a test builds one without a whole agent configuration.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from kybdr_agent.backup.slots import Slot, planned_slots
from kybdr_agent.config import AgentSettings, BackupSettings, CompressionSettings, DrillSettings, PolicySettings


@dataclass(frozen=True)
class BackupConfig:
    backup: BackupSettings
    compression: CompressionSettings
    drill: DrillSettings
    policies: tuple[PolicySettings, ...]  # the effective ones: the listed policies, or the implicit one
    databases: tuple[str, ...]  # database.databases: backed up on request even when no policy covers them
    maintenance_database: str
    frame_size: int
    encryption_available: bool  # a master key is configured (encryption.key_file)
    sweep_older_than: timedelta
    housekeeping_interval: timedelta
    spool_dir: Path  # restore.spool_dir, resolved (default backup.backup_dir/spool)
    wal_enabled: bool = False  # [wal] enabled: a physical backup is refused without WAL archiving

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> BackupConfig:
        return cls(
            backup=settings.backup,
            compression=settings.compression,
            drill=settings.drill,
            policies=tuple(settings.effective_policies()),
            databases=tuple(settings.database.databases),
            maintenance_database=settings.database.maintenance_database,
            frame_size=settings.encryption.frame_size_kib * 1024,
            encryption_available=settings.encryption.key_file is not None,
            sweep_older_than=settings.daemon.sweep_older_than,
            housekeeping_interval=settings.daemon.housekeeping_interval,
            spool_dir=settings.restore_spool_dir(),
            wal_enabled=settings.wal.enabled,
        )

    def slots(self) -> list[Slot]:
        return planned_slots(self.backup.enabled, self.policies, self.drill)

    def covered_databases(self) -> list[str]:
        """Databases the policies (or ``database.databases``) cover, in configuration order."""
        seen: dict[str, None] = {}
        for policy in self.policies:
            for database in policy.databases:
                seen.setdefault(database, None)
        for database in self.databases:
            seen.setdefault(database, None)
        return list(seen)

    def policies_by_database(self) -> dict[str, list[PolicySettings]]:
        covered: dict[str, list[PolicySettings]] = defaultdict(list)
        for policy in self.policies:
            for database in policy.databases:
                covered[database].append(policy)
        return covered
