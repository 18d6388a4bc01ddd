"""The audit trail: who changed what, who was refused, and what the agent did on its own — in a local journal
whose records are hash-chained (``audit_chain``), fsynced, and shipped to the repository.

Why a journal of its own, beside ``journal.py``. The job journal folds old generations away to stay small; an
audit trail must keep every record, in order, so ``verify`` can walk the chain from the first record and say
where it breaks. It stays bounded per file instead: records go to segments (``audit-000001.jsonl`` …) of at
most ``max_bytes``; a full segment is never written again and keeps its name, and the chain runs on across
segments. The repository holds a copy (``audit/<host>/<segment>``) that a person on this host cannot quietly
rewrite: the chain shows local edits, removals, insertions and reorderings; the copy covers what a chain
alone cannot (a cut-off tail, a rewrite of every hash after a point). Shipping never replaces a copy with a
shorter file, so truncating the local journal does not truncate the evidence.

One process writes (the agent, from its event loop: ``append`` is one small ``O_APPEND`` write and an
fsync, like the job journal); the CLI only reads. A restart continues the chain from the last record on
disk. A crash mid-write leaves a torn last line: ``verify`` reports it, and the agent's next start cuts it
off and records that it did (``audit.recover``), so the trail stays verifiable and says what happened.

Which events become records is :mod:`kybdr_agent.audit_events` (``entry_for``, ``audit_subscriber``); its
names are re-exported here.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Generator, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Final

import anyio

from kybdr_agent.audit_chain import (
    MAX_RECORD_BYTES,
    AuditReport,
    Link,
    decode,
    encode,
    intact_line,
    last_link,
    parse_at,
    seal,
    walk,
)
from kybdr_agent.audit_events import REFUSALS_PER_MINUTE as REFUSALS_PER_MINUTE
from kybdr_agent.audit_events import Entry as Entry
from kybdr_agent.audit_events import audit_subscriber as audit_subscriber
from kybdr_agent.audit_events import entry_for as entry_for
from kybdr_agent.clock import Clock, utc_now
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.telemetry import get_logger

log = get_logger("kybdr_agent.audit")

MAX_SEGMENT_BYTES: Final = 1 << 20  # a segment holds a few thousand records; shipping re-sends at most this
REPOSITORY_PREFIX: Final = "audit"
_SEGMENT: Final = re.compile(r"^audit-(\d{6,})\.jsonl$")
_TAIL_BYTES: Final = 4 * MAX_RECORD_BYTES  # enough of a segment's end to hold its last complete record
_MAX_LINE: Final = 2 * MAX_RECORD_BYTES  # a longer "line" is garbage: verify stops reading it there
_UNSAFE_KEY_CHARS: Final = re.compile(r"[^A-Za-z0-9._-]")


def segment_name(number: int) -> str:
    return f"audit-{number:06d}.jsonl"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """The trail's segments, oldest first (other files in the folder are not the trail's)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), directory / name) for name in names if (m := _SEGMENT.match(name))]
    return sorted(found)


def host_key(host: str) -> str:
    """``host`` as one safe repository key segment."""
    cleaned = _UNSAFE_KEY_CHARS.sub("_", host).strip(".")
    return cleaned or "unknown-host"


class AuditTrail:
    """The writer. Construct it once, at startup, in the process that owns ``directory``."""

    def __init__(
        self, directory: Path, *, clock: Clock = utc_now, host: str, max_bytes: int = MAX_SEGMENT_BYTES
    ) -> None:
        self.directory = directory
        self.clock = clock
        self.host = host
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # append (event loop) against snapshot (ship, in a worker thread)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(directory, 0o700)
        self._head, self._number, self._size, torn = _recover(directory, max_bytes)
        if torn is not None:
            name, cut = torn
            log.warning("audit.torn_tail_discarded", segment=name, bytes=cut)
            self.append("agent", "audit.recover", name, "torn tail discarded", {"bytes": cut})

    @property
    def head(self) -> Link:
        return self._head

    def append(
        self,
        caller: str,
        operation: str,
        target: str | None,
        outcome: str,
        detail: Mapping[str, Any] | None = None,
        *,
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """Write one record (write + fsync) and return it; raises OSError when the disk refuses."""
        with self._lock:
            record = seal(
                self._head,
                at=at or self.clock(),
                host=self.host,
                caller=caller,
                operation=operation,
                target=target,
                outcome=outcome,
                detail=detail,
            )
            line = encode(record)
            number = self._number + 1 if self._size >= self.max_bytes else self._number
            path = self.directory / segment_name(number)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                start = os.fstat(fd).st_size
                try:
                    _write_all(fd, line)
                    os.fsync(fd)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)  # no torn line left behind for the next record to follow
                    raise
            finally:
                os.close(fd)
            if start == 0:
                _fsync_dir(self.directory)  # a new segment: make its name durable too
            self._number, self._size = number, start + len(line)
            self._head = Link(record["seq"], record["hash"])
            return record

    def snapshot(self) -> list[tuple[str, Path, int]]:
        """Every segment's name, path and size; the open one's size is its last complete record's end."""
        with self._lock:
            open_name = segment_name(self._number)
            return [
                (name, path, self._size if name == open_name else size) for name, path, size in _sizes(self.directory)
            ]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _recover(directory: Path, max_bytes: int) -> tuple[Link, int, int, tuple[str, int] | None]:
    """Where the chain stands on disk: its head, the open segment's number and size, and a torn tail cut off.

    Only the newest segments' tails are read (a record is at most ``MAX_RECORD_BYTES``), so a start costs
    the same however long the trail is."""
    found = segments(directory)
    if not found:
        return Link(), 1, 0, None
    number, path = found[-1]
    torn: tuple[str, int] | None = None
    with open(path, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        fh.seek(max(0, size - _TAIL_BYTES))
        tail = fh.read()
        if tail and not tail.endswith(b"\n"):
            cut = len(tail) - (tail.rfind(b"\n") + 1)
            if intact_line(tail[-cut:]) or (cut == len(tail) and size > len(tail)):
                # The record was whole, only its newline missing; or this is no torn record but a long run
                # of garbage (verify names it): end the line so the next record starts on its own.
                fh.write(b"\n")
                size += 1
            else:
                size -= cut
                fh.truncate(size)
                tail = tail[:-cut]
                torn = (path.name, cut)
            fh.flush()
            os.fsync(fh.fileno())
    head = last_link(tail)
    for _, older in reversed(found[:-1]):
        if head is not None:
            break
        with open(older, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - _TAIL_BYTES))
            head = last_link(fh.read())
    if head is None:
        if size or len(found) > 1:
            log.error("audit.tail_unreadable", directory=str(directory), segment=path.name)
        head = Link()
    return head, number, size, torn


