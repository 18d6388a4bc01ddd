"""PURE. Timeline history files, the lineage of a timeline, and which segments recovery reads along it.

A promotion (or the end of a point-in-time recovery) starts a new timeline and writes ``<tli>.history``:
the parent's history copied verbatim, then one line ``parentTLI<TAB>switchpoint<TAB>reason``. Lines whose
first non-blank character is ``#`` are comments, blank lines are skipped (a child's file usually has one,
since PostgreSQL puts a newline before the line it appends), and timelines must increase and stay below the
file's own. That is ``readTimeLineHistory`` in ``src/backend/access/transam/timeline.c``; this parser is
stricter in the fields (decimal timeline, ``%X/%X`` switch point, a tab between them) and also refuses
switch points that go backwards, which PostgreSQL never writes.

The **lineage** of timeline *t* is its history as ranges: each ancestor from where it began (the previous
switch point; the oldest from the beginning of WAL) to where its child branched off, and *t* itself from its
switch point on. A position (timeline, LSN) is on the lineage when the range of that timeline holds the LSN
(``tliOfPointInHistory``).

**Which segment recovery reads.** For segment number *n*, PostgreSQL takes the newest timeline of the
lineage whose first segment is at or before *n* (``XLogFileReadAnyTLI`` in ``xlogrecovery.c``): the segment
holding a switch point comes from the *child* (its first segment begins with a copy of the parent's WAL up
to the switch point), the ones before it from the parent. PostgreSQL falls back to an older timeline's file
when the newer one is missing; a plan made here never does, so a missing segment is a gap, not a silent read
of WAL the parent wrote after the branch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from kybdr_agent.wal.names import (
    MAX_TIMELINE,
    Segment,
    WalError,
    check_lsn,
    check_segment_size,
    check_timeline,
    format_lsn,
    parse_lsn,
)

MAX_HISTORY_BYTES: Final = 1 << 20  # a history file holds one short line per ancestor
_SHOWN: Final = 80


class TimelineError(WalError):
    """A timeline history file is malformed, or a position is not on the lineage asked about."""


@dataclass(frozen=True, slots=True)
class Switch:
    """One line of a history file: the timeline ``parent`` ended at ``switchpoint`` (its child began there)."""

    parent: int
    switchpoint: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class TimelineHistory:
    """A parsed ``<timeline>.history``: every ancestor switch, oldest first. Timeline 1 has none."""

    timeline: int
    switches: tuple[Switch, ...] = ()

    def __post_init__(self) -> None:
        check_timeline(self.timeline)
        previous_parent, previous_point = 0, 0
        for switch in self.switches:
            check_timeline(switch.parent)
            check_lsn(switch.switchpoint)
            if switch.parent <= previous_parent:
                raise TimelineError(f"timeline {self.timeline}'s history: parent timelines do not increase")
            if switch.switchpoint < previous_point:
                raise TimelineError(f"timeline {self.timeline}'s history: switch points go backwards")
            previous_parent, previous_point = switch.parent, switch.switchpoint
        if self.timeline > 1 and not self.switches:
            raise TimelineError(f"timeline {self.timeline}'s history names no parent")
        if self.switches and self.switches[-1].parent >= self.timeline:
            raise TimelineError(f"timeline {self.timeline}'s history names a parent that is not older than it")

    @property
    def parent(self) -> int | None:
        return self.switches[-1].parent if self.switches else None

    def render(self) -> bytes:
        """The file as PostgreSQL would write it from scratch (no comments, no blank lines)."""
        return b"".join(f"{s.parent}\t{format_lsn(s.switchpoint)}\t{s.reason}\n".encode() for s in self.switches)


def _bad(timeline: int, number: int, line: str, why: str) -> TimelineError:
    shown = line if len(line) <= _SHOWN else line[:_SHOWN] + "…"
    return TimelineError(f"timeline {timeline}'s history file, line {number}: {why}: {shown!r}")


def _parse_line(timeline: int, number: int, line: str) -> Switch:
    fields = line.split("\t", 2)
    if len(fields) < 2:
        raise _bad(timeline, number, line, "expected 'parentTLI<TAB>switchpoint<TAB>reason'")
    parent_text, point_text = fields[0], fields[1]
    if not (parent_text.isascii() and parent_text.isdigit()) or len(parent_text) > 10:
        raise _bad(timeline, number, line, "the parent timeline is not a decimal number")
    parent = int(parent_text)
    if not 1 <= parent <= MAX_TIMELINE:
        raise _bad(timeline, number, line, "the parent timeline is out of range")
    try:
        switchpoint = parse_lsn(point_text)
    except WalError:
        raise _bad(timeline, number, line, "the switch point is not an LSN") from None
    return Switch(parent, switchpoint, fields[2] if len(fields) == 3 else "")


def parse_history(timeline: int, content: bytes) -> TimelineHistory:
    """Parse ``<timeline>.history`` as archived. The reason (free text, possibly a restore point's name in the
    server's encoding) is decoded leniently; the numbers are not."""
    check_timeline(timeline)
    if len(content) > MAX_HISTORY_BYTES:
        raise TimelineError(f"timeline {timeline}'s history file is {len(content)} bytes; not a history file")
    if b"\x00" in content:
        raise TimelineError(f"timeline {timeline}'s history file contains a NUL byte; not a history file")
    switches: list[Switch] = []
    for number, raw in enumerate(content.split(b"\n"), start=1):
        line = raw.decode("utf-8", errors="replace").removesuffix("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        switch = _parse_line(timeline, number, line)
        if switches and switch.parent <= switches[-1].parent:
            raise _bad(timeline, number, line, "timelines must increase from line to line")
        if switch.parent >= timeline:
            raise _bad(timeline, number, line, f"a parent timeline must be older than {timeline}")
        if switches and switch.switchpoint < switches[-1].switchpoint:
            raise _bad(timeline, number, line, "the switch point is before the previous one")
        switches.append(switch)
    if timeline > 1 and not switches:
        raise TimelineError(f"timeline {timeline}'s history file names no parent")
    return TimelineHistory(timeline, tuple(switches))


@dataclass(frozen=True, slots=True)
class Span:
    """Where one timeline of a lineage holds: ``begin`` ≤ LSN < ``end`` (``end`` None: open, the tip)."""

    timeline: int
    begin: int
    end: int | None

    def holds(self, lsn: int) -> bool:
        return self.begin <= lsn and (self.end is None or lsn < self.end)


@dataclass(frozen=True, slots=True)
class Lineage:
    """A timeline's history as spans, oldest first; the last span is the timeline itself."""

    spans: tuple[Span, ...]

    @property
    def tip(self) -> int:
        return self.spans[-1].timeline

    @property
    def timelines(self) -> tuple[int, ...]:
        return tuple(span.timeline for span in self.spans)

    def span_of(self, timeline: int) -> Span | None:
        return next((span for span in self.spans if span.timeline == timeline), None)

    def timeline_at(self, lsn: int) -> int:
        """The timeline this lineage was on at ``lsn`` (``tliOfPointInHistory``)."""
        check_lsn(lsn)
        for span in self.spans:
            if span.holds(lsn):
                return span.timeline
        raise TimelineError(f"timeline {self.tip}'s history is not contiguous at {format_lsn(lsn)}")

    def holds(self, timeline: int, lsn: int) -> bool:
        """Whether the position (``timeline``, ``lsn``) is part of this lineage."""
        span = self.span_of(timeline)
        return span is not None and span.holds(lsn)

    def holds_range(self, timeline: int, start: int, end: int) -> bool:
        """Whether all WAL from ``start`` to ``end`` (exclusive) on ``timeline`` is part of this lineage, as a
        base backup's must be for recovery along it to reach consistency."""
        return end > start and self.holds(timeline, start) and self.holds(timeline, end - 1)

    def segment_timeline(self, segno: int, size: int) -> int:
        """The timeline whose file recovery reads for segment number ``segno`` (see the module docstring)."""
        check_segment_size(size)
        chosen = self.spans[0].timeline
        for span in self.spans[1:]:
            if span.begin // size <= segno:
                chosen = span.timeline
        return chosen

    def segments(self, start: int, end: int, size: int) -> list[Segment]:
        """The segments recovery reads for the WAL from ``start`` to ``end`` (exclusive) along this lineage,
        oldest first, each on the timeline PostgreSQL would take it from."""
        check_lsn(start)
        if end <= start:
            raise TimelineError(f"empty WAL range {format_lsn(start)} .. {format_lsn(end)}")
        first, last = start // check_segment_size(size), (end - 1) // size
        return [Segment(self.segment_timeline(segno, size), segno, size) for segno in range(first, last + 1)]


def lineage(timeline: int, history: TimelineHistory | None) -> Lineage:
    """Timeline ``timeline``'s lineage from its history (None only for timeline 1, which has none)."""
    check_timeline(timeline)
    if history is None:
        if timeline != 1:
            raise TimelineError(f"timeline {timeline}'s history file is needed to know its lineage")
        return Lineage((Span(1, 0, None),))
    if history.timeline != timeline:
        raise TimelineError(f"the history of timeline {history.timeline} was given for timeline {timeline}")
    spans: list[Span] = []
    begin = 0
    for switch in history.switches:
        spans.append(Span(switch.parent, begin, switch.switchpoint))
        begin = switch.switchpoint
    spans.append(Span(timeline, begin, None))
    return Lineage(tuple(spans))


def lineage_from(timeline: int, histories: Mapping[int, TimelineHistory]) -> Lineage | None:
    """The lineage of ``timeline`` from the archived histories, or None when its history file is missing."""
    if timeline == 1:
        return lineage(1, None)
    history = histories.get(timeline)
    return lineage(timeline, history) if history is not None else None


def latest_timeline(start: int, history_timelines: Iterable[int]) -> int:
    """The timeline ``recovery_target_timeline = 'latest'`` picks when recovery starts on ``start``: probe
    ``start + 1``, ``start + 2`` … while a history file exists (``findNewestTimeLine``)."""
    available = frozenset(history_timelines)
    newest = check_timeline(start)
    while newest < MAX_TIMELINE and newest + 1 in available:
        newest += 1
    return newest
