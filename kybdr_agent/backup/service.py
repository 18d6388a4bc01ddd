"""The backup service: every backup operation the CLI and the control API offer, in one place.

Both the one-shot CLI and the daemon's jobs call these methods, so a backup made through the API and one
made from a shell are the same code path. Each operation opens the repository for its own duration; a
configuration reload therefore only swaps the settings the next operation sees.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from kybdr_agent import wiring
from kybdr_agent.backup import catalog
from kybdr_agent.backup.drill import drill_one
from kybdr_agent.backup.lease import hold_lease, pid_alive, this_process
from kybdr_agent.backup.manifest import Manifest, database_key, manifest_key_path
from kybdr_agent.backup.pipeline import BackupProgress, backup_and_record
from kybdr_agent.backup.restore import Notice, RestoreResult, check_user_target, restore_backup
from kybdr_agent.backup.retention import BackupRecord, RetentionPolicy, decide
from kybdr_agent.backup.scratch import ScratchSweep, sweep_scratch
from kybdr_agent.backup.streamfmt import Compression
from kybdr_agent.backup.sweep import sweep_repository
from kybdr_agent.backup.verify import Level, ValidationResult, validate_backup
from kybdr_agent.config import AgentSettings, PolicySettings
from kybdr_agent.errors import ConfigError, KybdrError
from kybdr_agent.journal import Journal
from kybdr_agent.postgres.connection import Connection, database_errors
from kybdr_agent.storage.base import BlobStore


@dataclass(frozen=True)
class BackupOverrides:
    """Per-request switches of the seed's POST /v1/backup body; None means "as configured"."""

    compression: bool | None = None
    encryption: bool | None = None
    cross_region: bool | None = None
    description: str | None = None
    labels: tuple[str, ...] = ()


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


async def _check_size(store: BlobStore, key: str, size: int) -> None:
    info = await store.stat(key)
    if info is None or info.size != size:
        raise KybdrError(f"the copy of {key} has {info.size if info else 'no'} bytes, expected {size}")


def _age_only(records: list[BackupRecord], max_age: timedelta, now: datetime) -> set[str]:
    kept = {r.id for r in records if now - r.finished_at <= max_age}
    valid = [r for r in records if r.valid]
    if valid:
        kept.add(max(valid, key=lambda r: r.finished_at).id)  # never the newest valid backup
    return kept


