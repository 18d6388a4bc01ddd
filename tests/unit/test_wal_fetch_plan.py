"""The spool a point-in-time restore fills (``wal/fetch_plan.py``): which files, under which names, how far."""

from __future__ import annotations

import pytest

from kybdr_agent.wal.fetch_plan import FETCH_MARGIN, FetchPlanError, effective_target, fetch_plan
from kybdr_agent.wal.names import PartialSegment, Segment, TimelineHistoryFile
from kybdr_agent.wal.targets import ImmediateTarget, LatestTarget, LsnTarget, NameTarget, TimeTarget
from kybdr_agent.wal.timeline import parse_history
from kybdr_agent.wal.window import ArchivedSegment, CommitSpan, Reach, choose_base_backup, recovery_window
from tests.unit.test_wal_window import (
    HISTORIES,
    REAL_BACKUP,
    REAL_SEGMENTS,
    SIZE,
    archived,
    at,
    backup,
    commits,
)


def long_reach(*spans: CommitSpan | None) -> Reach:
    """A backup consistent in segment 2, then one segment per span (segment 3 onward)."""
    segments = [archived(1, 2, span=commits(20, 25))]
    segments += [archived(1, 3 + index, span=span) for index, span in enumerate(spans)]
    window = recovery_window([backup("b", 2, when=25)], segments, {}, SIZE)
    return window.reaches[0]


def spooled(reach: Reach, target: object, histories: tuple[int, ...] = ()) -> list[int]:
    plan = fetch_plan(reach, target, histories)  # type: ignore[arg-type]
    return [f.source.segno if isinstance(f.source, Segment) else f.source.segment.segno for f in plan.segments]  # type: ignore[union-attr]


def test_the_real_restore() -> None:
    window = recovery_window([REAL_BACKUP], REAL_SEGMENTS, HISTORIES, SIZE, timeline=1)
    target = TimeTarget(at(1.5))
    plan = fetch_plan(choose_base_backup(window, target), target, HISTORIES.keys())
    assert plan.timeline == 1
    assert plan.backup == REAL_BACKUP
    assert [(f.source, f.spool_name) for f in plan.files] == [
        (TimelineHistoryFile(2), "00000002.history"),  # every history, so the promotion picks timeline 3
        (Segment(1, 2, SIZE), "000000010000000000000002"),
        (Segment(1, 3, SIZE), "000000010000000000000003"),
        (PartialSegment(Segment(1, 4, SIZE)), "000000010000000000000004"),  # served under the full name
    ]


def test_how_far_each_target_goes() -> None:
    spans = [commits(n * 10, n * 10 + 5) for n in range(3, 10)]  # segments 3..9
    reach = long_reach(*spans)
    everything = list(range(2, 10))
    assert spooled(reach, LatestTarget()) == everything
    assert spooled(reach, NameTarget("rp")) == everything
    assert spooled(reach, ImmediateTarget()) == [2, 3]
    # The first segment whose newest commit is after 52 s is segment 5 (50..55): it holds the stop record.
    assert spooled(reach, TimeTarget(at(52))) == [2, 3, 4, 5, 6]
    assert spooled(reach, TimeTarget(at(55))) == [2, 3, 4, 5, 6, 7]  # inclusive: a commit at 55 s is kept
    assert spooled(reach, TimeTarget(at(55), inclusive=False)) == [2, 3, 4, 5, 6]
    assert spooled(reach, TimeTarget(at(200))) == everything
    assert spooled(reach, LsnTarget(6 * SIZE + 5)) == [2, 3, 4, 5, 6, 7]
    assert spooled(reach, LsnTarget(2 * SIZE + 0x200)) == [2, 3]
    assert FETCH_MARGIN == 1


def test_unknown_commits_do_not_end_a_time_plan_early() -> None:
    reach = long_reach(None, None, commits(50, 55), None)
    assert spooled(reach, TimeTarget(at(30))) == [2, 3, 4, 5, 6]  # segment 5 is the first known past 30 s
    assert spooled(reach, TimeTarget(at(60))) == [2, 3, 4, 5, 6]
    reach = long_reach(None, None)
    assert spooled(reach, TimeTarget(at(30))) == [2, 3, 4]


def test_histories_every_one_and_the_tips_required() -> None:
    three = parse_history(3, b"1\t0/3000E18\t\n2\t0/5000000\t\n")
    histories = {**HISTORIES, 3: three}
    segments = [archived(1, 2), archived(2, 3), archived(2, 4), archived(3, 5)]
    window = recovery_window([REAL_BACKUP], segments, histories, SIZE)
    assert window.timeline == 3
    reach = window.reaches[0]
    plan = fetch_plan(reach, LatestTarget(), [5, 3, 2, 1])
    assert [f.spool_name for f in plan.histories] == ["00000002.history", "00000003.history", "00000005.history"]
    assert [f.spool_name for f in plan.segments] == [
        "000000010000000000000002",
        "000000020000000000000003",
        "000000020000000000000004",
        "000000030000000000000005",
    ]
    assert plan.timeline == 3
    with pytest.raises(FetchPlanError, match="timeline 3's history file"):
        fetch_plan(reach, LatestTarget(), [2])


def test_an_unusable_reach_is_refused() -> None:
    window = recovery_window([backup("b", 2, stop_segno=3)], [archived(1, 2)], {}, SIZE)
    with pytest.raises(FetchPlanError, match="cannot become consistent"):
        fetch_plan(window.reaches[0], LatestTarget(), [])


def test_a_partial_is_only_ever_the_last_file() -> None:
    segments = [archived(1, 2), archived(1, 3, partial=True), archived(1, 3)]
    reach = recovery_window([backup("b", 2)], segments, {}, SIZE).reaches[0]
    plan = fetch_plan(reach, LatestTarget(), [])
    assert [f.source for f in plan.segments] == [Segment(1, 2, SIZE), Segment(1, 3, SIZE)]  # the full one wins
    assert isinstance(plan.segments[-1].source, Segment)
    assert ArchivedSegment(Segment(1, 3, SIZE), True) not in reach.run


def test_a_time_after_the_last_commit_recovers_to_the_end_of_the_reach() -> None:
    reach = long_reach(commits(30, 35), commits(40, 45))  # segments 2..4, last commit at 45 s
    assert effective_target(reach, TimeTarget(at(44))) == TimeTarget(at(44))
    assert effective_target(reach, TimeTarget(at(45))) == LatestTarget()  # no commit after it: FATAL otherwise
    assert effective_target(reach, TimeTarget(at(45), inclusive=False)) == TimeTarget(at(45), inclusive=False)
    assert effective_target(reach, TimeTarget(at(46), inclusive=False)) == LatestTarget()
    assert effective_target(reach, NameTarget("rp")) == NameTarget("rp")
    # With a segment whose commits are unknown, a commit after the target may be there: left to PostgreSQL.
    unknown = long_reach(commits(30, 35), None)
    assert effective_target(unknown, TimeTarget(at(100))) == TimeTarget(at(100))
    no_commits = long_reach(CommitSpan(0))
    assert effective_target(no_commits, TimeTarget(at(26))) == LatestTarget()
