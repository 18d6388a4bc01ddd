"""PURE. What can be recovered from the base backups and the archived WAL: each backup's reach, the cluster's
recoverable window, the base backup for a target, and the files a restore fetches for it.

**A backup's reach.** A physical base backup is consistent once recovery has replayed its WAL from the start
LSN to the stop LSN (the end of its backup-end record): segments ``containing(start)`` .. ``ending_at(stop)``,
read along the lineage being recovered (``Lineage.segments``). Those must all be archived in full, else the
backup is useless. From there recovery can go on as long as the next segment along the lineage is archived;
the first one missing ends the reach. It is a *gap* when archived WAL exists beyond it (that WAL cannot be
replayed from this backup) and simply the end of the archive otherwise. A ``.partial`` as the next segment
extends the reach into that segment and ends it there (the restore serves it under the full name, as
barman-cloud does).

**Times.** A reach covers the times from the backup's stop time (no earlier target can be consistent: PostgreSQL
refuses a stop point before the consistent point) to the newest commit timestamp known in its WAL — the
segment records carry the span of commit and abort timestamps when the archiver read them (``CommitSpan``).
The window ends at the last *known* commit on purpose: a recovery to a later time would need a commit after it
in the WAL (PostgreSQL 14+ fails otherwise), and a later time may have had commits not archived yet. When a
segment's commits are unknown the window is understated, never overstated.

**The window** of a cluster is computed along one lineage (by default the newest timeline, as
``recovery_target_timeline = 'latest'`` would choose from the oldest backup's timeline): the reaches of the
usable backups, merged into intervals. ``earliest_recovery_time``/``latest_recovery_time`` describe the
newest interval — older ones, cut off by a gap, are listed in ``intervals``, never silently joined.

**Choosing a base backup** for a target: among the usable backups on the lineage whose reach holds the target,
the newest (the least WAL to replay). For "latest", the one that reaches furthest; for a restore point name,
whose LSN is unknown here, the oldest of those reaching furthest, so any restore point after it can be found.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from kybdr_agent.wal.names import (
    Segment,
    WalError,
    check_lsn,
    check_segment_size,
    check_timeline,
    format_lsn,
)
from kybdr_agent.wal.targets import (
    ImmediateTarget,
    LatestTarget,
    LsnTarget,
    NameTarget,
    RecoveryTarget,
    TimeTarget,
)
from kybdr_agent.wal.timeline import Lineage, TimelineHistory, latest_timeline, lineage_from


class WindowError(WalError):
    """No base backup and archived WAL can reach the target asked for; the message says what can."""


def _aware(moment: datetime, what: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise WindowError(f"{what} must carry a time zone")


@dataclass(frozen=True, slots=True)
class BaseBackup:
    """What the window needs of a physical backup's manifest."""

    id: str
    timeline: int
    start_lsn: int
    stop_lsn: int
    start_time: datetime
    stop_time: datetime

    def __post_init__(self) -> None:
        check_timeline(self.timeline)
        check_lsn(self.start_lsn)
        check_lsn(self.stop_lsn)
        if self.stop_lsn <= self.start_lsn:
            raise WindowError(f"backup {self.id}: stop LSN is not after its start LSN")
        _aware(self.start_time, f"backup {self.id}'s start time")
        _aware(self.stop_time, f"backup {self.id}'s stop time")
        if self.stop_time < self.start_time:
            raise WindowError(f"backup {self.id}: stop time is before its start time")


@dataclass(frozen=True, slots=True)
class CommitSpan:
    """The commit and abort records of one segment: how many, and their earliest and latest timestamps."""

    count: int
    first: datetime | None = None
    last: datetime | None = None

    def __post_init__(self) -> None:
        if self.count < 0 or (self.count == 0) != (self.first is None) or (self.first is None) != (self.last is None):
            raise WindowError("a commit span has timestamps exactly when it counts commits")
        if self.first is not None and self.last is not None:
            _aware(self.first, "a commit timestamp")
            _aware(self.last, "a commit timestamp")
            if self.last < self.first:
                raise WindowError("a commit span ends before it starts")


@dataclass(frozen=True, slots=True)
class ArchivedSegment:
    """A segment in the archive, full or ``partial``, with its commit span when known (None: not read)."""

    segment: Segment
    partial: bool = False
    commits: CommitSpan | None = None


