"""The backup service: every backup operation the CLI, the control API and the scheduler offer, in one place.

It is handed what it uses — the repository store (and the DR region's, when copies are configured), how to
reach the database and the drill server, the key ring, the journal, the event hub and the clock — by the
composition root (``kybdr_agent.app``), and reads only its own configuration (``BackupConfig``). It never
picks an implementation: a test gives it a folder store and a throwaway cluster, the daemon an S3 store.
A configuration reload builds a new service; jobs already running finish with the one they started with.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import anyio

from kybdr_agent.backup import catalog, region_listing
from kybdr_agent.backup.contents import backup_contents
from kybdr_agent.backup.contents_doc import Contents
from kybdr_agent.backup.copies import copy_to_dr, stored_objects
from kybdr_agent.backup.drill import drill_one
from kybdr_agent.backup.freshness import BackupSeen, DatabaseFreshness, ScheduleWindow, assess
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.lease import hold_lease, pid_alive, this_process
from kybdr_agent.backup.manifest import CLUSTER_PREFIX, Manifest, database_key, is_cluster_database, manifest_key_path
from kybdr_agent.backup.physical import PHYSICAL_JOB_DATABASE, WAL_WAIT_SECONDS, physical_backup_and_record
from kybdr_agent.backup.physical_manifest import physical_info
from kybdr_agent.backup.physical_retention import merged, physical_retention_plan
from kybdr_agent.backup.pipeline import BackupOptions, backup_and_record
from kybdr_agent.backup.pump import BackupProgress
from kybdr_agent.backup.regions import (
    NOT_REQUESTED,
    Located,
    Region,
    RegionStores,
    backfill_candidates,
    manifest_ids,
)
from kybdr_agent.backup.restore import Notice, RestoreResult, check_user_target, restore_backup
from kybdr_agent.backup.retention_plan import RetentionPlan, retention_plan
from kybdr_agent.backup.scratch import ScratchSweep, sweep_scratch
from kybdr_agent.backup.selection import Selection, selective_request
from kybdr_agent.backup.selective import SelectiveRun, restore_selection
from kybdr_agent.backup.selective_existing import restore_into_existing
from kybdr_agent.backup.settings import BackupConfig
from kybdr_agent.backup.streamfmt import Compression
from kybdr_agent.backup.sweep import sweep_repository
from kybdr_agent.backup.verify import Level, ValidationResult, validate_backup
from kybdr_agent.clock import Clock, utc_now
from kybdr_agent.errors import ConfigError, KybdrError
from kybdr_agent.events import (
    BackupCompleted,
    BackupFailed,
    DrillResult,
    EventHub,
    Freshness,
    FreshnessChecked,
    ReplicaCopyFailed,
    RepositorySpace,
    RetentionDeleted,
    ValidationVerdict,
)
from kybdr_agent.journal import Journal
from kybdr_agent.postgres.connection import Connection, database_errors
from kybdr_agent.storage.base import BlobStore, ReplicaStore
from kybdr_agent.telemetry.tracing import stage
from kybdr_agent.wal.archive import WalArchive
from kybdr_agent.wal.pitr_drill import DrillOptions, pitr_drill
from kybdr_agent.wal.retention_run import apply_wal_retention_all
from kybdr_agent.wal.window_report import cluster_windows

BACKFILL_LIMIT: Final = 20  # backups copied per pass: a pass after a long outage still ends


@dataclass(frozen=True)
class BackupOverrides:
    """Per-request switches of the seed's POST /v1/backup body; None means "as configured"."""

    compression: bool | None = None
    encryption: bool | None = None
    cross_region: bool | None = None
    description: str | None = None
    labels: tuple[str, ...] = ()


