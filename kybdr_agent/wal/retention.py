"""PURE. Which archived WAL files to keep, given the base backups retention keeps, and which to delete.

A kept base backup needs every segment from the one holding its start LSN onward, along every timeline whose
lineage passes through it: the consistency range, then the WAL that recovery to any later point replays,
on its own timeline and on every timeline branched off it after the backup. So a segment or partial of
timeline *t*, number *n*, is kept when some kept backup B starts at or before segment *n* and either *t* is
B's own timeline or *t*'s lineage holds B's whole WAL range (``Lineage.holds_range``). Timeline history files
are always kept: they are tiny, and a missing one makes a timeline's lineage — and every later new timeline
ID — unknowable. Backup history files (``….backup``) follow their segment.

Nothing is deleted on doubt:

* when no base backup is kept at all, no WAL is deleted (the first backup may be running, and WAL archived
  before a first backup must not vanish because retention ran in between);
* a segment of a timeline whose history file is missing (its lineage unknown) is kept when it is not older
  than the oldest kept backup.

A partial whose full segment is archived too is deleted: the full one holds everything it does.

Properties the tests hold this to (hypothesis): keep and delete partition the files; no kept backup loses a
segment it needs along any lineage through it; nothing older than the oldest kept backup's start segment is
kept except history files; planning again over what was kept deletes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kybdr_agent.wal.names import (
    BackupHistoryFile,
    PartialSegment,
    Segment,
    TimelineHistoryFile,
    WalFile,
    WalNameError,
    check_segment_size,
)
from kybdr_agent.wal.timeline import Lineage, TimelineHistory, lineage_from
from kybdr_agent.wal.window import BaseBackup

TIMELINE_HISTORY = "timeline history file"
NO_BACKUP_KEPT = "no base backup is kept: WAL is kept until there is one"
SUPERSEDED = "partial superseded by its full segment"
UNKNOWN_LINEAGE = "timeline history missing: kept until its lineage is known"
OLDER_THAN_OLDEST = "older than the oldest kept base backup"
OFF_LINEAGE = "on a timeline no kept base backup leads to"


@dataclass(frozen=True)
class WalRetentionPlan:
    keep: frozenset[str]
    delete: frozenset[str]
    reasons: Mapping[str, str]


def _segment_of(file: Segment | PartialSegment | BackupHistoryFile) -> Segment:
    return file if isinstance(file, Segment) else file.segment


def _leads_to(backup: BaseBackup, timeline: int, line: Lineage | None) -> bool:
    """Whether recovery from ``backup`` can continue onto ``timeline`` (unknown lineage: assume it can)."""
    if timeline == backup.timeline or line is None:
        return True
    return line.holds_range(backup.timeline, backup.start_lsn, backup.stop_lsn)


def plan_wal_retention(
    kept_backups: Iterable[BaseBackup],
    files: Iterable[WalFile],
    histories: Mapping[int, TimelineHistory],
    size: int,
) -> WalRetentionPlan:
    """Keep and delete, by archived file name, with a reason for every name."""
    check_segment_size(size)
    kept = list(kept_backups)
    files = list(files)
    for file in files:
        if not isinstance(file, TimelineHistoryFile) and _segment_of(file).size != size:
            raise WalNameError(f"{file.name} was parsed for another segment size than {size}")
    full = {(f.timeline, f.segno) for f in files if isinstance(f, Segment)}
    oldest = min((b.start_lsn // size for b in kept), default=None)
    lineages: dict[int, Lineage | None] = {}
    reasons: dict[str, str] = {}
    keep: set[str] = set()
    for file in files:
        if isinstance(file, TimelineHistoryFile) or oldest is None:
            keep.add(file.name)
            reasons[file.name] = TIMELINE_HISTORY if isinstance(file, TimelineHistoryFile) else NO_BACKUP_KEPT
            continue
        segment = _segment_of(file)
        if isinstance(file, PartialSegment) and (segment.timeline, segment.segno) in full:
            reasons[file.name] = SUPERSEDED
            continue
        if segment.timeline not in lineages:
            lineages[segment.timeline] = lineage_from(segment.timeline, histories)
        line = lineages[segment.timeline]
        needing = sorted(
            b.id for b in kept if segment.segno >= b.start_lsn // size and _leads_to(b, segment.timeline, line)
        )
        if needing:
            keep.add(file.name)
            more = f" and {len(needing) - 1} more" if len(needing) > 1 else ""
            reasons[file.name] = (UNKNOWN_LINEAGE + "; " if line is None else "") + f"needed by {needing[0]}{more}"
        else:
            reasons[file.name] = OLDER_THAN_OLDEST if segment.segno < oldest else OFF_LINEAGE
    names = {file.name for file in files}
    return WalRetentionPlan(frozenset(keep), frozenset(names - keep), reasons)
