"""The shipper: WAL files in the spool → the archive (``WalArchive.push``), oldest first, deleted only once
their record is stored.

The spool (``wal.spool_dir``) is where completed WAL files wait: pg_receivewal completes segments there by
renaming ``X.partial`` to ``X`` (stream mode), and ``POST /v1/wal/push`` renames a fsynced temporary from
``.incoming/`` into it (archive_command mode). A file under a WAL name is therefore always complete. The
shipper polls the directory (every ``POLL_SECONDS``, or at once when woken by a push), and keeps up to
``upload_concurrency`` pushes in flight, oldest WAL first (history files before segments: a restore needs a
timeline's history to follow it). A file leaves the spool only after ``push`` returned, and its deletion is
fsynced; an agent killed mid-upload finds the file still there and ships it again, which ``push`` makes
idempotent. A failed push is retried after a bounded, growing pause (``BACKOFF_FIRST`` doubling up to
``BACKOFF_MAX``), for ever: the file is never dropped. A file the archive refuses for good — not what its
name says (``WalRejected``), or a different copy of one already archived (``WalConflict``) — is moved to
``.rejected/`` (kept, never shipped, counted and logged), so one bad file cannot block the rest.

``.partial`` (stream mode): pg_receivewal's segment in progress is never deleted; its current content is
shipped as a partial segment every ``max_partial_age`` seconds when it changed since the last shipment, so
the archive is never more than about that far behind the server even when a segment takes hours to fill.
(In archive_command mode a ``.partial`` is a complete file — what a promotion leaves of the old timeline —
and is shipped once and deleted like any other.)

Memory: each push holds one file and its sealed copy (two segments at most); at most ``upload_concurrency``
pushes run at once. The spool's size is reported every ``REPORT_SECONDS`` (``WalSpoolChecked``), which
raises the ``wal_spool_full`` alert past ``max_spool_bytes``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import anyio
from anyio.abc import TaskGroup, TaskStatus

from kybdr_agent.clock import Clock
from kybdr_agent.telemetry import get_logger
from kybdr_agent.wal.archive import WalArchive, WalConflict, WalRejected
from kybdr_agent.wal.names import (
    BackupHistoryFile,
    PartialSegment,
    Segment,
    TimelineHistoryFile,
    WalError,
    WalFile,
    parse_wal_file_name,
)
from kybdr_agent.wal.records import CommitTimes
from kybdr_agent.wal.sealing import fsync_dir
from kybdr_agent.wal.status import ShipperState, WalSpoolChecked

POLL_SECONDS: Final = 0.2
REPORT_SECONDS: Final = 5.0
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 60.0
INCOMING: Final = ".incoming"
REJECTED: Final = ".rejected"
log = get_logger("kybdr_agent.wal")

CommitReader = Callable[[str, bytes], Awaitable[CommitTimes | None]]


@dataclass(frozen=True, slots=True)
class SpoolFile:
    name: str
    size: int
    file: WalFile


@dataclass(frozen=True, slots=True)
class SpoolScan:
    files: list[SpoolFile]  # in WAL order, oldest first
    total_bytes: int  # every regular file, .incoming included: what the spool occupies
    unknown: list[str]  # names that are no WAL file (left alone, logged once)


def wal_order(file: WalFile) -> tuple[int, int, int, int]:
    """Oldest first: every timeline history, then segments by position (a backup history file after its
    segment; a partial before the full segment of the same number), timeline breaking ties."""
    if isinstance(file, TimelineHistoryFile):
        return (0, file.timeline, 0, 0)
    if isinstance(file, PartialSegment):
        return (1, file.segment.segno, file.timeline, 0)
    if isinstance(file, Segment):
        return (1, file.segno, file.timeline, 1)
    assert isinstance(file, BackupHistoryFile)
    return (1, file.segment.segno, file.timeline, 2)


def scan_spool(spool_dir: Path, segment_size: int) -> SpoolScan:
    """The spool's WAL files in WAL order (blocking: run in a worker thread)."""
    files: list[SpoolFile] = []
    unknown: list[str] = []
    total = 0
    for directory in (spool_dir, spool_dir / INCOMING):
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                size = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # shipped and deleted, or renamed, meanwhile
                continue
            total += size
            if directory != spool_dir or entry.name.startswith("."):
                continue
            try:
                files.append(SpoolFile(entry.name, size, parse_wal_file_name(entry.name, segment_size)))
            except WalError:
                unknown.append(entry.name)
    files.sort(key=lambda f: wal_order(f.file))
    return SpoolScan(files, total, unknown)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _set_aside(path: Path, rejected_dir: Path) -> Path:
    rejected_dir.mkdir(mode=0o700, exist_ok=True)
    target = rejected_dir / f"{path.name}.{int(time.time())}"
    os.rename(path, target)
    fsync_dir(path.parent)
    fsync_dir(rejected_dir)
    return target


