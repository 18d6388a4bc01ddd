"""A physical backup's manifest as the WAL code sees it: a ``wal.window.BaseBackup``, and the segments that make
it consistent.

PURE. ``base_backup`` is what the recovery window, the choice of a base backup for a target and WAL
retention take (``wal/window.py``, ``wal/retention.py``); ``consistency_segments`` is what a physical backup
waits for before its manifest is written and what its validation fetches.
"""

from __future__ import annotations

from kybdr_agent.backup.manifest import Manifest, PhysicalInfo
from kybdr_agent.wal.names import Segment, parse_lsn
from kybdr_agent.wal.window import BaseBackup


class NotPhysical(ValueError):
    """A logical backup was given where a physical base backup is needed."""


def physical_info(m: Manifest) -> PhysicalInfo:
    if m.kind != "physical" or m.physical is None:
        raise NotPhysical(f"backup {m.id} is a logical backup of {m.database!r}, not a physical base backup")
    return m.physical


def base_backup(m: Manifest) -> BaseBackup:
    """The window's view of a physical manifest. Its start time is the agent's (``started_at``) and its stop time
    the server's: the earlier of the two starts it, so a clock skew cannot make a backup stop before it began."""
    info = physical_info(m)
    return BaseBackup(
        id=m.id,
        timeline=info.timeline,
        start_lsn=parse_lsn(info.start_lsn),
        stop_lsn=parse_lsn(info.stop_lsn),
        start_time=min(m.started_at, info.stop_time),
        stop_time=info.stop_time,
    )


def consistency_segments(info: PhysicalInfo) -> list[Segment]:
    """The segments from the one holding the start LSN to the one the backup-end record ends in, in order.

    A backup starts and stops on one timeline (``basetar`` refuses a tar whose WAL range spans two), so these
    are that timeline's segments."""
    size = info.wal_segment_size
    first = Segment.containing(parse_lsn(info.start_lsn), info.timeline, size)
    last = Segment.ending_at(parse_lsn(info.stop_lsn), info.timeline, size)
    return [Segment(info.timeline, segno, size) for segno in range(first.segno, last.segno + 1)]
