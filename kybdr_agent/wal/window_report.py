"""The recoverable window of each cluster in a repository, and the plan of one point-in-time restore, read from
the physical backups' manifests and the WAL archive's records.

The decisions are the pure core's (``wal.window``: reaches, window, which base backup; ``wal.fetch_plan``: what
to fetch and which timeline to name); this module only gathers their inputs from the repository: every record of
the cluster (``WalArchive.records``) and the content of every archived timeline history file, which decides
the lineages (a few bytes each, verified like any WAL file). Nothing is written.

``list --json`` shows ``cluster_windows``: per cluster, ``earliest_recovery_time`` and ``latest_recovery_time``
of the newest interval, every interval (a gap in the archive splits them; they are never joined silently),
the gaps themselves, and the problems that make a backup unusable. A cluster whose archive cannot be read is
listed with its error rather than failing the listing. A restore calls ``plan_restore``, which is strict: the
first thing that cannot be read stops it, before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.physical_manifest import base_backup
from kybdr_agent.errors import KybdrError, NotFound
from kybdr_agent.wal.archive import WalArchive
from kybdr_agent.wal.fetch_plan import FetchPlan, FetchPlanError, effective_target, fetch_plan
from kybdr_agent.wal.names import PartialSegment, Segment, TimelineHistoryFile, WalError, format_lsn
from kybdr_agent.wal.records import WalRecord
from kybdr_agent.wal.targets import LatestTarget, LsnTarget, NameTarget, RecoveryTarget, TimeTarget
from kybdr_agent.wal.timeline import TimelineHistory, parse_history
from kybdr_agent.wal.window import (
    ArchivedSegment,
    Reach,
    RecoveryWindow,
    WindowError,
    choose_base_backup,
    recovery_window,
)

ArchiveFor = Callable[[str, int], WalArchive]  # (system identifier, wal_segment_size) -> its archive


class RestorePlanError(KybdrError):
    """No restore to the target asked for can be planned from this repository; the message says what can."""


@dataclass(frozen=True)
class ClusterArchive:
    """What the window code needs of one cluster, read from the repository."""

    system_identifier: str
    segment_size: int
    manifests: tuple[Manifest, ...]
    records: tuple[WalRecord, ...]
    histories: dict[int, TimelineHistory]

    @property
    def segments(self) -> list[ArchivedSegment]:
        return [r.archived_segment() for r in self.records if isinstance(r.wal_file(), Segment | PartialSegment)]

    def window(self, *, timeline: int | None = None) -> RecoveryWindow:
        return recovery_window(
            [base_backup(m) for m in self.manifests],
            self.segments,
            self.histories,
            self.segment_size,
            timeline=timeline,
        )

    def record_for(self, file_name: str) -> WalRecord:
        for record in self.records:
            if record.file_name == file_name:
                return record
        raise RestorePlanError(f"{file_name} is planned but has no record in the archive")


def physical_manifests(manifests: Iterable[Manifest]) -> dict[str, list[Manifest]]:
    """Physical backups by cluster (system identifier), oldest first."""
    clusters: dict[str, list[Manifest]] = {}
    for m in manifests:
        if m.kind == "physical" and m.physical is not None:
            clusters.setdefault(m.physical.system_identifier, []).append(m)
    for found in clusters.values():
        found.sort(key=lambda m: (m.finished_at, m.id))
    return clusters


async def load_cluster(archive: WalArchive, manifests: Sequence[Manifest]) -> ClusterArchive:
    """Every record of the cluster and every history file's content (verified by ``WalArchive``)."""
    records = tuple(await archive.records())
    histories: dict[int, TimelineHistory] = {}
    for record in records:
        file = record.wal_file()
        if isinstance(file, TimelineHistoryFile):
            content = await archive.read_bytes(record)
            try:
                histories[file.timeline] = parse_history(file.timeline, content)
            except WalError as exc:
                raise RestorePlanError(
                    f"{record.file_name} in {archive.describe()} is not a history file: {exc}"
                ) from None
    return ClusterArchive(archive.system_identifier, archive.segment_size, tuple(manifests), records, histories)


# --- list --json ------------------------------------------------------------------------------------------


