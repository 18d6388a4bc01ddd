"""PURE. The files a point-in-time restore puts in its local spool, under the names PostgreSQL will ask
``restore_command`` for, and the timeline it tells PostgreSQL to recover along.

Only the segments of the chosen reach are planned, each on the timeline ``Lineage.segments`` chose: the spool
never holds a segment of a timeline recovery must not read, so PostgreSQL's fall-back to an older timeline's
file (``XLogFileReadAnyTLI``) cannot pick up WAL the parent wrote after a branch. A trailing ``.partial`` is
served under its full segment's name (PostgreSQL never asks for ``.partial``; it reads up to where the
valid records end, as with barman-cloud's ``--partial``).

**Every** archived timeline history file is planned, not only the lineage's. When recovery ends, PostgreSQL
names the new timeline one past the newest history it can find through ``restore_command``
(``findNewestTimeLine``); a spool with only the lineage's histories would let it reuse the ID of a sibling
timeline that is already archived, and its WAL would then collide with that timeline's in the repository.
For the same reason the plan names its timeline explicitly: with every history in the spool, ``'latest'``
could follow a sibling branch instead of the one planned.

How far: the whole reach for "latest" and for a restore point's name (whose LSN is unknown here); for a time,
up to the first segment whose newest known commit is past the target (it holds the record recovery stops at),
plus ``FETCH_MARGIN`` segments in case that record runs over into the next; for an LSN, the segment holding it
plus the margin; for "immediate", the consistency range plus the margin. A segment with unknown commits does
not end a time plan early.

A time past the last archived commit is reachable — the database at that time is the one at the end of the
WAL — but not as a time target: PostgreSQL 14+ fails a recovery that ends without passing its target.
``effective_target`` turns it into "the end of the reach"; the restore writes the target it returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from kybdr_agent.wal.names import PartialSegment, Segment, TimelineHistoryFile, WalError, check_timeline
from kybdr_agent.wal.targets import ImmediateTarget, LatestTarget, LsnTarget, RecoveryTarget, TimeTarget
from kybdr_agent.wal.window import ArchivedSegment, BaseBackup, Reach

FETCH_MARGIN: Final = 1


class FetchPlanError(WalError):
    """A restore cannot be planned from this reach (unusable backup, or a lineage history missing)."""


@dataclass(frozen=True, slots=True)
class SpoolFile:
    """One file of the spool: where it comes from in the archive, and the name PostgreSQL asks for."""

    source: Segment | PartialSegment | TimelineHistoryFile
    spool_name: str


@dataclass(frozen=True, slots=True)
class FetchPlan:
    backup: BaseBackup
    timeline: int  # recovery_target_timeline to write: the planned lineage's tip
    histories: tuple[SpoolFile, ...]
    segments: tuple[SpoolFile, ...]  # WAL order

    @property
    def files(self) -> tuple[SpoolFile, ...]:
        """Histories first (recovery reads them before any segment), then segments in WAL order."""
        return self.histories + self.segments


def effective_target(reach: Reach, target: RecoveryTarget) -> RecoveryTarget:
    """The target to hand PostgreSQL for ``target`` on ``reach``.

    A time at or after the reach's last commit (every segment's commits known) becomes the end of the reach:
    the database as of that time *is* the one at the end of the reach, but PostgreSQL, finding no commit past
    the target, would replay to the end and then fail ("recovery ended before configured recovery target was
    reached"; checked on PostgreSQL 15). Everything else is handed on as asked."""
    if not isinstance(target, TimeTarget) or reach.commits_unknown or not reach.usable:
        return target
    last = reach.last_commit
    if last is None or target.at > last or (target.inclusive and target.at == last):
        return LatestTarget()
    return target


def _stop_index(reach: Reach, target: RecoveryTarget) -> int:
    """The index in ``reach.run`` of the segment where recovery is expected to stop."""
    last = len(reach.run) - 1
    consistent = len(reach.consistency) - 1
    if isinstance(target, ImmediateTarget):
        return consistent
    if isinstance(target, TimeTarget):
        for index, archived in enumerate(reach.run):
            latest = archived.commits.last if archived.commits is not None else None
            if latest is not None and (latest > target.at or (not target.inclusive and latest >= target.at)):
                return max(index, consistent)
        return last
    if isinstance(target, LsnTarget):
        first = reach.run[0].segment.segno
        return max(consistent, min(last, target.lsn // reach.run[0].segment.size - first))
    return last


def _spool_file(archived: ArchivedSegment) -> SpoolFile:
    segment = archived.segment
    return SpoolFile(PartialSegment(segment) if archived.partial else segment, segment.name)


def fetch_plan(reach: Reach, target: RecoveryTarget, history_timelines: Iterable[int]) -> FetchPlan:
    """What to fetch to recover ``reach``'s backup to ``target``; ``history_timelines`` are every timeline
    whose history file is archived for the cluster."""
    if not reach.usable:
        raise FetchPlanError(reach.why_unusable() or f"backup {reach.backup.id} is not usable")
    available = sorted({check_timeline(t) for t in history_timelines})
    if reach.timeline > 1 and reach.timeline not in available:
        raise FetchPlanError(f"timeline {reach.timeline}'s history file is not in the archive")
    end = min(len(reach.run), _stop_index(reach, target) + 1 + FETCH_MARGIN)
    segments = tuple(_spool_file(a) for a in reach.run[:end])
    histories = tuple(SpoolFile(TimelineHistoryFile(t), TimelineHistoryFile(t).name) for t in available if t > 1)
    return FetchPlan(reach.backup, reach.timeline, histories, segments)
