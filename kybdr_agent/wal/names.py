"""PURE. PostgreSQL's WAL positions and file names: LSNs, segments for any ``wal_segment_size``, partial
segments, timeline history and backup history files — parsed strictly, because a name from a directory
listing, an ``archive_command`` argument or a repository key must never be trusted.

The formats are PostgreSQL's own (``src/include/access/xlog_internal.h``, the same from 11 to 17): a segment
is ``%08X%08X%08X`` of timeline, "log" (``segno / (2³² / size)``) and "seg" (``segno % (2³² / size)``); its
``.partial`` twin is what pg_receivewal streams into and what a promotion leaves of the old timeline's last
segment; ``%08X.history`` is a timeline's history; ``<segment>.%08X.backup`` the backup history file that
``pg_backup_stop`` archives, named by the backup's start segment and the start LSN's offset in it. An LSN is
written ``%X/%X`` (high and low 32 bits), as ``pg_lsn`` reads it: one to eight hex digits on each side.

PostgreSQL's own name checks (``IsXLogFileName`` & co.) look only at length and hex digits. These also refuse
lower-case hex (PostgreSQL never writes it), timeline 0, a "seg" part past the segments of one "log", a
backup-history offset outside the segment, and anything trailing — so two different strings never name the
same file, and a name that parses always formats back to itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

DEFAULT_SEGMENT_SIZE: Final = 16 << 20
MIN_SEGMENT_SIZE: Final = 1 << 20
MAX_SEGMENT_SIZE: Final = 1 << 30
MAX_LSN: Final = (1 << 64) - 1
MAX_TIMELINE: Final = 0xFFFFFFFF

PARTIAL_SUFFIX: Final = ".partial"
HISTORY_SUFFIX: Final = ".history"
BACKUP_SUFFIX: Final = ".backup"

_LSN: Final = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_HEX8: Final = "[0-9A-F]{8}"
_SEGMENT: Final = re.compile(f"({_HEX8})({_HEX8})({_HEX8})")
_PARTIAL: Final = re.compile(f"({_HEX8}{_HEX8}{_HEX8})" + re.escape(PARTIAL_SUFFIX))
_HISTORY: Final = re.compile(f"({_HEX8})" + re.escape(HISTORY_SUFFIX))
_BACKUP: Final = re.compile(f"({_HEX8}{_HEX8}{_HEX8})\\.({_HEX8})" + re.escape(BACKUP_SUFFIX))
_SHOWN: Final = 80  # at most this much of a hostile name goes into an error message


class WalError(ValueError):
    """Base of every error of the ``wal`` package: the input is not what PostgreSQL would write."""


class WalNameError(WalError):
    """An LSN, timeline, segment size or WAL file name is not valid."""


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "…")


def check_lsn(lsn: int) -> int:
    if isinstance(lsn, bool) or not isinstance(lsn, int) or not 0 <= lsn <= MAX_LSN:
        raise WalNameError(f"{lsn!r} is not an LSN (an integer from 0 to 2^64-1)")
    return lsn


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` → ``0x16B374D848``, as ``pg_lsn`` reads it (either case, 1–8 hex digits a side)."""
    match = _LSN.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise WalNameError(f"{_shown(str(text))} is not an LSN (expected the form 16/B374D848)")
    return int(match[1], 16) << 32 | int(match[2], 16)


def format_lsn(lsn: int) -> str:
    """The LSN as PostgreSQL prints it: ``%X/%X``, upper case, no leading zeros (``0/3000E18``)."""
    check_lsn(lsn)
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def check_timeline(timeline: int) -> int:
    if isinstance(timeline, bool) or not isinstance(timeline, int) or not 1 <= timeline <= MAX_TIMELINE:
        raise WalNameError(f"{timeline!r} is not a timeline (an integer from 1 to {MAX_TIMELINE})")
    return timeline


def check_segment_size(size: int) -> int:
    """A ``wal_segment_size`` PostgreSQL accepts: a power of two from 1 MiB to 1 GiB (``IsValidWalSegSize``)."""
    valid = not isinstance(size, bool) and isinstance(size, int) and size > 0 and size & (size - 1) == 0
    if not valid or not MIN_SEGMENT_SIZE <= size <= MAX_SEGMENT_SIZE:
        raise WalNameError(f"{size!r} is not a WAL segment size (a power of two from 1 MiB to 1 GiB)")
    return size


def segments_per_log(size: int) -> int:
    """How many segments one "log" (the middle eight hex digits of a name) holds: ``2³² / size``."""
    return 0x1_0000_0000 // check_segment_size(size)


def max_segno(size: int) -> int:
    return (MAX_LSN + 1) // check_segment_size(size) - 1