class BackupService:
    def __init__(
        self,
        config: BackupConfig,
        *,
        store: BlobStore,
        connection: Connection,
        drill_connection: Connection | None = None,
        keyring: KeyRing | None = None,
        replica: ReplicaStore | None = None,
        journal: Journal | None = None,
        events: EventHub | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.config = config
        self.store = store
        self.connection = connection
        self.drill_connection = drill_connection or connection
        self.keyring = keyring
        self.replica = replica
        self.regions = RegionStores(store, replica)
        self._backfilling = anyio.Lock()
        self.journal = journal
        self.events = events or EventHub()
        self._now = clock

    def covered_databases(self) -> list[str]:
        return self.config.covered_databases()

    # --- backup ---------------------------------------------------------------------------

    def backup_options(self, overrides: BackupOverrides, progress: BackupProgress | None = None) -> BackupOptions:
        """What this backup will be: the configuration, with the request's switches applied."""
        config = self.config
        configured = Compression[config.compression.algorithm.upper()]
        compress = config.backup.compression if overrides.compression is None else overrides.compression
        encrypt = config.backup.encryption if overrides.encryption is None else overrides.encryption
        if encrypt and self.keyring is None:
            raise ConfigError("encryption was requested but encryption.key_file is not set")
        return BackupOptions(
            compression=configured if compress else Compression.NONE,
            compression_level=config.compression.level,
            compression_threads=config.compression.threads,
            keyring=self.keyring if encrypt else None,
            frame_size=config.frame_size,
            description=overrides.description,
            labels=overrides.labels,
            progress=progress,
        )

    async def backup(
        self, database: str, overrides: BackupOverrides = BackupOverrides(), progress: BackupProgress | None = None
    ) -> Manifest:
        if is_cluster_database(database):
            raise ConfigError(
                f"database names starting with {CLUSTER_PREFIX!r} are reserved for physical backups' clusters"
            )
        options, cross_region = self._copy_choice(self.backup_options(overrides, progress), overrides)
        started = time.monotonic()
        try:
            made = await backup_and_record(
                database, connection=self.connection, store=self.store, options=options, now=self._now
            )
            if cross_region:
                assert self.replica is not None
                made = await self._copy_to_dr(self.replica, made)
        except Exception as exc:
            self.events.publish(BackupFailed(database, str(exc), time.monotonic() - started, self._now()))
            raise
        self._completed(made, started)
        return made

    async def backup_physical(
        self, overrides: BackupOverrides = BackupOverrides(), progress: BackupProgress | None = None
    ) -> Manifest:
        """A base backup of the whole cluster the DSN reaches (``physical.py``), recorded once its WAL is archived."""
        options, cross_region = self._copy_choice(self.backup_options(overrides, progress), overrides)
        started = time.monotonic()
        try:
            made = await physical_backup_and_record(
                connection=self.connection,
                maintenance_database=self.config.maintenance_database,
                store=self.store,
                options=options,
                archive_for=self.wal_archive,
                wal_enabled=self.config.wal_enabled,
                wal_wait=WAL_WAIT_SECONDS,
                now=self._now,
            )
            if cross_region:
                assert self.replica is not None
                made = await self._copy_to_dr(self.replica, made)
        except Exception as exc:
            self.events.publish(BackupFailed(PHYSICAL_JOB_DATABASE, str(exc), time.monotonic() - started, self._now()))
            raise
        self._completed(made, started)
        return made

    def _copy_choice(self, options: BackupOptions, overrides: BackupOverrides) -> tuple[BackupOptions, bool]:
        """Whether this backup is copied to the DR region; one asked not to be is marked so a backfill skips it."""
        wanted = self.config.backup.cross_region
        cross_region = wanted if overrides.cross_region is None else overrides.cross_region
        if cross_region and (not wanted or self.replica is None):
            raise ConfigError("a cross-region copy was requested but backup.cross_region is not enabled")
        if wanted and not cross_region:  # asked not to be copied: a backfill pass must respect that
            options = dataclasses.replace(options, replication=(("cross_region", (("status", NOT_REQUESTED),)),))
        return options, cross_region

    def _completed(self, made: Manifest, started: float) -> None:
        self.events.publish(
            BackupCompleted(
                database=made.database,
                backup_id=made.id,
                finished_at=made.finished_at,
                seconds=time.monotonic() - started,
                dump_bytes=made.dump_bytes,
                stored_bytes=made.stored_bytes,
                labels=tuple(made.labels),
            )
        )

    def wal_archive(self, system_identifier: str, segment_size: int) -> WalArchive:
        """The WAL archive of a cluster in this service's repository, sealed as configured."""
        return self._archive_on(self.store, system_identifier, segment_size)

    def _archives_on(self, store: BlobStore) -> Callable[[Manifest], WalArchive]:
        """A physical backup's WAL archive, in the same region's repository as the backup."""

        def archive(m: Manifest) -> WalArchive:
            info = physical_info(m)
            return self._archive_on(store, info.system_identifier, info.wal_segment_size)

        return archive

    def _archive_on(self, store: BlobStore, system_identifier: str, segment_size: int) -> WalArchive:
        return WalArchive(
            store,
            system_identifier=system_identifier,
            segment_size=segment_size,
            keyring=self.keyring,
            compression=Compression[self.config.compression.algorithm.upper()],
            compression_level=self.config.compression.level,
            frame_size=self.config.frame_size,
        )

    async def _copy_to_dr(self, replica: ReplicaStore, made: Manifest) -> Manifest:
        try:
            return await copy_to_dr(self.store, replica, made, now=self._now)
        except Exception as exc:
            self.events.publish(ReplicaCopyFailed(made.database, made.id, str(exc), self._now()))
            raise

    # --- reading the repository ---------------------------------------------------------------

    async def catalog(self, database: str | None = None) -> catalog.Catalog:
        return await catalog.read_catalog(self.store, database)

    async def find(self, backup_id: str, region: Region | None = None) -> Manifest:
        return (await self.locate(backup_id, region)).manifest

    async def locate(self, backup_id: str, region: Region | None = None) -> Located:
        """The backup in ``region``; with none, the primary's, else the DR region's copy (``regions.py``)."""
        return await self.regions.locate(backup_id, region)

    async def show(self, backup_id: str, region: Region | None = None) -> dict[str, Any]:
        """One backup's manifest document, with the regions that hold it and how it was found."""
        return await region_listing.show_backup(self.regions, backup_id, region)

    async def list_backups(self, database: str | None = None, region: Region | None = None) -> dict[str, Any]:
        """The backups (of ``database``) with where each lives (``region_listing.list_backups``), and for each
        cluster with a physical backup its recoverable window (``wal.window_report``), read from the region
        listed (the primary unless ``region`` is dr)."""
        listed = await region_listing.list_backups(self.regions, database, region)
        store = self.regions.store(region or "primary")
        physical = [
            Manifest.model_validate({k: v for k, v in b.items() if k not in ("part_count", "locations")})
            for b in listed["backups"]
            if b.get("kind") == "physical"
        ]
        listed["recovery_windows"] = await cluster_windows(
            physical, lambda system_identifier, size: self._archive_on(store, system_identifier, size)
        )
        return listed

    # --- restore and validation ---------------------------------------------------------------

    async def restore(
        self,
        backup_id: str,
        target: str,
        *,
        force: bool = False,
        no_owner: bool = False,
        with_globals: bool = False,
        jobs: int = 1,
        spool_dir: Path | None = None,
        notice: Notice | None = None,
        region: Region | None = None,
        selection: Selection | None = None,
        into_existing: bool = False,
        rename_to: str | None = None,
    ) -> RestoreResult:
        """``jobs`` > 1: ``pg_restore -j jobs`` from a spool file in ``spool_dir`` (default: the
        ``restore.spool_dir`` the caller resolved, else ``backup.backup_dir/spool``). ``region`` None reads
        the primary repository, or the DR region's copy when the primary cannot be read (said in a notice).
        ``selection`` (from ``selection.selective_request``, which checked the switches go together): only those
        tables or schemas, into a new database — or, ``into_existing``, the one table added to the existing
        database ``target`` as ``rename_to``."""
        check_user_target(target)
        # Checked here too, for any caller: into_existing without a table must never become a whole restore.
        selection = selective_request(
            selection.tables if selection else (),
            selection.schemas if selection else (),
            into_existing=into_existing,
            rename_to=rename_to,
            force=force,
            jobs=jobs,
        )
        located = await self.locate(backup_id, region)
        found = located.manifest
        _logical_only(found, "restored into a database")
        tell = notice or (lambda _message: None)
        if located.note:
            tell(located.note)
        with stage("restore", backup_id=found.id, database=found.database, target=target, region=located.region):
            result: RestoreResult
            if selection is None:
                result = await restore_backup(
                    found,
                    store=located.store,
                    keyring=self.keyring,
                    connection=self.connection,
                    maintenance_database=self.config.maintenance_database,
                    target=target,
                    force=force,
                    no_owner=no_owner,
                    with_globals=with_globals,
                    jobs=jobs,
                    spool_dir=spool_dir or self.config.spool_dir,
                    notice=tell,
                )
            else:
                run = SelectiveRun(
                    found,
                    located.store,
                    self.keyring,
                    self.connection,
                    self.config.maintenance_database,
                    no_owner=no_owner,
                    with_globals=with_globals,
                    notice=tell,
                )
                if rename_to is not None:  # into_existing: selective_request made sure
                    result = await restore_into_existing(run, selection, target, rename_to)
                else:
                    result = await restore_selection(run, selection, target)
        notices = [located.note, *result.notices] if located.note else result.notices
        return dataclasses.replace(result, region=located.region, notices=notices)

    async def contents(self, backup_id: str, region: Region | None = None) -> Contents:
        """What the backup holds (schemas, tables with sizes and rows, other objects), read from its archive
        streamed and verified to the end; ``.as_dict()`` is the API document."""
        located = await self.locate(backup_id, region)
        found = located.manifest
        _logical_only(found, "listed table by table")
        with stage("contents", backup_id=found.id, database=found.database, region=located.region):
            return await backup_contents(found, located.store, self.keyring)

    async def validate(self, backup_id: str, level: Level, region: Region | None = None) -> ValidationResult:
        located = await self.locate(backup_id, region)
        found = located.manifest
        with stage("validate", backup_id=found.id, database=found.database, level=level, region=located.region) as span:
            result = await validate_backup(
                found,
                store=located.store,
                keyring=self.keyring,
                connection=self.connection,
                level=level,
                # WAL is archived to the primary repository only: a DR copy is validated without it.
                wal_archive=self._archives_on(located.store) if located.region == "primary" else None,
            )
            span.set_attribute("kybdr.ok", result.ok)
        notices = [located.note, *result.notices] if located.note else result.notices
        result = dataclasses.replace(result, region=located.region, notices=notices)
        self.events.publish(ValidationVerdict(found.id, found.database, level, result.ok, result.corrupt, result.error))
        return result

    # --- restore drills -----------------------------------------------------------------------

    async def drill(self, database: str | None = None) -> list[dict[str, Any]]:
        """Restore the newest backup of each database into a scratch database, compare, drop it; a cluster's
        newest physical backup is drilled by a point-in-time restore into a scratch data directory
        (``wal/pitr_drill.py``), with its RTO measured."""
        found = await catalog.read_catalog(self.store, database)
        newest: dict[str, Manifest] = {}
        for m in found.backups:  # oldest first: the last one of each database (or cluster) is its newest
            newest[m.database] = m
        if database is not None and database not in newest:
            raise KybdrError(f"no backup of database {database!r} to drill")
        if not newest:
            raise KybdrError("the repository holds no backups to drill")
        results: list[dict[str, Any]] = []
        for m in newest.values():
            with stage("drill", backup_id=m.id, database=m.database) as span:
                if m.kind == "physical":
                    result = await pitr_drill(
                        self.store, found.backups, self.keyring, self.wal_archive, m, self._pitr_drill_options()
                    )
                else:
                    result = await drill_one(
                        self.store, self.drill_connection, self.config.maintenance_database, self.keyring, m
                    )
                span.set_attribute("kybdr.passed", bool(result.get("passed")))
            self.events.publish(
                DrillResult(
                    database=m.database,
                    backup_id=m.id,
                    passed=bool(result.get("passed")),
                    seconds=result.get("seconds"),
                    error=result.get("error"),
                )
            )
            results.append(result)
        return results

    def _pitr_drill_options(self) -> DrillOptions:
        """A physical drill's scratch directory under backup_dir; the check connects as the agent's role (over
        the drill's own socket, trust: a copy of the cluster has that role), else as ``postgres``."""
        return DrillOptions(
            scratch_root=self.config.backup.backup_dir / "drills",
            user=self.connection.params.get("user") or "postgres",
            database=self.config.maintenance_database,
            pg_bin_dir=self.connection.bin_dir,
        )

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

    def retention_plan(self, backups: list[Manifest], invalid: set[str] | None = None) -> RetentionPlan:
        """Logical backups by the policies that list their database, physical ones by the physical policies, per
        cluster (``physical_retention``)."""
        invalid = self._invalid_ids() if invalid is None else invalid
        now = self._now()
        logical = retention_plan(self.config, [m for m in backups if m.kind == "logical"], now, invalid)
        default_max = timedelta(days=self.config.backup.retention_days)
        return merged(logical, physical_retention_plan(self.config.policies, backups, now, invalid, default_max))

    async def cleanup(self, *, dry_run: bool) -> dict[str, Any]:
        """Apply the retention policies to the primary repository and, when copies are made, to the DR bucket.

        Each region's plan is made from what that region holds, with the same policies: the DR bucket keeps
        its own newest copies even when an outage left some backups uncopied. The primary must be readable;
        a DR bucket that cannot be read is reported (``dr.error``) and cleaned on the next run."""
        invalid = await anyio.to_thread.run_sync(self._invalid_ids)  # the journal is read off the loop
        result = await self._cleanup_region(self.store, invalid, dry_run=dry_run)
        if self.replica is not None:
            try:
                dr: dict[str, Any] = await self._cleanup_region(self.replica, invalid, dry_run=dry_run)
                dr["error"] = None
            except KybdrError as exc:
                dr = {"error": f"the DR region's bucket was not cleaned: {exc}", "deleted": [], "would_delete": []}
            result["dr"] = dr
        return result

    async def _cleanup_region(self, store: BlobStore, invalid: set[str], *, dry_run: bool) -> dict[str, Any]:
        found = await catalog.read_catalog(store)
        plan = self.retention_plan(found.backups, invalid)
        by_id = {m.id: m for m in found.backups}
        deleted: list[str] = []
        if not dry_run:
            for backup_id in sorted(plan.delete):
                m = by_id[backup_id]
                # Manifest first: a half-deleted backup must never be listed as good. Under a lease, so
                # that if this process dies between the two, the next sweep removes the data at once.
                async with hold_lease(store, m.database, m.id, now=self._now):
                    await store.delete(manifest_key_path(m.database, m.id))
                    for object_key, _size in stored_objects(m):
                        await store.delete(object_key)
                deleted.append(backup_id)
                if store is self.store:
                    self.events.publish(RetentionDeleted(m.database, m.id, m.stored_bytes))
        # Then the WAL only the dropped base backups needed (after them: a kept backup never lacks its WAL).
        wal = await apply_wal_retention_all(
            found.backups,
            plan.keep,
            lambda system_identifier, size: self._archive_on(store, system_identifier, size),
            dry_run=dry_run,
            unreadable_manifests=[key for key, _why in found.unreadable],
        )
        return {
            "dry_run": dry_run,
            "kept": sorted(plan.keep),
            "deleted": deleted,
            "would_delete": sorted(plan.delete) if dry_run else [],
            "reasons": {backup_id: plan.reasons.get(backup_id, "") for backup_id in sorted(plan.keep | plan.delete)},
            "freed_bytes": sum(by_id[i].stored_bytes for i in plan.delete),
            "wal": wal,
        }

    # --- cross-region backfill ----------------------------------------------------------------

    async def backfill(
        self, *, limit: int = BACKFILL_LIMIT, skip_databases: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """Copy to the DR bucket the backups an outage left uncopied (``regions.backfill_candidates``).

        Newest first, at most ``limit`` per pass, and the pass stops at the first failure: the DR region is
        most likely still down, and the next pass (housekeeping's next tick) tries again. ``skip_databases``
        have a backup running, which copies itself."""
        if self.replica is None or not self.config.backup.cross_region:
            raise ConfigError("a backfill needs cross-region copies: set backup.cross_region and cross_region_bucket")
        async with self._backfilling:  # housekeeping's pass and a requested one never copy the same backup
            primary = await catalog.read_catalog(self.store)
            in_dr = await manifest_ids(self.replica)
            physical_busy = PHYSICAL_JOB_DATABASE in skip_databases  # it copies itself once recorded
            backups = [
                m
                for m in primary.backups
                if m.database not in skip_databases and not (physical_busy and m.kind == "physical")
            ]
            return await self._backfill(self.replica, backfill_candidates(backups, in_dr, len(backups)), limit)

    async def _backfill(self, replica: ReplicaStore, missing: list[Manifest], limit: int) -> dict[str, Any]:
        copied: list[str] = []
        failed: dict[str, str] = {}
        for m in missing[:limit]:
            try:
                await self._copy_to_dr(replica, m)
            except KybdrError as exc:
                failed[m.id] = str(exc)
                break
            copied.append(m.id)
        return {"copied": copied, "failed": failed, "still_missing": len(missing) - len(copied)}

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
        # A running physical backup's job names no cluster: every cluster's folder is left to its lease.
        busy_prefixes = tuple(
            f"backups/{database_key(CLUSTER_PREFIX)}" if db == PHYSICAL_JOB_DATABASE else f"backups/{database_key(db)}/"
            for db in busy_databases
        )
        report = await sweep_repository(
            self.store,
            now=self._now(),
            grace=older_than,
            here=this_process(),
            pid_alive=pid_alive,
            skip=lambda prefix: (prefix + "/").startswith(busy_prefixes),
        )
        swept: dict[str, Any] = report.as_dict()
        if self.replica is not None:
            # Copies write to the DR bucket under a lease too (``_copy_to_dr``), so its leftovers are judged
            # the same way. A DR region that cannot be reached is reported, not fatal to the primary's sweep.
            try:
                dr_report = await sweep_repository(
                    self.replica,
                    now=self._now(),
                    grace=older_than,
                    here=this_process(),
                    pid_alive=pid_alive,
                    skip=lambda prefix: (prefix + "/").startswith(busy_prefixes),
                )
                swept["dr"] = dr_report.as_dict()
            except KybdrError as exc:
                swept["dr"] = {"error": str(exc)}
        if databases:
            swept.update(await self.sweep_scratch())
        return swept

    async def sweep_scratch(self) -> dict[str, Any]:
        """Drop scratch databases no restore or drill holds, on the database server and the drill server."""
        merged = ScratchSweep()
        seen: set[str] = set()
        for connection in (self.connection, self.drill_connection):
            if connection.describe() in seen:
                continue
            seen.add(connection.describe())
            async with connection.connect(self.config.maintenance_database) as admin:
                with database_errors("sweeping scratch databases"):
                    found = await sweep_scratch(admin)
            merged.dropped += found.dropped
            merged.in_use += found.in_use
            merged.failed.update(found.failed)
        return merged.as_dict()

    # --- freshness (housekeeping, ``check``) ----------------------------------------------------

    async def freshness(self, *, max_age: timedelta | None = None) -> list[DatabaseFreshness]:
        """Each covered database's newest good backup against its policies' window (``backup.freshness``).

        Read from the repository, which is the truth after a restart or on a host without a daemon; a
        backup a full validation found corrupt does not count as good."""
        found = await self.catalog()
        invalid = await anyio.to_thread.run_sync(self._invalid_ids)  # reads the journal: off the loop
        by_database = self.config.policies_by_database()
        covered = {
            database: [
                ScheduleWindow(
                    schedule=p.schedule,
                    tz=ZoneInfo(p.timezone),
                    jitter=timedelta(seconds=p.jitter_seconds),
                    stale_after=p.stale_after,
                )
                for p in by_database.get(database, [])
            ]
            for database in self.covered_databases()
        }
        seen = [BackupSeen(m.database, m.id, m.finished_at, m.id not in invalid) for m in found.backups]
        return assess(covered, seen, self._now(), max_age=max_age)

    async def observe(self) -> None:
        """Housekeeping's report: freshness of every covered database, and a folder repository's free space,
        published as events for metrics, CloudWatch and alerts. Nothing is published when backups are off."""
        if not self.config.backup.enabled:
            return
        now = self._now()
        fresh = await self.freshness()
        self.events.publish(
            FreshnessChecked(
                now,
                tuple(
                    Freshness(
                        database=f.database,
                        newest_good_at=f.newest_good_at,
                        newest_backup_id=f.newest_backup_id,
                        age_seconds=None if f.age is None else f.age.total_seconds(),
                        window_seconds=f.window.total_seconds(),
                        stale=f.stale,
                    )
                    for f in fresh
                ),
            )
        )
        measure = getattr(self.store, "space", None)  # a folder repository measures its filesystem
        space = await measure() if measure is not None else None
        if space is not None:
            free, total = space
            self.events.publish(RepositorySpace(now, self.store.describe(), free, total))

    # --- statistics ---------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """Statistics built from scratch: the catalog, and every outcome the journal remembers.

        Right for a one-shot CLI; the daemon answers from memory instead (``backup.stats.DaemonStats``), and
        both render through ``render_stats``, so the document is the same either way."""
        from kybdr_agent.backup.stats import OutcomeTally, render_stats  # here: that module imports this one

        found = await self.catalog()
        tally = await anyio.to_thread.run_sync(OutcomeTally.from_journal, self.journal)  # off the loop
        return render_stats(found, tally, self._now())


def _logical_only(found: Manifest, what: str) -> None:
    if found.kind == "physical":
        raise KybdrError(
            f"backup {found.id} is a physical base backup of the whole cluster; it cannot be {what}: "
            "restore it with kybdr-agent restore --physical"
        )
