"""A segment's first page against its name (``wal/pageheader.py``), on the first 40 bytes of real segments that
PostgreSQL 15 archived here (system identifier 7714541760408896752, 16 MiB segments)."""

from __future__ import annotations

import struct

import pytest

from kybdr_agent.wal.names import Segment
from kybdr_agent.wal.pageheader import (
    LONG_HEADER_SIZE,
    XLOG_PAGE_MAGIC_PG15,
    SegmentHeaderError,
    check_segment_header,
    read_segment_header,
)

SIZE = 16 << 20
SYSTEM_ID = 7714541760408896752
HEADS = {
    # archive_command's copy of timeline 1's segment 3
    "000000010000000000000003": "10d106000100000000000003000000000000000000000000f0c41692db8e0f6b0000000100200000",
    # timeline 2's first segment: a copy of timeline 1's WAL up to the switch point, its first page timeline 1's
    "000000020000000000000003": "10d106000100000000000003000000000000000000000000f0c41692db8e0f6b0000000100200000",
    "000000020000000000000004": "10d106000200000000000004000000000000000000000000f0c41692db8e0f6b0000000100200000",
    # pg_receivewal's 000000010000000000000004.partial
    "000000010000000000000004": "10d106000100000000000004000000000000000000000000f0c41692db8e0f6b0000000100200000",
}


@pytest.mark.parametrize(("name", "head"), HEADS.items())
def test_real_segment_heads_match_their_names(name: str, head: str) -> None:
    segment = Segment.parse(name, SIZE)
    header = check_segment_header(bytes.fromhex(head) + b"\x00" * 100, segment, system_identifier=SYSTEM_ID)
    assert header.magic == XLOG_PAGE_MAGIC_PG15
    assert header.segment_size == SIZE
    assert header.block_size == 8192
    assert header.page_address == segment.start_lsn
    assert header.timeline <= segment.timeline


def test_a_head_under_another_name_is_refused() -> None:
    head = bytes.fromhex(HEADS["000000010000000000000003"])
    with pytest.raises(SegmentHeaderError, match="first page is at 0/3000000, not 0/4000000"):
        check_segment_header(head, Segment(1, 4, SIZE))
    with pytest.raises(SegmentHeaderError, match="system identifier"):
        check_segment_header(head, Segment(1, 3, SIZE), system_identifier=42)
    with pytest.raises(SegmentHeaderError, match="not 67108864"):
        check_segment_header(head, Segment(1, 0, 64 << 20))
    newer = bytes.fromhex(HEADS["000000020000000000000004"])
    with pytest.raises(SegmentHeaderError, match="of timeline 2"):
        check_segment_header(newer, Segment(1, 4, SIZE))  # a page can't be of a newer timeline than its file
    with pytest.raises(SegmentHeaderError, match="magic 0xd110, expected 0xd113"):
        check_segment_header(head, Segment(1, 3, SIZE), magic=0xD113)
    assert check_segment_header(head, Segment(1, 3, SIZE), magic=None).magic == 0xD110


def test_short_or_not_a_first_page() -> None:
    head = bytearray.fromhex(HEADS["000000010000000000000003"])
    with pytest.raises(SegmentHeaderError, match="40-byte header"):
        read_segment_header(bytes(head[:39]))
    struct.pack_into("<H", head, 2, 0x0001)  # a continuation page's flags, no long header
    with pytest.raises(SegmentHeaderError, match="no long header"):
        check_segment_header(bytes(head), Segment(1, 3, SIZE))
    assert LONG_HEADER_SIZE == 40