@dataclass(frozen=True, slots=True)
class Reach:
    """How far one base backup gets along a lineage."""

    backup: BaseBackup
    timeline: int  # the lineage's tip
    on_lineage: bool
    consistency: tuple[Segment, ...]
    missing: tuple[Segment, ...]  # segments of ``consistency`` not archived in full
    run: tuple[ArchivedSegment, ...]  # from the first consistency segment to the last contiguous one
    gap: Segment | None  # the first segment missing with archived WAL beyond it on the lineage

    @property
    def usable(self) -> bool:
        return self.on_lineage and not self.missing

    @property
    def last(self) -> ArchivedSegment | None:
        return self.run[-1] if self.usable and self.run else None

    @property
    def end_segno(self) -> int:
        """The last segment number of the run (−1 when the backup is not usable)."""
        last = self.last
        return last.segment.segno if last is not None else -1

    @property
    def end_lsn(self) -> int:
        """WAL is archived in full up to here (a trailing partial counts only from its start)."""
        last = self.last
        if last is None:
            return 0
        return last.segment.start_lsn if last.partial else last.segment.end_lsn

    @property
    def run_end_lsn(self) -> int:
        """The end of the run's last segment, a trailing partial included (how far it really goes is unknown)."""
        last = self.last
        return last.segment.end_lsn if last is not None else 0

    @property
    def last_commit(self) -> datetime | None:
        known = [s.commits.last for s in self.run if s.commits is not None and s.commits.last is not None]
        return max(known) if known else None

    @property
    def commits_unknown(self) -> bool:
        return any(s.commits is None for s in self.run)

    @property
    def earliest(self) -> datetime:
        return self.backup.stop_time

    @property
    def latest(self) -> datetime:
        last_commit = self.last_commit
        return max(self.backup.stop_time, last_commit) if last_commit is not None else self.backup.stop_time

    def why_unusable(self) -> str | None:
        if not self.on_lineage:
            backup = self.backup
            return f"backup {backup.id} (timeline {backup.timeline}) is not on timeline {self.timeline}'s lineage"
        if self.missing:
            names = ", ".join(s.name for s in self.missing[:3]) + (" …" if len(self.missing) > 3 else "")
            return f"backup {self.backup.id} cannot become consistent: WAL missing: {names}"
        return None


@dataclass(frozen=True, slots=True)
class Interval:
    earliest: datetime
    latest: datetime
    backups: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RecoveryWindow:
    """The recoverable times of a cluster along the lineage of ``timeline``."""

    timeline: int
    lineage: Lineage | None
    reaches: tuple[Reach, ...]
    intervals: tuple[Interval, ...]
    problems: tuple[str, ...]

    @property
    def earliest_recovery_time(self) -> datetime | None:
        return self.intervals[-1].earliest if self.intervals else None

    @property
    def latest_recovery_time(self) -> datetime | None:
        return self.intervals[-1].latest if self.intervals else None

    @property
    def first_gap(self) -> Segment | None:
        gaps = [r.gap for r in self.reaches if r.usable and r.gap is not None]
        return min(gaps, key=lambda s: s.segno) if gaps else None


class _Archive:
    """The archived segments indexed by (timeline, segno)."""

    def __init__(self, segments: Iterable[ArchivedSegment], size: int) -> None:
        self.full: dict[tuple[int, int], ArchivedSegment] = {}
        self.partial: dict[tuple[int, int], ArchivedSegment] = {}
        for archived in segments:
            if archived.segment.size != size:
                raise WindowError(f"segment {archived.segment.name} has another segment size than the cluster")
            key = (archived.segment.timeline, archived.segment.segno)
            (self.partial if archived.partial else self.full)[key] = archived
        self.size = size

    def newest_on(self, line: Lineage) -> int:
        """The highest segment number archived (full or partial) on the path of ``line``; −1 if none."""
        found = -1
        for timeline, segno in (*self.full, *self.partial):
            if segno > found and line.segment_timeline(segno, self.size) == timeline:
                found = segno
        return found


def _reach(backup: BaseBackup, line: Lineage, archive: _Archive, newest: int) -> Reach:
    size = archive.size
    if not line.holds_range(backup.timeline, backup.start_lsn, backup.stop_lsn):
        return Reach(backup, line.tip, False, (), (), (), None)
    consistency = tuple(line.segments(backup.start_lsn, backup.stop_lsn, size))
    missing = tuple(s for s in consistency if (s.timeline, s.segno) not in archive.full)
    if missing:
        return Reach(backup, line.tip, True, consistency, missing, (), None)
    run = [archive.full[(s.timeline, s.segno)] for s in consistency]
    segno = consistency[-1].segno + 1
    while (key := (line.segment_timeline(segno, size), segno)) in archive.full:
        run.append(archive.full[key])
        segno += 1
    if key in archive.partial:
        run.append(archive.partial[key])
    # ``segno`` is the first segment not archived in full: a gap when WAL beyond it was archived.
    gap = Segment(key[0], segno, size) if newest > segno else None
    return Reach(backup, line.tip, True, consistency, (), tuple(run), gap)


