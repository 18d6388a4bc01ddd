"""Timeline histories, lineages and the segments recovery reads (``wal/timeline.py``).

The history files are real ones, written by PostgreSQL 15 on this machine: a base backup (timeline 1,
redo 0/2000028) restored to the restore point "rp1" and promoted (timeline 2, switch at 0/3000E18), then the
same backup restored to the end of the WAL along timeline 2 and promoted again (timeline 3, switch 0/5000000,
a segment boundary). That second recovery's log named the files it restored, in order: 00000002.history,
000000010000000000000002, 000000020000000000000003, 000000020000000000000004 — which is what
``Lineage.segments`` must say.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.wal.names import MAX_LSN, Segment, parse_lsn
from kybdr_agent.wal.timeline import (
    Lineage,
    Span,
    Switch,
    TimelineError,
    TimelineHistory,
    latest_timeline,
    lineage,
    lineage_from,
    parse_history,
)

SIZE = 16 << 20
HISTORY_2 = b'1\t0/3000E18\tat restore point "rp1"\n'
HISTORY_3 = b'1\t0/3000E18\tat restore point "rp1"\n\n2\t0/5000000\tno recovery target specified\n'


def names(segments: list[Segment]) -> list[str]:
    return [s.name for s in segments]


def test_real_history_files() -> None:
    two = parse_history(2, HISTORY_2)
    assert two.switches == (Switch(1, 0x3000E18, 'at restore point "rp1"'),)
    assert two.parent == 1
    three = parse_history(3, HISTORY_3)  # the blank line PostgreSQL puts before an appended line is skipped
    assert three.switches == (
        Switch(1, 0x3000E18, 'at restore point "rp1"'),
        Switch(2, 0x5000000, "no recovery target specified"),
    )
    assert parse_history(3, three.render()) == three
    assert lineage(3, three).spans == (Span(1, 0, 0x3000E18), Span(2, 0x3000E18, 0x5000000), Span(3, 0x5000000, None))


def test_the_segments_postgresql_restored() -> None:
    start, stop = parse_lsn("0/2000028"), parse_lsn("0/2000100")
    along_2 = lineage(2, parse_history(2, HISTORY_2))
    # Recovery to the end along timeline 2: the switch segment (3) comes from the child.
    assert names(along_2.segments(start, parse_lsn("0/5000000"), SIZE)) == [
        "000000010000000000000002",
        "000000020000000000000003",
        "000000020000000000000004",
    ]
    along_3 = lineage(3, parse_history(3, HISTORY_3))
    # Timeline 3 began exactly at segment 5's first byte: segment 5 is timeline 3's, 4 still timeline 2's.
    assert names(along_3.segments(start, parse_lsn("0/5000100"), SIZE)) == [
        "000000010000000000000002",
        "000000020000000000000003",
        "000000020000000000000004",
        "000000030000000000000005",
    ]
    assert names(along_3.segments(start, stop, SIZE)) == ["000000010000000000000002"]
    assert along_3.timeline_at(parse_lsn("0/3000E17")) == 1
    assert along_3.timeline_at(parse_lsn("0/3000E18")) == 2
    assert along_3.timeline_at(parse_lsn("0/5000000")) == 3
    assert along_3.holds_range(1, start, stop)
    assert not along_3.holds_range(1, start, parse_lsn("0/3000E19"))  # past timeline 1's end on this lineage
    assert along_3.holds(1, 0)
    assert not along_3.holds(2, 0)
    assert along_3.holds(3, MAX_LSN)


def test_timeline_one_needs_no_history() -> None:
    line = lineage(1, None)
    assert line.spans == (Span(1, 0, None),)
    assert line.tip == 1
    assert lineage_from(1, {}) == line
    assert lineage_from(2, {}) is None
    with pytest.raises(TimelineError, match="history file is needed"):
        lineage(2, None)
    with pytest.raises(TimelineError, match="was given for timeline 3"):
        lineage(3, parse_history(2, HISTORY_2))


def test_comments_blank_lines_and_line_endings() -> None:
    text = b"# made by hand\n\n   \n\t# indented comment\n1\t0/3000E18\r\n2\t0/5000000\treason\twith\ttabs\r\n\n"
    history = parse_history(3, text)
    assert history.switches == (Switch(1, 0x3000E18, ""), Switch(2, 0x5000000, "reason\twith\ttabs"))
    latin1 = parse_history(2, b'1\t0/3000E18\tat restore point "caf\xe9"\n')  # a name in the server's encoding
    assert latin1.switches[0].switchpoint == 0x3000E18
    assert parse_history(1, b"") == TimelineHistory(1)


@pytest.mark.parametrize(
    ("timeline", "content", "message"),
    [
        (2, b"", "names no parent"),
        (2, b"# only a comment\n", "names no parent"),
        (2, b"1 0/3000E18 reason\n", "expected 'parentTLI<TAB>switchpoint<TAB>reason'"),
        (2, b"one\t0/3000E18\treason\n", "not a decimal number"),
        (2, b" 1\t0/3000E18\treason\n", "not a decimal number"),
        (2, b"0\t0/3000E18\treason\n", "out of range"),
        (2, b"99999999999\t0/1\treason\n", "not a decimal number"),
        (2, b"1\t3000E18\treason\n", "not an LSN"),
        (2, b"1\t0/3000E18x\treason\n", "not an LSN"),
        (2, b"2\t0/3000E18\treason\n", "must be older than 2"),
        (3, b"2\t0/3000E18\t\n1\t0/5000000\t\n", "must increase"),
        (3, b"1\t0/5000000\t\n2\t0/3000E18\t\n", "before the previous one"),
        (2, b"1\t0/3000E18\x00\n", "NUL"),
        (2, b"1\t0/1\t" + b"x" * (1 << 20), "not a history file"),
    ],
)
def test_malformed_histories_are_refused(timeline: int, content: bytes, message: str) -> None:
    with pytest.raises(TimelineError, match=message):
        parse_history(timeline, content)


def test_latest_timeline_probes_like_postgresql() -> None:
    # findNewestTimeLine: from the start timeline, step up while <next>.history exists.
    assert latest_timeline(1, []) == 1
    assert latest_timeline(1, [2, 3, 5]) == 3
    assert latest_timeline(4, [2, 3, 5]) == 5
    assert latest_timeline(5, [2, 3, 5]) == 5
    assert latest_timeline(2, {3: None, 4: None}) == 4


# ---------------------------------------------------------------------------------------------------------------
# Properties over generated histories


@st.composite
def histories(draw: st.DrawFn) -> TimelineHistory:
    """A timeline's history: increasing parents, non-decreasing switch points."""
    count = draw(st.integers(0, 6))
    parents = sorted(draw(st.sets(st.integers(1, 40), min_size=count, max_size=count)))
    points = sorted(draw(st.lists(st.integers(0, 40 * SIZE), min_size=count, max_size=count)))
    timeline = parents[-1] + draw(st.integers(1, 3)) if parents else 1
    reasons = draw(st.lists(st.text(st.characters(blacklist_categories=["Cc", "Cs"]), max_size=20), min_size=count))
    return TimelineHistory(
        timeline, tuple(Switch(p, lsn, r) for p, lsn, r in zip(parents, points, reasons, strict=False))
    )


