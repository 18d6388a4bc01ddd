"""PURE. The long page header every WAL segment starts with, checked against the segment's name: a file handed
to the archiver under a name is only archived under that name if its first 40 bytes say the same.

The header (``XLogLongPageHeaderData``, ``src/include/access/xlog_internal.h``): magic (the WAL format version,
``0xD110`` in PostgreSQL 15), info flags (``XLP_LONG_HEADER`` set), the timeline of the first record on the
page, the page's own address (the segment's start LSN), the length of a record continued from the previous
segment, padding, then the cluster's system identifier, its segment size and WAL block size. WAL is written
in the server's byte order; this reads little-endian, the order of every platform the agent runs on.

The timeline in the header is *not* always the name's: the first segment of a new timeline begins with a copy
of the parent's WAL up to the switch point, pages headed with the parent's timeline. So the header's timeline
may be lower than the name's, never higher.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from kybdr_agent.wal.names import Segment, WalError, format_lsn

XLOG_PAGE_MAGIC_PG15: Final = 0xD110
XLP_LONG_HEADER: Final = 0x0002
LONG_HEADER_SIZE: Final = 40
_LONG_HEADER: Final = struct.Struct("<HHIQI4xQII")


class SegmentHeaderError(WalError):
    """A segment's first page does not match its name, cluster or PostgreSQL version."""


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    magic: int
    info: int
    timeline: int
    page_address: int
    continuation_length: int
    system_identifier: int
    segment_size: int
    block_size: int


def read_segment_header(head: bytes) -> SegmentHeader:
    if len(head) < LONG_HEADER_SIZE:
        raise SegmentHeaderError(f"a WAL segment starts with a {LONG_HEADER_SIZE}-byte header; got {len(head)} bytes")
    return SegmentHeader(*_LONG_HEADER.unpack_from(head))


def check_segment_header(
    head: bytes,
    segment: Segment,
    *,
    system_identifier: int | None = None,
    magic: int | None = XLOG_PAGE_MAGIC_PG15,
) -> SegmentHeader:
    """The header of ``head`` if it is the first page of ``segment`` (of that cluster, that PostgreSQL)."""
    header = read_segment_header(head)
    name = segment.name
    if magic is not None and header.magic != magic:
        raise SegmentHeaderError(f"{name}: WAL page magic {header.magic:#06x}, expected {magic:#06x}")
    if not header.info & XLP_LONG_HEADER:
        raise SegmentHeaderError(f"{name}: the first page has no long header; not the start of a segment")
    if header.segment_size != segment.size:
        raise SegmentHeaderError(f"{name}: written for {header.segment_size}-byte segments, not {segment.size}")
    if header.page_address != segment.start_lsn:
        raise SegmentHeaderError(
            f"{name}: the first page is at {format_lsn(header.page_address)}, not {format_lsn(segment.start_lsn)}"
        )
    if not 1 <= header.timeline <= segment.timeline:
        raise SegmentHeaderError(f"{name}: the first page is of timeline {header.timeline}")
    if system_identifier is not None and header.system_identifier != system_identifier:
        raise SegmentHeaderError(
            f"{name}: written by the cluster with system identifier {header.system_identifier}, not {system_identifier}"
        )
    return header