def _time(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def window_document(cluster: ClusterArchive) -> dict[str, Any]:
    """One cluster's window as ``list --json`` shows it."""
    window = cluster.window()
    usable = [r for r in window.reaches if r.usable]
    gaps = sorted({r.gap.name for r in usable if r.gap is not None})
    return {
        "system_identifier": cluster.system_identifier,
        "timeline": window.timeline,
        "wal_segment_size": cluster.segment_size,
        "earliest_recovery_time": _time(window.earliest_recovery_time),
        "latest_recovery_time": _time(window.latest_recovery_time),
        "intervals": [
            {"earliest": _time(i.earliest), "latest": _time(i.latest), "backups": list(i.backups)}
            for i in window.intervals
        ],
        "gaps": gaps,
        "latest_understated": any(r.commits_unknown for r in usable),
        "base_backups": len(cluster.manifests),
        "usable_base_backups": len(usable),
        "wal_files": len(cluster.records),
        "problems": list(window.problems),
        "error": None,
    }


async def cluster_windows(manifests: Iterable[Manifest], archive_for: ArchiveFor) -> list[dict[str, Any]]:
    """The recoverable window of every cluster with a physical backup; an unreadable archive is reported."""
    documents: list[dict[str, Any]] = []
    for system_identifier, found in sorted(physical_manifests(manifests).items()):
        size = found[-1].physical.wal_segment_size if found[-1].physical is not None else 0
        try:
            cluster = await load_cluster(archive_for(system_identifier, size), found)
            documents.append(window_document(cluster))
        except (KybdrError, WalError) as exc:
            documents.append(
                {
                    "system_identifier": system_identifier,
                    "earliest_recovery_time": None,
                    "latest_recovery_time": None,
                    "intervals": [],
                    "gaps": [],
                    "problems": [],
                    "error": str(exc),
                }
            )
    return documents


# --- a restore's plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestorePlan:
    manifest: Manifest
    archive: WalArchive
    cluster: ClusterArchive
    reach: Reach
    target: RecoveryTarget  # the one handed to PostgreSQL (``effective_target``)
    fetch: FetchPlan

    def record_of(self, source: Segment | PartialSegment | TimelineHistoryFile) -> WalRecord:
        return self.cluster.record_for(source.name)


def describe_target(target: RecoveryTarget) -> str:
    if isinstance(target, TimeTarget):
        return f"time {target.setting}"
    if isinstance(target, LsnTarget):
        return f"LSN {format_lsn(target.lsn)}"
    if isinstance(target, NameTarget):
        return f"restore point {target.name!r}"
    if isinstance(target, LatestTarget):
        return "the end of the archived WAL"
    return "consistency (the base backup's own point in time)"


def _pick_cluster(manifests: Iterable[Manifest], backup_id: str | None) -> tuple[str, list[Manifest], Manifest | None]:
    clusters = physical_manifests(manifests)
    if backup_id is not None:
        for system_identifier, found in clusters.items():
            for m in found:
                if m.id == backup_id:
                    return system_identifier, found, m
        raise NotFound(f"no physical base backup with id {backup_id} in the repository")
    if not clusters:
        raise RestorePlanError("the repository holds no physical base backup (kybdr-agent backup --physical makes one)")
    if len(clusters) > 1:
        raise RestorePlanError(
            "the repository holds physical backups of several clusters (system identifiers "
            f"{', '.join(sorted(clusters))}); name the base backup to restore (restore --physical ID)"
        )
    system_identifier, found = next(iter(clusters.items()))
    return system_identifier, found, None


def _reach_of(window: RecoveryWindow, chosen: Manifest, target: RecoveryTarget) -> Reach:
    reach = next((r for r in window.reaches if r.backup.id == chosen.id), None)
    if reach is None or not reach.usable:
        why = reach.why_unusable() if reach is not None else None
        raise RestorePlanError(why or f"backup {chosen.id} cannot be restored from this archive")
    if isinstance(target, TimeTarget) and (
        target.at < reach.earliest or (target.at > reach.latest and not reach.commits_unknown)
    ):
        raise RestorePlanError(
            f"backup {chosen.id} with the archived WAL reaches {reach.earliest.isoformat()} … "
            f"{reach.latest.isoformat()}, not {target.at.isoformat()}; leave out the ID to choose a backup for the time"
        )
    if isinstance(target, LsnTarget) and not reach.backup.stop_lsn <= target.lsn < reach.run_end_lsn:
        raise RestorePlanError(f"backup {chosen.id} with the archived WAL does not reach LSN {format_lsn(target.lsn)}")
    return reach


async def plan_restore(
    manifests: Iterable[Manifest], archive_for: ArchiveFor, target: RecoveryTarget, backup_id: str | None = None
) -> RestorePlan:
    """The base backup (``backup_id``, or the one ``wal.window`` chooses), the WAL to fetch, the target to write."""
    system_identifier, found, chosen = _pick_cluster(manifests, backup_id)
    physical = (chosen or found[-1]).physical
    assert physical is not None  # physical_manifests kept only manifests with their physical fields
    archive = archive_for(system_identifier, physical.wal_segment_size)
    cluster = await load_cluster(archive, found)
    window = cluster.window()
    try:
        reach = _reach_of(window, chosen, target) if chosen is not None else choose_base_backup(window, target)
        effective = effective_target(reach, target)
        plan = fetch_plan(reach, effective, cluster.histories)
    except (WindowError, FetchPlanError) as exc:
        raise RestorePlanError(str(exc)) from None
    manifest = next(m for m in found if m.id == reach.backup.id)
    return RestorePlan(manifest, archive, cluster, reach, effective, plan)
