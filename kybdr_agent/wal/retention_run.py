"""WAL retention applied to a repository: the pure plan (``wal/retention.py``) over what the archive holds, and
the deletes it calls for, per cluster.

**Inputs.** The physical base backups the backup retention pass keeps (its plan's ``keep``: WAL retention runs
after the manifests it drops are gone, with the same plan, so a backup is never kept by one and not the other),
every record of the cluster (``WalArchive.records``) and every timeline history file's content
(``window_report.load_cluster``, which verifies them). A record, a history file or a listing that cannot be
read stops the cluster's pass before anything is deleted: a partial view of the archive must never look like
"nothing needs this" (WAL-G's ``delete`` removed needed WAL from a partial listing, walg#636).

**Record first, then the object.** A file is in the archive if and only if its record is
(``wal/records.py``); deleting the record first means a crash in between leaves an object nobody lists — an
*orphan* — never a record whose object is gone (which a restore would plan and then fail on). Orphans, from
this or from a push killed between its object and its record, are removed by a later pass once older than
``orphan_age``: a younger one may be a push in progress, whose record is about to be written (and the record's
absence is checked again just before the delete).

**Bounded.** At most ``max_deletes`` files (and orphans) per pass, oldest first; the rest are reported as
``remaining`` and go on the next pass. A pass after years without retention still ends, and its deletes are
as safe as the plan's decisions, which do not depend on what was deleted first.

**Dry run.** The same plan, nothing deleted: ``cleanup --dry-run`` shows what would go and why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.physical_manifest import base_backup
from kybdr_agent.errors import KybdrError
from kybdr_agent.telemetry import get_logger
from kybdr_agent.wal.archive import WalArchive
from kybdr_agent.wal.names import WalError
from kybdr_agent.wal.records import RECORD_SUFFIX, WAL_PREFIX, WalRecord, parse_wal_key, wal_record_key
from kybdr_agent.wal.retention import WalRetentionPlan, plan_wal_retention
from kybdr_agent.wal.window_report import load_cluster, physical_manifests

log = get_logger("kybdr_agent.wal.retention")

MAX_DELETES: Final = 1000  # files per pass per cluster (each is a record and an object)
ORPHAN_AGE: Final = timedelta(hours=1)
LISTED_NAMES: Final = 200  # names shown in a dry run's ``would_delete``; the count is always complete

ArchiveFor = Callable[[str, int], WalArchive]  # (system identifier, wal_segment_size) -> its archive


class WalRetentionError(KybdrError):
    """A cluster's WAL retention could not be planned or applied; the message says what was (not) deleted."""