@dataclass
class _Partial:
    due: float  # monotonic time of the next shipment (if the content changed)
    shipped_sha256: str | None = None


class Shipper:
    def __init__(
        self,
        spool_dir: Path,
        archive: WalArchive,
        *,
        source: Literal["stream", "archive_command"],
        upload_concurrency: int,
        max_partial_age: float,
        max_spool_bytes: int,
        clock: Clock,
        commit_reader: CommitReader | None = None,
        on_report: Callable[[WalSpoolChecked], None] | None = None,
    ) -> None:
        self.spool_dir = spool_dir
        self.archive = archive
        self.source: Literal["stream", "archive_command"] = source
        self.live_partials = source == "stream"
        self.upload_concurrency = upload_concurrency
        self.max_partial_age = max_partial_age
        self.max_spool_bytes = max_spool_bytes
        self.clock = clock
        self.commit_reader = commit_reader
        self.on_report = on_report
        self.state = ShipperState()
        self._wake = anyio.Event()
        self._in_flight: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._partials: dict[str, _Partial] = {}
        self._unknown_logged: set[str] = set()
        self._next_report = 0.0

    def wake(self, name: str | None = None) -> None:
        """A file arrived (``on_spooled``); safe to call from the event loop at any time."""
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await anyio.to_thread.run_sync(lambda: self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True))
        task_status.started()
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    await self.tick(tg)
                except OSError as exc:  # the spool unreadable for a moment: said, and looked at again
                    self._failed("(spool)", f"cannot read the spool {self.spool_dir}: {exc.strerror or exc}")
                    log.warning("wal.spool_unreadable", error=self.state.last_error)
                    await anyio.sleep(BACKOFF_MAX / 4)
                with anyio.move_on_after(POLL_SECONDS):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def tick(self, tg: TaskGroup) -> None:
        """One look at the spool: start what may start, report the spool's size when it is time."""
        scan = await anyio.to_thread.run_sync(scan_spool, self.spool_dir, self.archive.segment_size)
        now = time.monotonic()
        present = {f.name for f in scan.files}
        for name in set(self._retry_at) - present:
            self._retry_at.pop(name, None)
            self._failures.pop(name, None)
        for name in set(self._partials) - present:
            del self._partials[name]
        for name in scan.unknown:
            if name not in self._unknown_logged and len(self._unknown_logged) < 1000:
                self._unknown_logged.add(name)
                log.warning("wal.spool_unknown_file", spool=str(self.spool_dir), file=name[:120], note="left alone")
        waiting = [f for f in scan.files if not (self.live_partials and isinstance(f.file, PartialSegment))]
        for spooled in scan.files:
            if len(self._in_flight) >= self.upload_concurrency:
                break
            if spooled.name in self._in_flight or self._retry_at.get(spooled.name, 0.0) > now:
                continue
            if self.live_partials and isinstance(spooled.file, PartialSegment):
                track = self._partials.setdefault(spooled.name, _Partial(due=now + self.max_partial_age))
                if track.due > now:
                    continue
                track.due = now + self.max_partial_age
            self._in_flight.add(spooled.name)
            tg.start_soon(self._ship, spooled)
        state = self.state
        state.spool_bytes, state.spool_files = scan.total_bytes, len(waiting)
        state.oldest = waiting[0].name if waiting else None
        state.waiting_retry = sum(1 for at in self._retry_at.values() if at > now)
        state.heartbeat = anyio.current_time()
        if now >= self._next_report and self.on_report is not None:
            self._next_report = now + REPORT_SECONDS
            self.on_report(
                WalSpoolChecked(
                    at=self.clock(),
                    spool_dir=str(self.spool_dir),
                    spool_bytes=scan.total_bytes,
                    max_spool_bytes=self.max_spool_bytes,
                    files=len(waiting),
                    oldest=state.oldest,
                    last_error=state.last_error,
                )
            )

    async def _ship(self, spooled: SpoolFile) -> None:
        path = self.spool_dir / spooled.name
        live_partial = self.live_partials and isinstance(spooled.file, PartialSegment)
        track = self._partials.get(spooled.name)
        digest: str | None = None
        try:
            data = await anyio.to_thread.run_sync(_read, path)
            if data is None:  # gone: completed (renamed) by pg_receivewal, or shipped by an earlier round
                return
            if live_partial:
                digest = await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
                if track is not None and track.shipped_sha256 == digest:
                    return  # unchanged since its last shipment
            commits = await self._commits(spooled, data)
            record = await self.archive.push(spooled.name, data, source=self.source, commits=commits)
            if live_partial:
                if track is not None:
                    track.shipped_sha256 = digest
                self.state.partials_shipped += 1
            else:
                await anyio.to_thread.run_sync(_remove, path)
                self.state.files_shipped += 1
            self._shipped(spooled.name, len(data))
            log.debug("wal.shipped", file=spooled.name, stored_bytes=record.stored_bytes)
        except (WalRejected, WalConflict) as exc:
            self._failed(spooled.name, str(exc))
            if live_partial:
                log.warning("wal.partial_refused", file=spooled.name, error=str(exc), note="retried when it changes")
                if track is not None:
                    track.shipped_sha256 = digest
                return
            try:
                where = await anyio.to_thread.run_sync(_set_aside, path, self.spool_dir / REJECTED)
            except OSError as move_error:
                self._retry_later(spooled.name, f"cannot set the refused file aside: {move_error}")
                return
            self.state.rejected += 1
            log.error("wal.file_rejected", file=spooled.name, error=str(exc), kept_as=str(where))  # noqa: TRY400
        except Exception as exc:  # noqa: BLE001 - the file stays in the spool and is retried; never lost
            self._retry_later(spooled.name, str(exc) or type(exc).__name__)
        finally:
            self._in_flight.discard(spooled.name)
            self._wake.set()

    async def _commits(self, spooled: SpoolFile, data: bytes) -> CommitTimes | None:
        if self.commit_reader is None or not isinstance(spooled.file, Segment | PartialSegment):
            return None
        try:
            return await self.commit_reader(spooled.name, data)
        except Exception as exc:  # noqa: BLE001 - commit times are optional; the file is archived without them
            log.warning("wal.commit_times_unread", file=spooled.name, error=str(exc)[:300])
            return None

    def _retry_later(self, name: str, error: str) -> None:
        failures = self._failures.get(name, 0) + 1
        self._failures[name] = failures
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
        self._retry_at[name] = time.monotonic() + delay
        self._failed(name, error)
        log.warning("wal.ship_failed", file=name, error=self.state.last_error, attempt=failures, retry_in=delay)

    def _shipped(self, name: str, size: int) -> None:
        self._retry_at.pop(name, None)
        self._failures.pop(name, None)
        state = self.state
        state.bytes_shipped += size
        state.last_shipped, state.last_shipped_at = name, self.clock()

    def _failed(self, name: str, error: str) -> None:
        self.state.last_error = f"{name}: {error}"[:500]
        self.state.last_error_at = self.clock()
