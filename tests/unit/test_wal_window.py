"""Recovery windows and the choice of a base backup (``wal/window.py``).

The first scenario is the archive of a real PostgreSQL 15 run on this machine: a base backup (redo 0/2000028,
stop 0/2000100, 03:22:10), a commit at 03:22:11.383054 in segment 3, pg_receivewal's partial segment 4 with
commits from 03:22:11.663756 to 03:23:36.738746, and a restored copy promoted at 0/3000E18 that archived
segments 3 and 4 of timeline 2. Restoring that backup to 03:22:11.5 along timeline 1 from exactly the files
``fetch_plan`` lists (through ``recovery.restore_command``'s spool) gave back the rows committed up to
03:22:11.383054 and none after.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.wal.names import Segment, parse_lsn
from kybdr_agent.wal.targets import ImmediateTarget, LatestTarget, LsnTarget, NameTarget, TimeTarget
from kybdr_agent.wal.timeline import parse_history
from kybdr_agent.wal.window import (
    ArchivedSegment,
    BaseBackup,
    CommitSpan,
    WindowError,
    choose_base_backup,
    default_timeline,
    recovery_window,
)

SIZE = 16 << 20
T0 = datetime(2026, 12, 2, 3, 22, 10, tzinfo=UTC)
HISTORIES = {2: parse_history(2, b'1\t0/3000E18\tat restore point "rp1"\n')}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def commits(first: float, last: float, count: int = 2) -> CommitSpan:
    return CommitSpan(count, at(first), at(last))


def archived(timeline: int, segno: int, *, partial: bool = False, span: CommitSpan | None = None) -> ArchivedSegment:
    return ArchivedSegment(Segment(timeline, segno, SIZE), partial, span)


def backup(
    name: str, start_segno: int, *, timeline: int = 1, stop_segno: int | None = None, when: float = 0
) -> BaseBackup:
    start = start_segno * SIZE + 0x28
    stop = (stop_segno if stop_segno is not None else start_segno) * SIZE + 0x100
    return BaseBackup(name, timeline, start, stop, at(when), at(when))


REAL_BACKUP = BaseBackup("real", 1, parse_lsn("0/2000028"), parse_lsn("0/2000100"), T0, T0)
REAL_SEGMENTS = [
    archived(1, 1),
    archived(1, 2),
    archived(1, 3, span=CommitSpan(1, at(1.383054), at(1.383054))),
    archived(1, 4, partial=True, span=CommitSpan(9, at(1.663756), at(86.738746))),
    archived(2, 3),
    archived(2, 4),
]


def test_the_real_archive_along_timeline_1() -> None:
    window = recovery_window([REAL_BACKUP], REAL_SEGMENTS, HISTORIES, SIZE, timeline=1)
    (reach,) = window.reaches
    assert reach.usable
    assert reach.why_unusable() is None
    assert [s.name for s in reach.consistency] == ["000000010000000000000002"]
    assert [(a.segment.name, a.partial) for a in reach.run] == [
        ("000000010000000000000002", False),
        ("000000010000000000000003", False),
        ("000000010000000000000004", True),
    ]
    assert reach.gap is None
    assert window.first_gap is None
    assert reach.end_lsn == parse_lsn("0/4000000")  # in full up to the partial's start
    assert reach.run_end_lsn == parse_lsn("0/5000000")
    assert window.earliest_recovery_time == T0
    assert window.latest_recovery_time == at(86.738746)
    assert choose_base_backup(window, TimeTarget(at(1.5))) == reach


def test_the_real_archive_along_timeline_2() -> None:
    assert default_timeline([REAL_BACKUP], HISTORIES) == 2  # what 'latest' would follow from timeline 1
    window = recovery_window([REAL_BACKUP], REAL_SEGMENTS, HISTORIES, SIZE)
    assert window.timeline == 2
    (reach,) = window.reaches
    assert [a.segment.name for a in reach.run] == [
        "000000010000000000000002",
        "000000020000000000000003",
        "000000020000000000000004",
    ]
    # Timeline 1's segment 3 and partial 4 are not on this lineage; no commit times are known along it.
    assert reach.commits_unknown
    assert reach.last_commit is None
    assert window.latest_recovery_time == T0


def test_a_gap_ends_the_window_and_a_later_backup_starts_another() -> None:
    segments = [archived(1, n, span=commits(n * 10, n * 10 + 5)) for n in (2, 4, 5, 6)]
    first, second = backup("first", 2, when=20), backup("second", 4, when=45)
    window = recovery_window([second, first], segments, {}, SIZE)
    by_id = {r.backup.id: r for r in window.reaches}
    assert [a.segment.segno for a in by_id["first"].run] == [2]
    assert by_id["first"].gap == Segment(1, 3, SIZE)
    assert by_id["second"].gap is None
    assert window.first_gap == Segment(1, 3, SIZE)
    assert [(i.earliest, i.latest, i.backups) for i in window.intervals] == [
        (at(20), at(25), ("first",)),
        (at(45), at(65), ("second",)),
    ]
    # The window is the newest interval; the older one is listed, never joined across the gap.
    assert (window.earliest_recovery_time, window.latest_recovery_time) == (at(45), at(65))
    assert choose_base_backup(window, TimeTarget(at(22))).backup.id == "first"
    assert choose_base_backup(window, TimeTarget(at(50))).backup.id == "second"
    with pytest.raises(WindowError, match="reach") as caught:
        choose_base_backup(window, TimeTarget(at(30)))  # in the hole
    assert "recoverable on timeline 1" in str(caught.value)
    with pytest.raises(WindowError):
        choose_base_backup(window, TimeTarget(at(10)))  # before the oldest backup was consistent
    with pytest.raises(WindowError):
        choose_base_backup(window, TimeTarget(at(66)))  # after the last known commit


def test_overlapping_reaches_merge_and_the_newest_backup_is_chosen() -> None:
    segments = [archived(1, n, span=commits(n * 10, n * 10 + 5)) for n in range(2, 8)]
    older, newer = backup("older", 2, when=20), backup("newer", 4, when=40)
    window = recovery_window([older, newer], segments, {}, SIZE)
    (interval,) = window.intervals
    assert (interval.earliest, interval.latest, interval.backups) == (at(20), at(75), ("older", "newer"))
    assert choose_base_backup(window, TimeTarget(at(41))).backup.id == "newer"  # least WAL to replay
    assert choose_base_backup(window, TimeTarget(at(39))).backup.id == "older"
    assert choose_base_backup(window, ImmediateTarget()).backup.id == "newer"
    assert choose_base_backup(window, LatestTarget()).backup.id == "newer"
    assert choose_base_backup(window, NameTarget("before-upgrade")).backup.id == "older"
    assert choose_base_backup(window, LsnTarget(5 * SIZE)).backup.id == "newer"
    assert choose_base_backup(window, LsnTarget(3 * SIZE)).backup.id == "older"
    with pytest.raises(WindowError, match="LSN 0/8000000"):
        choose_base_backup(window, LsnTarget(8 * SIZE))


def test_unknown_commit_times_understate_the_window_but_do_not_block_a_target() -> None:
    segments = [archived(1, 2, span=commits(1, 2)), archived(1, 3)]
    window = recovery_window([backup("b", 2)], segments, {}, SIZE)
    assert window.latest_recovery_time == at(2)
    # Segment 3's commits are unknown: a later target may be reachable; PostgreSQL says so if it is not.
    assert choose_base_backup(window, TimeTarget(at(100))).backup.id == "b"


def test_a_backup_missing_its_consistency_wal_is_unusable() -> None:
    segments = [archived(1, 2), archived(1, 4, partial=True)]
    window = recovery_window([backup("b", 2, stop_segno=3)], segments, {}, SIZE)
    (reach,) = window.reaches
    assert not reach.usable
    assert [s.name for s in reach.missing] == ["000000010000000000000003"]
    assert window.problems == ("backup b cannot become consistent: WAL missing: 000000010000000000000003",)
    assert window.intervals == ()
    assert window.earliest_recovery_time is None
    with pytest.raises(WindowError, match="no usable base backup"):
        choose_base_backup(window, LatestTarget())
    # A partial does not make a backup consistent either: how far it goes is not known.
    window = recovery_window([backup("b", 2, stop_segno=4)], [*segments, archived(1, 3)], {}, SIZE)
    assert [s.segno for s in window.reaches[0].missing] == [4]


def test_backups_off_the_lineage() -> None:
    segments = [archived(1, n) for n in range(2, 6)] + [archived(2, n) for n in range(3, 6)]
    after_branch = backup("after-branch", 4)  # timeline 1 went on after timeline 2 branched at 0/3000E18
    across_branch = BaseBackup("across", 1, parse_lsn("0/3000000"), parse_lsn("0/3001000"), T0, T0)
    window = recovery_window([after_branch, across_branch, backup("before", 2)], segments, HISTORIES, SIZE)
    assert window.timeline == 2
    usable = {r.backup.id: r.usable for r in window.reaches}
    assert usable == {"before": True, "after-branch": False, "across": False}
    assert any("not on timeline 2's lineage" in problem for problem in window.problems)
    along_1 = recovery_window([after_branch], segments, HISTORIES, SIZE, timeline=1)
    assert along_1.reaches[0].usable


def test_a_timeline_without_its_history_has_no_window() -> None:
    window = recovery_window([backup("b", 2)], [archived(1, 2)], {}, SIZE, timeline=3)
    assert window.lineage is None
    assert window.intervals == ()
    assert "history file is not in the archive" in window.problems[0]


def test_partial_then_more_wal_is_a_gap() -> None:
    segments = [archived(1, 2), archived(1, 3, partial=True), archived(1, 4)]
    window = recovery_window([backup("b", 2)], segments, {}, SIZE)
    (reach,) = window.reaches
    assert [(a.segment.segno, a.partial) for a in reach.run] == [(2, False), (3, True)]
    assert reach.gap == Segment(1, 3, SIZE)  # the full segment 3 is what is missing


def test_inputs_are_checked() -> None:
    with pytest.raises(WindowError, match="stop LSN"):
        BaseBackup("b", 1, 100, 100, T0, T0)
    with pytest.raises(WindowError, match="time zone"):
        BaseBackup("b", 1, 1, 100, datetime(2026, 1, 1), T0)
    with pytest.raises(WindowError, match="stop time"):
        BaseBackup("b", 1, 1, 100, at(1), at(0))
    with pytest.raises(WindowError):
        CommitSpan(0, at(0), at(0))
    with pytest.raises(WindowError):
        CommitSpan(1, at(1), at(0))
    with pytest.raises(WindowError):
        CommitSpan(1, None, None)
    with pytest.raises(WindowError, match="segment size"):
        recovery_window([], [ArchivedSegment(Segment(1, 2, 1 << 20))], {}, SIZE)


# ---------------------------------------------------------------------------------------------------------------
# Properties over generated archives (one timeline)


@st.composite
def archives(draw: st.DrawFn) -> tuple[list[BaseBackup], list[ArchivedSegment]]:
    present = draw(st.sets(st.integers(0, 30), max_size=31))
    segments = []
    for segno in sorted(present):
        partial = draw(st.booleans()) and draw(st.booleans())
        span = draw(st.none() | st.just(commits(segno * 10, segno * 10 + 9)) | st.just(CommitSpan(0)))
        segments.append(archived(1, segno, partial=partial, span=span))
    backups = []
    for index in range(draw(st.integers(0, 4))):
        start = draw(st.integers(0, 28))
        stop = start + draw(st.integers(0, 2))
        backups.append(backup(f"b{index}", start, stop_segno=stop, when=stop * 10 + draw(st.integers(0, 9))))
    return backups, segments


@settings(max_examples=100)
@given(archives(), st.integers(-10, 320))
def test_window_properties(archive: tuple[list[BaseBackup], list[ArchivedSegment]], seconds: int) -> None:
    backups, segments = archive
    full = {a.segment.segno for a in segments if not a.partial}
    present = {a.segment.segno for a in segments}
    window = recovery_window(backups, segments, {}, SIZE)
    for reach in window.reaches:
        assert reach.on_lineage
        if not reach.usable:
            assert reach.missing
            assert not reach.run
            continue
        numbers = [a.segment.segno for a in reach.run]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        assert numbers[0] == reach.backup.start_lsn // SIZE
        assert all(not a.partial for a in reach.run[:-1])
        first_not_full = numbers[-1] if reach.run[-1].partial else numbers[-1] + 1
        assert first_not_full not in full
        assert (reach.gap is None) == (not any(n > first_not_full for n in present))
        assert reach.earliest <= reach.latest
    intervals = window.intervals
    assert all(a.latest < b.earliest for a, b in itertools.pairwise(intervals))
    target = TimeTarget(at(seconds))
    fitting = [
        r
        for r in window.reaches
        if r.usable and r.earliest <= target.at and (target.at <= r.latest or r.commits_unknown)
    ]
    if not fitting:
        with pytest.raises(WindowError):
            choose_base_backup(window, target)
        return
    chosen = choose_base_backup(window, target)
    assert chosen in fitting
    assert chosen.backup.stop_time == max(r.backup.stop_time for r in fitting)