@settings(max_examples=100)
@given(histories())
def test_render_and_parse_round_trip(history: TimelineHistory) -> None:
    assert parse_history(history.timeline, history.render()) == history


def _brute_timeline_at(history: TimelineHistory, lsn: int) -> int:
    for switch in history.switches:
        if lsn < switch.switchpoint:
            return switch.parent
    return history.timeline


@settings(max_examples=120)
@given(histories(), st.data())
def test_lineage_segments_follow_xlogfilereadanytli(history: TimelineHistory, data: st.DataObject) -> None:
    line = lineage(history.timeline, history)
    start = data.draw(st.integers(0, 42 * SIZE), label="start")
    end = data.draw(st.integers(start + 1, 44 * SIZE), label="end")
    segments = line.segments(start, end, SIZE)
    # One segment per number from the start's to the end's, in order, timelines never going back.
    assert [s.segno for s in segments] == list(range(start // SIZE, (end - 1) // SIZE + 1))
    assert all(a.timeline <= b.timeline for a, b in itertools.pairwise(segments))
    for segment in segments:
        # The newest timeline of the lineage that began at or before this segment (XLogFileReadAnyTLI).
        began = [span.timeline for span in line.spans if span.begin // SIZE <= segment.segno]
        assert segment.timeline == max(began)
        # Where a segment's last byte is on the lineage, that timeline (or a newer one branched within the
        # segment, carrying a copy of it) is the one read.
        assert segment.timeline >= _brute_timeline_at(history, segment.end_lsn - 1)
    for lsn in (start, end - 1):
        assert line.timeline_at(lsn) == _brute_timeline_at(history, lsn)


def test_an_empty_range_is_refused() -> None:
    with pytest.raises(TimelineError, match="empty WAL range"):
        Lineage((Span(1, 0, None),)).segments(10, 10, SIZE)