@dataclass(frozen=True, order=True, slots=True)
class Segment:
    """One WAL segment: ``timeline``, segment number and the cluster's ``wal_segment_size``.

    Ordered as PostgreSQL's names sort (timeline first); sort by ``segno`` for WAL order."""

    timeline: int
    segno: int
    size: int

    def __post_init__(self) -> None:
        check_timeline(self.timeline)
        limit = max_segno(self.size)
        if isinstance(self.segno, bool) or not isinstance(self.segno, int) or not 0 <= self.segno <= limit:
            raise WalNameError(f"{self.segno!r} is not a segment number (0 to {limit} for {self.size}-byte segments)")

    @classmethod
    def containing(cls, lsn: int, timeline: int, size: int) -> Segment:
        """The segment holding the byte at ``lsn`` (``XLByteToSeg``)."""
        return cls(timeline, check_lsn(lsn) // check_segment_size(size), size)

    @classmethod
    def ending_at(cls, lsn: int, timeline: int, size: int) -> Segment:
        """The segment holding the byte before ``lsn`` (``XLByteToPrevSeg``): where WAL ending at ``lsn`` ends.

        A backup's stop LSN is the end of its backup-end record, so its last segment is ``ending_at(stop)``."""
        if isinstance(lsn, bool) or not isinstance(lsn, int) or not 0 < lsn <= MAX_LSN + 1:
            raise WalNameError(f"{lsn!r} is not the end of any WAL (an integer from 1 to 2^64)")
        return cls(timeline, (lsn - 1) // check_segment_size(size), size)

    @classmethod
    def parse(cls, name: str, size: int) -> Segment:
        """A full segment's name (``000000010000000000000003``); not a partial or any other WAL file."""
        match = _SEGMENT.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            raise WalNameError(f"{_shown(str(name))} is not a WAL segment name (24 upper-case hex digits)")
        timeline, log, seg = (int(part, 16) for part in match.groups())
        per_log = segments_per_log(size)
        if seg >= per_log:
            raise WalNameError(f"{_shown(name)} is not a segment name for {size}-byte segments (seg part ≥ {per_log})")
        if timeline == 0:
            raise WalNameError(f"{_shown(name)} names timeline 0, which does not exist")
        return cls(timeline, log * per_log + seg, size)

    @property
    def name(self) -> str:
        per_log = segments_per_log(self.size)
        return f"{self.timeline:08X}{self.segno // per_log:08X}{self.segno % per_log:08X}"

    @property
    def partial_name(self) -> str:
        return self.name + PARTIAL_SUFFIX

    @property
    def start_lsn(self) -> int:
        return self.segno * self.size

    @property
    def end_lsn(self) -> int:
        """The LSN just past this segment (exclusive; 2⁶⁴ for the very last segment)."""
        return (self.segno + 1) * self.size

    def contains(self, lsn: int) -> bool:
        return self.start_lsn <= lsn < self.end_lsn

    def next(self) -> Segment:
        return Segment(self.timeline, self.segno + 1, self.size)

    def previous(self) -> Segment:
        return Segment(self.timeline, self.segno - 1, self.size)

    def on_timeline(self, timeline: int) -> Segment:
        return Segment(timeline, self.segno, self.size)


@dataclass(frozen=True, slots=True)
class PartialSegment:
    """A segment not known to be complete: pg_receivewal's current file, or the old timeline's last segment
    a promotion leaves. PostgreSQL never asks ``restore_command`` for one by this name."""

    segment: Segment

    @property
    def name(self) -> str:
        return self.segment.partial_name

    @property
    def timeline(self) -> int:
        return self.segment.timeline


@dataclass(frozen=True, slots=True)
class TimelineHistoryFile:
    """``00000002.history``: how timeline 2 branched off its ancestors (parsed by ``wal.timeline``)."""

    timeline: int

    def __post_init__(self) -> None:
        check_timeline(self.timeline)

    @property
    def name(self) -> str:
        return f"{self.timeline:08X}{HISTORY_SUFFIX}"


@dataclass(frozen=True, slots=True)
class BackupHistoryFile:
    """``000000010000000000000002.00000028.backup``: a base backup's start and stop, for information only."""

    segment: Segment
    offset: int

    def __post_init__(self) -> None:
        offset = self.offset
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < self.segment.size:
            raise WalNameError(f"backup start offset {self.offset!r} is outside the segment")

    @classmethod
    def for_start(cls, start_lsn: int, timeline: int, size: int) -> BackupHistoryFile:
        segment = Segment.containing(start_lsn, timeline, size)
        return cls(segment, start_lsn - segment.start_lsn)

    @property
    def name(self) -> str:
        return f"{self.segment.name}.{self.offset:08X}{BACKUP_SUFFIX}"

    @property
    def timeline(self) -> int:
        return self.segment.timeline

    @property
    def start_lsn(self) -> int:
        return self.segment.start_lsn + self.offset


WalFile = Segment | PartialSegment | TimelineHistoryFile | BackupHistoryFile


def parse_wal_file_name(name: str, size: int) -> WalFile:
    """Any file PostgreSQL archives (or pg_receivewal writes), by its exact name; anything else is refused."""
    check_segment_size(size)
    if not isinstance(name, str):
        raise WalNameError(f"{name!r} is not a WAL file name")
    if match := _PARTIAL.fullmatch(name):
        return PartialSegment(Segment.parse(match[1], size))
    if match := _HISTORY.fullmatch(name):
        timeline = int(match[1], 16)
        if timeline == 0:
            raise WalNameError(f"{_shown(name)} names timeline 0, which does not exist")
        return TimelineHistoryFile(timeline)
    if match := _BACKUP.fullmatch(name):
        segment = Segment.parse(match[1], size)
        offset = int(match[2], 16)
        if offset >= size:
            raise WalNameError(f"{_shown(name)}: backup start offset {offset:#x} is past the segment's end")
        return BackupHistoryFile(segment, offset)
    if _SEGMENT.fullmatch(name):
        return Segment.parse(name, size)
    raise WalNameError(
        f"{_shown(name)} is not a WAL file name (a segment, <segment>.partial, <timeline>.history "
        "or <segment>.<offset>.backup, in upper-case hex)"
    )
