"""WAL retention (``wal/retention.py``): what kept base backups need stays, along every lineage through them;
nothing older than the oldest kept backup stays but history files; nothing is deleted on doubt."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.wal.names import BackupHistoryFile, PartialSegment, Segment, TimelineHistoryFile, WalFile
from kybdr_agent.wal.retention import (
    NO_BACKUP_KEPT,
    OFF_LINEAGE,
    OLDER_THAN_OLDEST,
    SUPERSEDED,
    TIMELINE_HISTORY,
    UNKNOWN_LINEAGE,
    plan_wal_retention,
)
from kybdr_agent.wal.timeline import Switch, TimelineHistory, lineage_from
from kybdr_agent.wal.window import BaseBackup
from tests.unit.test_wal_window import SIZE, T0, backup

# Timeline 2 branched off 1 in segment 7 (after the kept backup); timeline 3 off 1 in segment 3 (before it).
HISTORIES = {
    2: TimelineHistory(2, (Switch(1, 7 * SIZE + 0x800),)),
    3: TimelineHistory(3, (Switch(1, 3 * SIZE + 0x800),)),
}


def seg(timeline: int, segno: int) -> Segment:
    return Segment(timeline, segno, SIZE)


def test_a_kept_backup_keeps_its_lineages_and_nothing_older() -> None:
    kept = backup("b5", 5)
    files: list[WalFile] = [seg(1, n) for n in range(1, 11)]
    files += [seg(2, n) for n in range(7, 10)] + [seg(3, n) for n in range(3, 7)]
    files += [TimelineHistoryFile(2), TimelineHistoryFile(3), BackupHistoryFile(seg(1, 5), 0x28)]
    files += [BackupHistoryFile(seg(1, 2), 0x28), PartialSegment(seg(1, 10)), PartialSegment(seg(2, 10))]
    plan = plan_wal_retention([kept], files, HISTORIES, SIZE)
    assert plan.keep | plan.delete == {f.name for f in files}
    assert not plan.keep & plan.delete
    assert {seg(1, n).name for n in range(5, 11)} <= plan.keep
    assert {seg(2, n).name for n in range(7, 10)} <= plan.keep  # branched after the backup: its lineage
    assert PartialSegment(seg(2, 10)).name in plan.keep
    assert {seg(1, n).name for n in range(1, 5)} <= plan.delete
    assert {seg(3, n).name for n in range(3, 7)} <= plan.delete  # branched before the backup
    assert plan.reasons[seg(1, 4).name] == OLDER_THAN_OLDEST
    assert plan.reasons[seg(3, 6).name] == OFF_LINEAGE
    assert plan.reasons[seg(1, 7).name] == "needed by b5"
    assert plan.reasons["00000003.history"] == TIMELINE_HISTORY
    assert "00000003.history" in plan.keep
    assert "000000010000000000000005.00000028.backup" in plan.keep
    assert "000000010000000000000002.00000028.backup" in plan.delete
    assert plan.reasons[PartialSegment(seg(1, 10)).name] == SUPERSEDED
    assert PartialSegment(seg(1, 10)).name in plan.delete


def test_no_kept_backup_deletes_nothing() -> None:
    files: list[WalFile] = [*(seg(1, n) for n in range(1, 4)), PartialSegment(seg(1, 4))]
    plan = plan_wal_retention([], files, {}, SIZE)
    assert plan.delete == frozenset()
    assert set(plan.reasons.values()) == {NO_BACKUP_KEPT}


def test_an_unknown_lineage_is_kept_from_the_oldest_backup_on() -> None:
    files: list[WalFile] = [seg(4, n) for n in range(2, 8)]
    plan = plan_wal_retention([backup("b5", 5)], files, {}, SIZE)
    assert plan.keep == {seg(4, n).name for n in range(5, 8)}
    assert plan.reasons[seg(4, 6).name].startswith(UNKNOWN_LINEAGE)


def test_several_backups_and_the_reason_names_them() -> None:
    files: list[WalFile] = [seg(1, n) for n in range(1, 9)]
    plan = plan_wal_retention([backup("b5", 5), backup("b3", 3)], files, {}, SIZE)
    assert plan.delete == {seg(1, 1).name, seg(1, 2).name}
    assert plan.reasons[seg(1, 4).name] == "needed by b3"
    assert plan.reasons[seg(1, 6).name] == "needed by b3 and 1 more"


# ---------------------------------------------------------------------------------------------------------------
# Properties


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[BaseBackup], list[WalFile], dict[int, TimelineHistory]]:
    """A tree of timelines (each branching off an older one at a later point), backups on them, and files."""
    histories: dict[int, TimelineHistory] = {}
    for timeline in range(2, draw(st.integers(1, 5)) + 1):
        parent = draw(st.integers(1, timeline - 1))
        parent_line = lineage_from(parent, histories)
        assert parent_line is not None
        begin = parent_line.spans[-1].begin
        point = draw(st.integers(begin, begin + 12 * SIZE))
        parent_switches = histories[parent].switches if parent in histories else ()
        histories[timeline] = TimelineHistory(timeline, (*parent_switches, Switch(parent, point)))
    timelines = [1, *histories]
    backups = []
    for index in range(draw(st.integers(0, 3))):
        timeline = draw(st.sampled_from(timelines))
        line = lineage_from(timeline, histories)
        assert line is not None
        begin = line.spans[-1].begin
        start = draw(st.integers(begin, begin + 10 * SIZE))
        stop = start + draw(st.integers(1, 2 * SIZE))
        backups.append(BaseBackup(f"b{index}", timeline, start, stop, T0, T0))
    files: set[WalFile] = set()
    for _ in range(draw(st.integers(0, 40))):
        segment = seg(draw(st.sampled_from([*timelines, 7])), draw(st.integers(0, 25)))
        kind = draw(st.sampled_from(["segment", "segment", "partial", "backup"]))
        if kind == "segment":
            files.add(segment)
        else:
            files.add(PartialSegment(segment) if kind == "partial" else BackupHistoryFile(segment, 0x28))
    files |= {TimelineHistoryFile(t) for t in histories}
    lost = draw(st.sets(st.sampled_from(timelines)))  # history files not (yet) in the archive
    known = {t: h for t, h in histories.items() if t not in lost}
    return backups, sorted(files, key=lambda f: f.name), known


def _needed(backup_: BaseBackup, files: list[WalFile], histories: dict[int, TimelineHistory]) -> set[str]:
    """What recovery from ``backup_`` may read along any known lineage through it (and its own timeline)."""
    start = backup_.start_lsn // SIZE
    needed = set()
    for file in files:
        if isinstance(file, TimelineHistoryFile):
            continue
        segment = file if isinstance(file, Segment) else file.segment
        line = lineage_from(segment.timeline, histories)
        through = segment.timeline == backup_.timeline or (
            line is not None and line.holds_range(backup_.timeline, backup_.start_lsn, backup_.stop_lsn)
        )
        if through and segment.segno >= start:
            superseded = isinstance(file, PartialSegment) and segment in files
            if not superseded:
                needed.add(file.name)
    return needed


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_retention_properties(scenario: tuple[list[BaseBackup], list[WalFile], dict[int, TimelineHistory]]) -> None:
    backups, files, histories = scenario
    plan = plan_wal_retention(backups, files, histories, SIZE)
    names = {f.name for f in files}
    assert plan.keep | plan.delete == names
    assert not plan.keep & plan.delete
    assert set(plan.reasons) == names
    assert {f.name for f in files if isinstance(f, TimelineHistoryFile)} <= plan.keep
    if not backups:
        assert plan.delete == frozenset()
        return
    for kept in backups:
        assert _needed(kept, files, histories) <= plan.keep, f"{kept.id} lost WAL it needs"
    oldest = min(b.start_lsn // SIZE for b in backups)
    for file in files:
        if not isinstance(file, TimelineHistoryFile):
            segment = file if isinstance(file, Segment) else file.segment
            if segment.segno < oldest:
                assert file.name in plan.delete
    # Planning again over what was kept deletes nothing more.
    again = plan_wal_retention(backups, [f for f in files if f.name in plan.keep], histories, SIZE)
    assert again.delete == frozenset()