@dataclass
class ClusterRetention:
    """What one pass did (or, dry, would do) to one cluster's archive."""

    system_identifier: str
    dry_run: bool
    kept_backups: list[str]
    deleted: int = 0
    kept: int = 0
    bytes_freed: int = 0
    remaining: int = 0
    orphans_deleted: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    would_delete: list[str] = field(default_factory=list)
    would_delete_count: int = 0
    error: str | None = None

    def document(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _reason_counts(plan: WalRetentionPlan) -> dict[str, int]:
    """How many files each reason applies to: per-file reasons would be thousands of lines."""
    counts = Counter(("keep: " if name in plan.keep else "delete: ") + why for name, why in plan.reasons.items())
    return dict(sorted(counts.items()))


def _order(record: WalRecord) -> tuple[int, str]:
    return record.timeline, record.file_name


async def apply_wal_retention(
    archive: WalArchive,
    kept: Iterable[Manifest],
    *,
    dry_run: bool,
    max_deletes: int = MAX_DELETES,
    orphan_age: timedelta = ORPHAN_AGE,
    now: datetime | None = None,
) -> ClusterRetention:
    """One cluster: plan over every record, then (unless ``dry_run``) delete record then object, oldest first.

    Raises ``WalRetentionError`` (nothing deleted) when the archive cannot be read in full."""
    if max_deletes < 1:
        raise ValueError("max_deletes must be at least 1")
    now = now or datetime.now(UTC)
    backups = [m for m in kept if m.kind == "physical"]
    for m in backups:
        if m.physical is None or m.physical.system_identifier != archive.system_identifier:
            raise ValueError(f"backup {m.id} is not a base backup of cluster {archive.system_identifier}")
    result = ClusterRetention(archive.system_identifier, dry_run, sorted(m.id for m in backups))
    try:
        cluster = await load_cluster(archive, backups)
        plan = plan_wal_retention(
            [base_backup(m) for m in backups],
            [r.wal_file() for r in cluster.records],
            cluster.histories,
            archive.segment_size,
        )
        orphans = await _orphans(archive, now - orphan_age)
    except (KybdrError, WalError, ValueError) as exc:
        raise WalRetentionError(
            f"WAL retention of cluster {archive.system_identifier} in {archive.describe()}: the archive could not be "
            f"read in full, so nothing was deleted: {exc}"
        ) from None
    doomed = sorted((r for r in cluster.records if r.file_name in plan.delete), key=_order)
    result.kept = len(plan.keep)
    result.reasons = _reason_counts(plan)
    result.would_delete_count = len(doomed) + len(orphans)
    if dry_run:
        result.would_delete = [r.file_name for r in doomed[:LISTED_NAMES]]
        result.bytes_freed = sum(r.stored_bytes for r in doomed) + sum(size for _, size in orphans)
        return result
    budget = max_deletes
    for record in doomed[:budget]:
        await archive.store.delete(wal_record_key(archive.system_identifier, record.wal_file()))
        await archive.store.delete(record.object_key)
        result.deleted += 1
        result.bytes_freed += record.stored_bytes
    budget -= result.deleted
    for key, size in orphans[: max(budget, 0)]:
        if await archive.store.stat(key + RECORD_SUFFIX) is not None:
            continue  # its push finished after the listing: it is archived, not an orphan
        await archive.store.delete(key)
        result.orphans_deleted += 1
        result.bytes_freed += size
    result.remaining = len(doomed) - result.deleted + max(len(orphans) - max(budget, 0), 0)
    log.info(
        "wal.retention_applied",
        system_identifier=archive.system_identifier,
        deleted=result.deleted,
        orphans_deleted=result.orphans_deleted,
        kept=result.kept,
        remaining=result.remaining,
        bytes_freed=result.bytes_freed,
    )
    return result


async def _orphans(archive: WalArchive, older_than: datetime) -> list[tuple[str, int]]:
    """Objects under the cluster's prefix whose record is not listed, last written before ``older_than``.

    Keys that are not WAL archive keys are left alone (not ours to judge); oldest first."""
    objects: dict[str, tuple[datetime, int]] = {}
    records: set[str] = set()
    async for info in archive.store.list_objects(f"{WAL_PREFIX}/{archive.system_identifier}/"):
        try:
            _, _, is_record = parse_wal_key(info.key, archive.segment_size)
        except WalError:
            continue
        if is_record:
            records.add(info.key.removesuffix(RECORD_SUFFIX))
        else:
            objects[info.key] = (info.modified, info.size)
    found = [(modified, key, size) for key, (modified, size) in objects.items() if key not in records]
    return [(key, size) for modified, key, size in sorted(found) if modified < older_than]


async def apply_wal_retention_all(
    manifests: Iterable[Manifest],
    keep: Collection[str],
    archive_for: ArchiveFor,
    *,
    dry_run: bool,
    max_deletes: int = MAX_DELETES,
    orphan_age: timedelta = ORPHAN_AGE,
    now: datetime | None = None,
    unreadable_manifests: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Every cluster with a physical backup in ``manifests``: its WAL, given the backups in ``keep``.

    A cluster whose backups are all dropped keeps its WAL (the pure plan keeps everything when no backup is
    kept). One cluster's error is reported in its entry (``error``) and does not stop the others.
    ``unreadable_manifests`` (the catalog's): while any manifest cannot be read, no WAL is deleted at all —
    the backup it describes may be the oldest one and need WAL nothing else does."""
    results: dict[str, dict[str, Any]] = {}
    for system_identifier, found in sorted(physical_manifests(manifests).items()):
        newest = found[-1].physical
        assert newest is not None  # physical_manifests keeps manifests with their physical fields
        kept = [m for m in found if m.id in keep]
        if unreadable_manifests:
            why = (
                f"{len(unreadable_manifests)} manifest(s) could not be read ({unreadable_manifests[0]} …): no WAL is "
                "deleted until they can, since a backup among them may need it"
            )
            results[system_identifier] = ClusterRetention(
                system_identifier, dry_run, sorted(m.id for m in kept), error=why
            ).document()
            continue
        try:
            archive = archive_for(system_identifier, newest.wal_segment_size)
            done = await apply_wal_retention(
                archive, kept, dry_run=dry_run, max_deletes=max_deletes, orphan_age=orphan_age, now=now
            )
        except WalRetentionError as exc:
            log.warning("wal.retention_failed", system_identifier=system_identifier, error=str(exc))
            done = ClusterRetention(system_identifier, dry_run, sorted(m.id for m in kept), error=str(exc))
        results[system_identifier] = done.document()
    return results
