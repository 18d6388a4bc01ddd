"""WAL names and positions (``wal/names.py``) against PostgreSQL 15's own answers, strictness on hostile names,
and round trips for every segment size PostgreSQL allows.

The fixed examples were taken from real PostgreSQL 15 clusters on this machine (initdb ``--wal-segsize`` 1, 16,
64 and 1024): ``pg_walfile_name(lsn)`` — which names the segment holding the byte *before* ``lsn``
(``XLByteToPrevSeg``), i.e. ``Segment.ending_at`` — and the files an ``archive_command`` and pg_receivewal left.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.wal.names import (
    DEFAULT_SEGMENT_SIZE,
    MAX_LSN,
    MAX_TIMELINE,
    BackupHistoryFile,
    PartialSegment,
    Segment,
    TimelineHistoryFile,
    WalError,
    WalNameError,
    check_segment_size,
    check_timeline,
    format_lsn,
    max_segno,
    parse_lsn,
    parse_wal_file_name,
    segments_per_log,
)

MIB = 1 << 20
SIZE = DEFAULT_SEGMENT_SIZE
VALID_SIZES = [1 << shift for shift in range(20, 31)]

# (wal_segment_size, lsn, pg_walfile_name(lsn)) from PostgreSQL 15.
PG_WALFILE_NAME = [
    (16 * MIB, "0/3000DB0", "000000010000000000000003"),
    (16 * MIB, "0/3000000", "000000010000000000000002"),
    (16 * MIB, "0/2FFFFFF", "000000010000000000000002"),
    (16 * MIB, "0/1", "000000010000000000000000"),
    (16 * MIB, "16/B374D848", "0000000100000016000000B3"),
    (16 * MIB, "16/b374d848", "0000000100000016000000B3"),
    (16 * MIB, "FFFFFFFF/FFFFFFFF", "00000001FFFFFFFF000000FF"),
    (16 * MIB, "1/0", "0000000100000000000000FF"),
    (16 * MIB, "0/FFFFFFFF", "0000000100000000000000FF"),
    (16 * MIB, "1/FF000000", "0000000100000001000000FE"),
    (1 * MIB, "0/3000DB0", "000000010000000000000030"),
    (1 * MIB, "0/3000000", "00000001000000000000002F"),
    (1 * MIB, "16/B374D848", "000000010000001600000B37"),
    (1 * MIB, "FFFFFFFF/FFFFFFFF", "00000001FFFFFFFF00000FFF"),
    (1 * MIB, "1/0", "000000010000000000000FFF"),
    (64 * MIB, "0/3000DB0", "000000010000000000000000"),
    (64 * MIB, "16/B374D848", "00000001000000160000002C"),
    (64 * MIB, "FFFFFFFF/FFFFFFFF", "00000001FFFFFFFF0000003F"),
    (64 * MIB, "2/C0000000", "00000001000000020000002F"),
    (1024 * MIB, "16/B374D848", "000000010000001600000002"),
    (1024 * MIB, "FFFFFFFF/FFFFFFFF", "00000001FFFFFFFF00000003"),
    (1024 * MIB, "1/0", "000000010000000000000003"),
    (1024 * MIB, "2/C0000000", "000000010000000200000002"),
]


@pytest.mark.parametrize(("size", "lsn", "name"), PG_WALFILE_NAME)
def test_segment_names_match_postgresql(size: int, lsn: str, name: str) -> None:
    segment = Segment.ending_at(parse_lsn(lsn), 1, size)
    assert segment.name == name
    assert Segment.parse(name, size) == segment


def test_the_files_of_a_real_archive() -> None:
    # An archive_command folder and a pg_receivewal folder after a base backup (START WAL LOCATION 0/2000028,
    # STOP WAL LOCATION 0/2000100, both "file 000000010000000000000002") and a promotion to timeline 2.
    start, stop = parse_lsn("0/2000028"), parse_lsn("0/2000100")
    assert Segment.containing(start, 1, SIZE).name == "000000010000000000000002"
    assert Segment.ending_at(stop, 1, SIZE).name == "000000010000000000000002"
    backup = parse_wal_file_name("000000010000000000000002.00000028.backup", SIZE)
    assert backup == BackupHistoryFile.for_start(start, 1, SIZE)
    assert isinstance(backup, BackupHistoryFile)
    assert backup.start_lsn == start
    assert parse_wal_file_name("00000002.history", SIZE) == TimelineHistoryFile(2)
    partial = parse_wal_file_name("000000010000000000000004.partial", SIZE)
    assert partial == PartialSegment(Segment(1, 4, SIZE))
    assert parse_wal_file_name("000000020000000000000003", SIZE) == Segment(2, 3, SIZE)


def test_lsn_parsing_and_formatting() -> None:
    assert parse_lsn("16/B374D848") == 0x16_B374_D848
    assert parse_lsn("0/0") == 0
    assert parse_lsn("FFFFFFFF/FFFFFFFF") == MAX_LSN
    assert parse_lsn("00000000/00000001") == 1  # pg_lsn accepts up to eight digits, leading zeros included
    assert format_lsn(0x3000E18) == "0/3000E18"
    assert format_lsn(MAX_LSN) == "FFFFFFFF/FFFFFFFF"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1",
        "1/",
        "/1",
        "123456789/0",
        "0/123456789",
        "0x1/0",
        " 0/1",
        "0/1 ",
        "0/1\n",
        "g/0",
        "1/2/3",
        "+1/2",
        "-1/2",
        "٣/0",
        "0/１",
    ],  # non-ASCII digits: not hex to PostgreSQL
)
def test_bad_lsns_are_refused(text: str) -> None:
    with pytest.raises(WalNameError, match="is not an LSN"):
        parse_lsn(text)


@pytest.mark.parametrize("value", [-1, MAX_LSN + 1, True, 1.0, "0/1"])
def test_bad_lsn_values_are_refused(value: object) -> None:
    with pytest.raises(WalNameError):
        format_lsn(value)  # type: ignore[arg-type]


@given(st.integers(0, MAX_LSN))
def test_lsn_round_trip(lsn: int) -> None:
    text = format_lsn(lsn)
    assert parse_lsn(text) == lsn
    assert parse_lsn(text.lower()) == lsn
    assert re.fullmatch(r"(0|[1-9A-F][0-9A-F]{0,7})/(0|[1-9A-F][0-9A-F]{0,7})", text)


def test_segment_sizes_exhaustively() -> None:
    for shift in range(0, 34):
        size = 1 << shift
        if 20 <= shift <= 30:
            assert check_segment_size(size) == size
            assert segments_per_log(size) == (1 << 32) >> shift
        else:
            with pytest.raises(WalNameError, match="not a WAL segment size"):
                check_segment_size(size)
    for size in (3 * MIB, 16 * MIB + 1, 0, -16 * MIB, True):
        with pytest.raises(WalNameError):
            check_segment_size(size)


def test_timelines() -> None:
    assert check_timeline(1) == 1
    assert check_timeline(MAX_TIMELINE) == MAX_TIMELINE
    for bad in (0, -1, MAX_TIMELINE + 1, True):
        with pytest.raises(WalNameError):
            check_timeline(bad)


@pytest.mark.parametrize("size", VALID_SIZES)
def test_neighbours_across_a_log_boundary(size: int) -> None:
    per_log = segments_per_log(size)
    last_of_log = Segment(3, per_log - 1, size)
    assert last_of_log.name == f"00000003{0:08X}{per_log - 1:08X}"
    assert last_of_log.next().name == f"00000003{1:08X}{0:08X}"
    assert last_of_log.next().previous() == last_of_log
    assert last_of_log.end_lsn == last_of_log.next().start_lsn == per_log * size == 1 << 32
    assert Segment(1, max_segno(size), size).end_lsn == MAX_LSN + 1
    with pytest.raises(WalNameError):
        Segment(1, 0, size).previous()
    with pytest.raises(WalNameError):
        Segment(1, max_segno(size), size).next()


@settings(max_examples=150)
@given(
    size=st.sampled_from(VALID_SIZES),
    timeline=st.integers(1, MAX_TIMELINE),
    data=st.data(),
)
def test_segment_round_trips(size: int, timeline: int, data: st.DataObject) -> None:
    segno = data.draw(st.integers(0, max_segno(size)), label="segno")
    segment = Segment(timeline, segno, size)
    assert Segment.parse(segment.name, size) == segment
    assert parse_wal_file_name(segment.name, size) == segment
    assert parse_wal_file_name(segment.partial_name, size) == PartialSegment(segment)
    assert segment.contains(segment.start_lsn)
    assert segment.contains(segment.end_lsn - 1)
    assert Segment.containing(segment.start_lsn, timeline, size) == segment
    assert Segment.ending_at(segment.end_lsn, timeline, size) == segment
    offset = data.draw(st.integers(0, size - 1), label="offset")
    backup = BackupHistoryFile(segment, offset)
    assert parse_wal_file_name(backup.name, size) == backup
    # The name is PostgreSQL's XLogFileName: %08X%08X%08X of timeline, segno / per log, segno % per log.
    per_log = 0x1_0000_0000 // size
    assert segment.name == "%08X%08X%08X" % (timeline, segno // per_log, segno % per_log)  # noqa: UP031


@pytest.mark.parametrize(
    "name",
    [
        "",
        "000000010000000000000003 ",
        " 000000010000000000000003",
        "000000010000000000000003\n",
        "00000001000000000000000a",  # PostgreSQL writes upper case only
        "00000001000000000000003",  # 23 digits
        "0000000100000000000000030",  # 25 digits
        "000000000000000000000003",  # timeline 0
        "000000010000000000000100",  # seg part 0x100 >= 256 segments of 16 MiB per log
        "000000010000000000000003.partial.tmp",
        "000000010000000000000003.PARTIAL",
        ".000000010000000000000003",
        "../000000010000000000000003",
        "000000010000000000000003/..",
        "00000000.history",
        "0000002.history",
        "00000002.History",
        "00000002.history.partial",
        "000000010000000000000002.00000028",
        "000000010000000000000002.0000028.backup",
        "000000010000000000000002.01000000.backup",  # offset past a 16 MiB segment
        "000000010000000000000002.backup",
        "000000010000000000000003.partial.partial",
        "ＡＢ",
    ],
)
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(WalNameError) as caught:
        parse_wal_file_name(name, SIZE)
    assert isinstance(caught.value, WalError)
    assert isinstance(caught.value, ValueError)


def test_a_long_hostile_name_is_shortened_in_the_message() -> None:
    with pytest.raises(WalNameError) as caught:
        parse_wal_file_name("x" * 10_000, SIZE)
    assert len(str(caught.value)) < 300


def _mutations() -> st.SearchStrategy[tuple[str, int]]:
    """Valid names of every kind with one character replaced, inserted or deleted."""

    @st.composite
    def mutated(draw: st.DrawFn) -> tuple[str, int]:
        size = draw(st.sampled_from(VALID_SIZES))
        segment = Segment(draw(st.integers(1, 40)), draw(st.integers(0, 5000)), size)
        names = [segment.name, segment.partial_name, TimelineHistoryFile(segment.timeline).name]
        names.append(BackupHistoryFile(segment, draw(st.integers(0, size - 1))).name)
        name = draw(st.sampled_from(names))
        at = draw(st.integers(0, len(name)))
        char = draw(st.sampled_from("0123456789ABCDEFaf.p/ \n"))
        how = draw(st.sampled_from(["replace", "insert", "delete"]))
        if how == "insert":
            return name[:at] + char + name[at:], size
        if how == "delete" or at == len(name):
            return name[: max(at - 1, 0)] + name[at:], size
        return name[:at] + char + name[at + 1 :], size

    return mutated()


@settings(max_examples=300)
@given(_mutations())
def test_a_name_that_parses_formats_back_to_itself(case: tuple[str, int]) -> None:
    name, size = case
    try:
        parsed = parse_wal_file_name(name, size)
    except WalNameError:
        return
    assert parsed.name == name