def _intervals(reaches: Iterable[Reach]) -> tuple[Interval, ...]:
    merged: list[Interval] = []
    for reach in sorted((r for r in reaches if r.usable), key=lambda r: (r.earliest, r.latest)):
        if merged and reach.earliest <= merged[-1].latest:
            top = merged[-1]
            merged[-1] = Interval(top.earliest, max(top.latest, reach.latest), (*top.backups, reach.backup.id))
        else:
            merged.append(Interval(reach.earliest, reach.latest, (reach.backup.id,)))
    return tuple(merged)


def default_timeline(backups: Iterable[BaseBackup], histories: Mapping[int, TimelineHistory]) -> int:
    """The timeline ``'latest'`` leads to from the oldest backup's timeline (1 when there are no backups)."""
    starts = [b.timeline for b in backups]
    return latest_timeline(min(starts) if starts else 1, histories)


def recovery_window(
    backups: Iterable[BaseBackup],
    segments: Iterable[ArchivedSegment],
    histories: Mapping[int, TimelineHistory],
    size: int,
    *,
    timeline: int | None = None,
) -> RecoveryWindow:
    """Every backup's reach along ``timeline``'s lineage (default: ``default_timeline``) and the window."""
    check_segment_size(size)
    backups = sorted(backups, key=lambda b: (b.stop_time, b.stop_lsn, b.id))
    tip = timeline if timeline is not None else default_timeline(backups, histories)
    line = lineage_from(tip, histories)
    if line is None:
        problem = f"timeline {tip}'s history file is not in the archive: its lineage, and so its window, is unknown"
        return RecoveryWindow(tip, None, (), (), (problem,))
    archive = _Archive(segments, size)
    newest = archive.newest_on(line)
    reaches = tuple(_reach(b, line, archive, newest) for b in backups)
    problems = tuple(why for r in reaches if (why := r.why_unusable()) is not None)
    return RecoveryWindow(tip, line, reaches, _intervals(reaches), problems)


def _describe(window: RecoveryWindow) -> str:
    if not window.intervals:
        return f"nothing is recoverable on timeline {window.timeline}" + (
            f" ({window.problems[0]})" if window.problems else ""
        )
    spans = "; ".join(f"{i.earliest.isoformat()} … {i.latest.isoformat()}" for i in window.intervals)
    return f"recoverable on timeline {window.timeline}: {spans}"


def choose_base_backup(window: RecoveryWindow, target: RecoveryTarget) -> Reach:
    """The reach (base backup and its WAL) a restore to ``target`` starts from; WindowError if there is none."""
    usable = [r for r in window.reaches if r.usable]
    if not usable:
        raise WindowError(f"no usable base backup: {_describe(window)}")
    if isinstance(target, TimeTarget):
        fits = [r for r in usable if r.earliest <= target.at and (target.at <= r.latest or r.commits_unknown)]
        if not fits:
            raise WindowError(f"no base backup and archived WAL reach {target.at.isoformat()}: {_describe(window)}")
        return max(fits, key=lambda r: (r.backup.stop_time, r.backup.stop_lsn))
    if isinstance(target, LsnTarget):
        fits = [r for r in usable if r.backup.stop_lsn <= target.lsn < r.run_end_lsn]
        if not fits:
            raise WindowError(
                f"no base backup and archived WAL reach LSN {format_lsn(target.lsn)} on timeline {window.timeline}"
            )
        return max(fits, key=lambda r: (r.backup.stop_lsn, r.backup.stop_time))
    if isinstance(target, ImmediateTarget):
        return max(usable, key=lambda r: (r.backup.stop_time, r.backup.stop_lsn))
    furthest = max(r.end_segno for r in usable)
    ends = [r for r in usable if r.end_segno == furthest]
    if isinstance(target, NameTarget):
        return min(ends, key=lambda r: (r.backup.stop_time, r.backup.stop_lsn))
    assert isinstance(target, LatestTarget)
    return max(ends, key=lambda r: (r.backup.stop_time, r.backup.stop_lsn))