class BackupService:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        journal: Journal | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.journal = journal
        self._now = now

    # --- which databases --------------------------------------------------------------------

    def covered_databases(self) -> list[str]:
        """Databases the policies (or ``database.databases``) cover, in configuration order."""
        seen: dict[str, None] = {}
        for policy in self.settings.effective_policies():
            for database in policy.databases:
                seen.setdefault(database, None)
        for database in self.settings.database.databases:
            seen.setdefault(database, None)
        return list(seen)

    # --- backup ---------------------------------------------------------------------------

    async def backup(
        self, database: str, overrides: BackupOverrides = BackupOverrides(), progress: BackupProgress | None = None
    ) -> Manifest:
        options = wiring.backup_options(self.settings, description=overrides.description)
        if overrides.compression is False:
            options = replace(options, compression=Compression.NONE)
        elif overrides.compression and options.compression is Compression.NONE:
            options = replace(options, compression=Compression[self.settings.compression.algorithm.upper()])
        if overrides.encryption is False:
            options = replace(options, keyring=None)
        elif overrides.encryption and options.keyring is None:
            keys = wiring.keyring(self.settings)
            if keys is None:
                raise ConfigError("encryption was requested but encryption.key_file is not set")
            options = replace(options, keyring=keys)
        options = replace(options, labels=overrides.labels, progress=progress)
        cross_region = self.settings.backup.cross_region if overrides.cross_region is None else overrides.cross_region
        if cross_region and not self.settings.backup.cross_region:
            raise ConfigError("a cross-region copy was requested but backup.cross_region is not enabled")
        async with wiring.open_store(self.settings.repository) as store:
            made = await backup_and_record(
                database, connection=wiring.connection(self.settings), store=store, options=options
            )
            if cross_region:
                made = await self._copy_to_dr(store, made)
            return made

    async def _copy_to_dr(self, store: BlobStore, made: Manifest) -> Manifest:
        """Copy data, then the manifest (with the replication record) to the DR bucket, then record it here.

        The backup itself is complete before this starts; if the copy fails the error says so, the DR
        bucket keeps no data without a manifest, and the primary manifest stays as it was.
        """
        from kybdr_agent.storage.s3 import S3Store

        assert isinstance(store, S3Store)
        started = time.monotonic()
        key = manifest_key_path(made.database, made.id)
        async with wiring.open_cross_region_store(self.settings) as dr:
            try:
                await dr.copy_from(store, made.object_key, made.stored_bytes)
                await _check_size(dr, made.object_key, made.stored_bytes)
                record = {
                    "bucket": dr.options.bucket,
                    "region": dr.options.region or "",
                    "copied_at": self._now().isoformat(),
                    "seconds": f"{time.monotonic() - started:.3f}",
                }
                replicated = made.model_copy(update={"replication": {**made.replication, "cross_region": record}})
                await dr.put_bytes(key, replicated.to_json())
            except BaseException as exc:
                with anyio.move_on_after(60, shield=True):
                    await dr.delete(made.object_key)
                if isinstance(exc, KybdrError):
                    raise KybdrError(
                        f"backup {made.id} is stored in the primary repository, but its cross-region copy failed: {exc}"
                    ) from exc
                raise
        await store.put_bytes(key, replicated.to_json())
        return replicated

    # --- reading the repository ---------------------------------------------------------------

    async def catalog(self, database: str | None = None) -> catalog.Catalog:
        async with wiring.open_store(self.settings.repository) as store:
            return await catalog.read_catalog(store, database)

    async def find(self, backup_id: str) -> Manifest:
        async with wiring.open_store(self.settings.repository) as store:
            return await catalog.find_backup(store, backup_id)

    # --- restore and validation ---------------------------------------------------------------

    async def restore(
        self,
        backup_id: str,
        target: str,
        *,
        force: bool = False,
        no_owner: bool = False,
        notice: Notice | None = None,
    ) -> RestoreResult:
        check_user_target(target)
        async with wiring.open_store(self.settings.repository) as store:
            found = await catalog.find_backup(store, backup_id)
            return await restore_backup(
                found,
                store=store,
                keyring=wiring.keyring(self.settings),
                connection=wiring.connection(self.settings),
                maintenance_database=self.settings.database.maintenance_database,
                target=target,
                force=force,
                no_owner=no_owner,
                notice=notice or (lambda _message: None),
            )

    async def validate(self, backup_id: str, level: Level) -> ValidationResult:
        async with wiring.open_store(self.settings.repository) as store:
            found = await catalog.find_backup(store, backup_id)
            return await validate_backup(
                found,
                store=store,
                keyring=wiring.keyring(self.settings),
                connection=wiring.connection(self.settings),
                level=level,
            )

    def record(self, kind: str, status: str, result: Any, error: str | None = None) -> None:
        """Journal an outcome of work done outside the daemon's job manager (one-shot CLI commands)."""
        if self.journal is not None:
            self.journal.append(
                {
                    "kind": kind,
                    "status": status,
                    "result": result,
                    "error": error,
                    "finished_at": self._now().isoformat(),
                    "via": "cli",
                }
            )

    # --- restore drills -----------------------------------------------------------------------

    def _drill_connection(self) -> Connection:
        drill = self.settings.drill
        if drill.dsn is None:
            return wiring.connection(self.settings)
        db = self.settings.database
        return Connection.from_settings(drill.dsn, drill.password_file, db.pg_bin_dir, db.connect_timeout_seconds)

    async def drill(self, database: str | None = None) -> list[dict[str, Any]]:
        """Restore the newest backup of each database into a scratch database, compare, drop it."""
        connection = self._drill_connection()
        maintenance = self.settings.database.maintenance_database
        results: list[dict[str, Any]] = []
        async with wiring.open_store(self.settings.repository) as store:
            found = await catalog.read_catalog(store, database)
            newest: dict[str, Manifest] = {}
            for m in found.backups:
                newest[m.database] = m
            if database is not None and database not in newest:
                raise KybdrError(f"no backup of database {database!r} to drill")
            if not newest:
                raise KybdrError("the repository holds no backups to drill")
            keys = wiring.keyring(self.settings)
            for m in newest.values():
                results.append(await drill_one(store, connection, maintenance, keys, m))
        return results

    # --- retention ----------------------------------------------------------------------------

    def _invalid_ids(self) -> set[str]:
        """Backups whose latest conclusive full validation found them corrupt (from the journal).

        A validation that could not be done (no key, no usable pg_restore) says nothing about the backup
        and is ignored: otherwise a key rotation without old_key_files would make every backup "invalid"
        and retention would keep none of them as the newest valid one.
        """
        corrupt: dict[str, bool] = {}
        if self.journal is not None:
            for record in self.journal.records("validate"):
                result = record.get("result") or {}
                if not isinstance(result, dict) or result.get("level") != "full" or not result.get("backup_id"):
                    continue
                if result.get("ok"):
                    corrupt[str(result["backup_id"])] = False
                elif result.get("corrupt"):
                    corrupt[str(result["backup_id"])] = True
        return {backup_id for backup_id, bad in corrupt.items() if bad}

    def _policies_by_database(self) -> dict[str, list[PolicySettings]]:
        covered: dict[str, list[PolicySettings]] = defaultdict(list)
        for policy in self.settings.effective_policies():
            for database in policy.databases:
                covered[database].append(policy)
        return covered

    def retention_plan(
        self, backups: list[Manifest], now: datetime, invalid: set[str] | None = None
    ) -> tuple[set[str], set[str], dict[str, str]]:
        """Kept if any policy covering the database keeps it; uncovered databases only age out.

        A backup labelled with a policy this agent does not have was made by another agent sharing the
        repository (or under a policy since renamed): this agent's policies do not judge it, only age does,
        so two agents on one repository never delete what the other's policies keep.
        """
        invalid = self._invalid_ids() if invalid is None else invalid
        own = {p.name for p in self.settings.effective_policies()} | {"manual", "scheduled"}
        by_db: dict[str, list[BackupRecord]] = defaultdict(list)
        foreign: dict[str, list[BackupRecord]] = defaultdict(list)
        for m in backups:
            record = BackupRecord(m.id, m.database, m.finished_at, m.id not in invalid)
            (foreign if m.labels and not own & set(m.labels) else by_db)[m.database].append(record)
        covered = self._policies_by_database()
        default_max = timedelta(days=self.settings.backup.retention_days)
        keep: set[str] = set()
        reasons: dict[str, list[str]] = defaultdict(list)
        age_only = list(foreign.values()) + [records for db, records in by_db.items() if not covered.get(db)]
        for records in age_only:
            # Backups no policy of this agent judges (made by hand, or by another agent): only age removes them.
            kept = _age_only(records, default_max, now)
            keep |= kept
            for r in records:
                reasons[r.id].append(f"younger than {default_max.days} days" if r.id in kept else "older than max_age")
        for db, records in by_db.items():
            policies = covered.get(db, [])
            if not policies:
                continue
            for p in policies:
                policy = RetentionPolicy(
                    keep_daily=p.keep_daily,
                    keep_weekly=p.keep_weekly,
                    keep_monthly=p.keep_monthly,
                    keep_yearly=p.keep_yearly,
                    min_age=p.min_age,
                    max_age=p.max_age,
                    timezone=p.timezone,
                )
                decision = decide(records, policy, now)
                keep |= decision.keep
                for backup_id, why in decision.reasons.items():
                    reasons[backup_id].append(f"{p.name}: {why}")
        all_ids = {m.id for m in backups}
        delete = all_ids - keep
        return keep, delete, {k: "; ".join(dict.fromkeys(v)) for k, v in reasons.items()}

    async def cleanup(self, *, dry_run: bool) -> dict[str, Any]:
        now = self._now()
        async with wiring.open_store(self.settings.repository) as store:
            found = await catalog.read_catalog(store)
            invalid = await anyio.to_thread.run_sync(self._invalid_ids)  # the journal is read off the loop
            keep, delete, reasons = self.retention_plan(found.backups, now, invalid)
            by_id = {m.id: m for m in found.backups}
            deleted: list[str] = []
            if not dry_run:
                for backup_id in sorted(delete):
                    m = by_id[backup_id]
                    # Manifest first: a half-deleted backup must never be listed as good. Under a lease,
                    # so that if this process dies between the two, the next sweep removes the data at once.
                    async with hold_lease(store, m.database, m.id, now=self._now):
                        await store.delete(manifest_key_path(m.database, m.id))
                        await store.delete(m.object_key)
                    deleted.append(backup_id)
        return {
            "dry_run": dry_run,
            "kept": sorted(keep),
            "deleted": deleted,
            "would_delete": sorted(delete) if dry_run else [],
            "reasons": {backup_id: reasons.get(backup_id, "") for backup_id in sorted(keep | delete)},
            "freed_bytes": sum(by_id[i].stored_bytes for i in delete),
        }

    # --- housekeeping -------------------------------------------------------------------------

    async def sweep(
        self, older_than: timedelta, busy_databases: frozenset[str] = frozenset(), *, databases: bool = False
    ) -> dict[str, Any]:
        """Remove what dead backups left in the repository (and, with ``databases``, dead scratch databases).

        Whether a leftover is dead is decided by its lease (``sweep.py``), not its age: a killed backup's
        remains go at once, a running one's are never touched, wherever it runs. ``older_than`` is only the
        grace for leftovers that carry no lease at all. ``busy_databases`` (this agent's running backups)
        are skipped outright, as a second line of defence.
        """
        busy_prefixes = tuple(f"backups/{database_key(db)}/" for db in busy_databases)
        async with wiring.open_store(self.settings.repository) as store:
            report = await sweep_repository(
                store,
                now=self._now(),
                grace=older_than,
                here=this_process(),
                pid_alive=pid_alive,
                skip=lambda prefix: (prefix + "/").startswith(busy_prefixes),
            )
        swept: dict[str, Any] = report.as_dict()
        if databases:
            swept.update(await self.sweep_scratch())
        return swept

    async def sweep_scratch(self) -> dict[str, Any]:
        """Drop scratch databases no restore or drill holds, on the database server and the drill server."""
        merged = ScratchSweep()
        seen: set[str] = set()
        for connection in (wiring.connection(self.settings), self._drill_connection()):
            if connection.describe() in seen:
                continue
            seen.add(connection.describe())
            async with connection.connect(self.settings.database.maintenance_database) as admin:
                with database_errors("sweeping scratch databases"):
                    found = await sweep_scratch(admin)
            merged.dropped += found.dropped
            merged.in_use += found.in_use
            merged.failed.update(found.failed)
        return merged.as_dict()

    # --- statistics ---------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """Statistics built from scratch: the catalog, and every outcome the journal remembers.

        Right for a one-shot CLI; the daemon answers from memory instead (``backup.stats.DaemonStats``), and
        both render through ``render_stats``, so the document is the same either way."""
        from kybdr_agent.backup.stats import OutcomeTally, render_stats  # here: that module imports this one

        now = self._now()
        found = await self.catalog()
        tally = await anyio.to_thread.run_sync(OutcomeTally.from_journal, self.journal)  # off the loop
        return render_stats(found, tally, now)