# --- reading -------------------------------------------------------------------------------------------------


def _lines(fh: IO[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Each line and whether it ended with a newline. A line longer than ``_MAX_LINE`` is no record: it is
    skipped, and a marker that decodes to nothing stands in for it (verify calls it unparsable)."""
    while True:
        line = fh.readline(_MAX_LINE)
        if not line:
            return
        if len(line) >= _MAX_LINE and not line.endswith(b"\n"):
            rest = line
            while rest and not rest.endswith(b"\n"):
                rest = fh.readline(_MAX_LINE)
            yield b"\x00", True
            continue
        yield line, line.endswith(b"\n")


def verify(directory: Path) -> AuditReport:
    """Walk the chain from its first record and report the first line that does not follow."""
    found = segments(directory)

    def files() -> Generator[tuple[str, Iterator[tuple[bytes, bool]]], None, None]:
        for _, path in found:
            with open(path, "rb") as fh:
                yield path.name, _lines(fh)

    with contextlib.closing(files()) as named:
        return walk(named, len(found))


def read(directory: Path, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Every record that parses, oldest first; with ``since``, those at or after it. Lines are streamed."""
    for _, path in segments(directory):
        with open(path, "rb") as fh:
            for line, _ in _lines(fh):
                record = decode(line)
                if record is None:
                    continue
                if since is not None:
                    at = parse_at(record.get("at"))
                    if at is None or at < since:
                        continue
                yield record


# --- shipping ------------------------------------------------------------------------------------------------


async def ship(source: AuditTrail | Path, store: BlobStore, *, host: str | None = None) -> int:
    """Copy the journal's segments to ``audit/<host>/`` in the repository; returns how many were sent.

    What the repository already holds decides what is sent (one listing per call, so a restart re-sends
    nothing): a segment whose copy has its size is skipped, a grown one (the open segment) is sent whole —
    at most ``max_bytes``. A local segment smaller than its copy is never sent: that would erase evidence.
    ``host`` (for a folder; a trail knows its own) defaults to this machine's name."""
    if isinstance(source, AuditTrail):
        directory, host = source.directory, source.host
        snapshot = await anyio.to_thread.run_sync(source.snapshot)
    else:
        directory, host = source, host or os.uname().nodename
        snapshot = await anyio.to_thread.run_sync(_sizes, directory)
    prefix = f"{REPOSITORY_PREFIX}/{host_key(host)}/"
    shipped = {info.key[len(prefix) :]: info.size async for info in store.list_objects(prefix)}
    sent = 0
    for name, path, size in snapshot:
        have = shipped.get(name)
        if have == size:
            continue
        if have is not None and have > size:
            log.warning("audit.ship_shrunk", segment=name, local_bytes=size, shipped_bytes=have)
            continue
        data = await anyio.to_thread.run_sync(_complete_lines, path, size)
        if not data or len(data) == have:
            continue
        await store.put_bytes(prefix + name, data)
        sent += 1
    if sent:
        log.info("audit.shipped", directory=str(directory), segments=sent)
    return sent


def _sizes(directory: Path) -> list[tuple[str, Path, int]]:
    found = []
    for _, path in segments(directory):
        with contextlib.suppress(FileNotFoundError):
            found.append((path.name, path, path.stat().st_size))
    return found


def _complete_lines(path: Path, size: int) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(size)
    return data[: data.rfind(b"\n") + 1]
