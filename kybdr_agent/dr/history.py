"""The DR history: every transition, intent, step result and operation, append-only, fsynced, kept for good.

The seed asks for "permanent retention of failover history", and the executor's crash safety rests on it:
an intent is written (and on disk) before each side effect and its result after, so an agent killed
mid-failover finds on restart exactly how far it got. Hence:

* JSON lines in one file (``state_dir/dr-history.jsonl``), each line written with one ``write(2)`` and
  fsynced before ``append`` returns; the folder is fsynced when the file is created, so the file itself
  survives a power cut too. Mode 0600 (hosts, LSNs and operators' names are in there).
* ``seq`` numbers records 1, 2, 3… across restarts: the next number is recovered from the last readable
  line. A crash mid-append can leave a torn last line; it is reported (``torn_tail``, a log line) and then
  fenced off by a newline before the next record, so it never glues onto a good one and never stops a
  reader, who skips any unreadable line.
* Several processes may append (the daemon; a one-shot CLI command): each append holds an exclusive
  ``flock`` on the file and re-derives the next ``seq`` when the file changed under it.
* Bounded memory: ``read(limit)`` reads backwards from the end in blocks, so the newest few records cost
  the same whatever the file's size; ``statistics`` and the repository copy stream it forwards.
* Never rotated or truncated here: retention is permanent, and the records are small (a failover writes a
  few dozen lines), so a lifetime of failovers and daily drills stays in megabytes.

``copy_to`` copies the records to the repository (``dr/history/<origin>/…`` objects, see its docstring) —
new immutable objects only, never an overwrite or a delete, which is also all ``terraform/iam.tf`` allows
under ``dr/`` besides the lease.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Final

import anyio

from kybdr_agent.clock import Clock
from kybdr_agent.dr.state_file import StateFileError, fsync_dir, json_default, load_state, save_state
from kybdr_agent.errors import KybdrError
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.telemetry import get_logger

HISTORY_NAME: Final = "dr-history.jsonl"
MAX_RECORD_BYTES: Final = 256 << 10  # one record; a step's detail is a few hundred bytes
BLOCK: Final = 64 << 10  # backwards reads
COPY_MAX_RECORDS: Final = 1000  # one repository object
COPY_MAX_BYTES: Final = 1 << 20
DRILLS: Final = frozenset({"test-failover", "test-failback"})
FILE_MODE: Final = 0o600
log = get_logger("kybdr_agent.dr.history")


class HistoryError(KybdrError):
    """The history file cannot be written or read (the DR executor halts rather than act unrecorded)."""


def _parse(line: bytes) -> dict[str, Any] | None:
    """A record, or None for a blank, torn or foreign line (readers skip those)."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("seq"), int) else None


def _reverse_lines(fh: IO[bytes], end: int) -> Iterator[bytes]:
    """The lines of ``fh[:end]``, last first, reading ``BLOCK`` bytes at a time from the end.

    A line longer than ``MAX_RECORD_BYTES`` cannot be a record (``append`` refuses those), so it is
    skipped without being held in memory: memory stays bounded by the block and one record."""
    pos = end
    carry = b""  # the start of a line whose end was already read (we move towards the file's start)
    skipping = False  # inside an oversized line: drop bytes until the newline before it
    while pos > 0:
        step = min(BLOCK, pos)
        pos -= step
        fh.seek(pos)
        parts = (fh.read(step) + carry).split(b"\n")
        if skipping:
            if len(parts) == 1:
                carry = b""
                continue
            parts = parts[:-1]
            skipping = False
        carry = parts[0]
        yield from reversed(parts[1:])
        if len(carry) > MAX_RECORD_BYTES:
            carry, skipping = b"", True
    if not skipping:
        yield carry


def _forward_records(fh: IO[bytes]) -> Iterator[tuple[dict[str, Any] | None, bytes]]:
    """Every non-blank line with its record (None when unreadable), oldest first, one line at a time
    (an oversized line, which cannot be a record, is not held: its text is given as empty)."""
    for line in fh:
        if len(line) > MAX_RECORD_BYTES + 1:
            yield None, b""
        elif line.strip():
            yield _parse(line), line.rstrip(b"\n")


def _origin_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return cleaned or "agent"


class History:
    """See the module docstring. ``origin`` names this agent's records in the repository copy (default:
    the host name), so the histories of several agents sharing one repository never collide."""

    def __init__(
        self, path: Path, *, clock: Clock, origin: str | None = None, copy_batch_records: int = COPY_MAX_RECORDS
    ) -> None:
        self.path = path
        self.copy_batch_records = max(1, copy_batch_records)  # records per repository object
        self._clock = clock
        self.origin = _origin_name(origin if origin is not None else socket.gethostname())
        self._lock = threading.Lock()  # appends from the event loop and from worker threads
        self._copy_lock = anyio.Lock()
        self._known: tuple[int, int, int] | None = None  # (inode, size, last seq) after our last look
        self.torn_tail = False
        self._inspect()

    @property
    def progress_path(self) -> Path:
        """The sidecar remembering how far ``copy_to`` got."""
        return self.path.with_name(self.path.name + ".copied")

    # --- writing ---------------------------------------------------------------------------------

    def _inspect(self) -> None:
        """Note a torn last line left by a crash (reported once here; readers skip it anyway)."""
        try:
            with open(self.path, "rb") as fh:
                end = fh.seek(0, os.SEEK_END)
                if end and os.pread(fh.fileno(), 1, end - 1) != b"\n":
                    self.torn_tail = True
                    log.warning(
                        "dr.history_torn_line",
                        path=str(self.path),
                        note="the last line was cut by a crash mid-append; it is kept, fenced off and skipped",
                    )
        except FileNotFoundError:
            return
        except OSError as exc:
            raise HistoryError(f"cannot read the DR history {self.path}: {exc.strerror}") from exc

    def _last_seq(self, fd: int, size: int) -> int:
        with os.fdopen(os.dup(fd), "rb") as fh:
            for line in _reverse_lines(fh, size):
                record = _parse(line)
                if record is not None:
                    return int(record["seq"])
        return 0

    def append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record (``entry`` plus ``seq`` and ``at``) and fsync it; returns the record as
        readers will see it. Raises ``HistoryError`` when it could not be made durable."""
        with self._lock:
            try:
                return self._append(entry)
            except OSError as exc:
                raise HistoryError(f"cannot append to the DR history {self.path}: {exc.strerror}") from exc

    def _append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        created = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, FILE_MODE)
            created = True
        except FileExistsError:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another process's append goes wholly before or after ours
            st = os.fstat(fd)
            end = st.st_size
            if self._known is not None and self._known[:2] == (st.st_ino, end):
                last = self._known[2]
            else:
                last = self._last_seq(fd, end)
            record = {
                "seq": last + 1,
                "at": self._clock().isoformat(),
                **{k: v for k, v in entry.items() if k not in ("seq", "at")},
            }
            data = json.dumps(record, default=json_default, separators=(",", ":")).encode()
            if len(data) > MAX_RECORD_BYTES:
                raise HistoryError(f"a DR history record of {len(data)} bytes is over {MAX_RECORD_BYTES}")
            if end and os.pread(fd, 1, end - 1) != b"\n":
                data = b"\n" + data  # a crash tore the last line: never glue this record onto it
            data += b"\n"
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            self._known = (st.st_ino, end + len(data), last + 1)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        parsed: dict[str, Any] = json.loads(data)
        return parsed

    # --- reading ---------------------------------------------------------------------------------

    def _open(self) -> IO[bytes] | None:
        try:
            return open(self.path, "rb")  # the callers close it
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise HistoryError(f"cannot read the DR history {self.path}: {exc.strerror}") from exc

    def records(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        """Every readable record, oldest first, streamed."""
        fh = self._open()
        if fh is None:
            return
        with fh:
            for record, _ in _forward_records(fh):
                if record is not None and (kind is None or record.get("kind") == kind):
                    yield record

    def read(self, limit: int | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` records (all when None) of ``kind`` (any when None), newest last.

        With a limit the file is read backwards from its end, so memory and time follow the limit, not
        the history's length (a kind that is rare may still read far back to find ``limit`` of them)."""
        if limit is None:
            return list(self.records(kind))
        if limit <= 0:
            return []
        fh = self._open()
        if fh is None:
            return []
        found: list[dict[str, Any]] = []
        with fh:
            for line in _reverse_lines(fh, fh.seek(0, os.SEEK_END)):
                record = _parse(line)
                if record is not None and (kind is None or record.get("kind") == kind):
                    found.append(record)
                    if len(found) >= limit:
                        break
        found.reverse()
        return found

    def statistics(self) -> dict[str, Any]:
        """Operation counts and timings, from the ``operation`` records (one per failover, failback or
        drill, written when it ends), streaming the whole file:

        * ``count_by_kind``: operations per kind (``failover``, ``failback``, ``test-failover``, …);
        * ``count_by_trigger`` / ``count_by_outcome``: per kind, by ``trigger`` (manual vs auto) and
          ``outcome`` (succeeded, failed, …) as recorded;
        * ``last``: the last operation record; ``last_drill``: the last test-failover/test-failback one
          (its ``outcome`` is the last drill's outcome);
        * ``time_to_failover_s``: count, mean and worst ``duration_s`` of the failovers that succeeded
          (mean and worst None when there is none);
        * ``records`` and ``unreadable_lines``: the whole file's readable records and skipped lines.
        """
        by_kind: dict[str, int] = {}
        by_trigger: dict[str, dict[str, int]] = {}
        by_outcome: dict[str, dict[str, int]] = {}
        last: dict[str, Any] | None = None
        last_drill: dict[str, Any] | None = None
        durations: list[float] = []
        records = unreadable = 0
        fh = self._open()
        if fh is not None:
            with fh:
                for record, _line in _forward_records(fh):
                    if record is None:
                        unreadable += 1
                        continue
                    records += 1
                    if record.get("kind") != "operation":
                        continue
                    op = str(record.get("operation") or "unknown")
                    by_kind[op] = by_kind.get(op, 0) + 1
                    for table, field in ((by_trigger, "trigger"), (by_outcome, "outcome")):
                        counts = table.setdefault(op, {})
                        value = str(record.get(field) or "unknown")
                        counts[value] = counts.get(value, 0) + 1
                    last = record
                    if op in DRILLS:
                        last_drill = record
                    duration = record.get("duration_s")
                    if (
                        op == "failover"
                        and record.get("outcome") == "succeeded"
                        and isinstance(duration, int | float)
                        and not isinstance(duration, bool)
                        and math.isfinite(duration)
                    ):
                        durations.append(float(duration))
        return {
            "count_by_kind": by_kind,
            "count_by_trigger": by_trigger,
            "count_by_outcome": by_outcome,
            "last": last,
            "last_drill": last_drill,
            "time_to_failover_s": {
                "count": len(durations),
                "mean": sum(durations) / len(durations) if durations else None,
                "worst": max(durations) if durations else None,
            },
            "records": records,
            "unreadable_lines": unreadable,
        }

    # --- the repository copy ---------------------------------------------------------------------

    def _batch(self, after: int, through: int | None) -> tuple[list[bytes], int, int, int]:
        """Raw lines of the records with ``after < seq`` (``<= through`` when given), at most one object's
        worth; and the first and last seq in it, and the file's highest seq (to notice a replaced file)."""
        lines: list[bytes] = []
        first = last = highest = 0
        size = 0
        fh = self._open()
        if fh is None:
            return lines, first, last, highest
        with fh:
            for record, line in _forward_records(fh):
                if record is None:
                    continue
                seq = int(record["seq"])
                highest = max(highest, seq)
                if seq <= after or (through is not None and seq > through):
                    continue
                full = len(lines) >= self.copy_batch_records or (lines and size + len(line) > COPY_MAX_BYTES)
                if full and through is None:
                    continue  # keep reading only to learn the highest seq
                lines.append(line)
                size += len(line) + 1
                first = first or seq
                last = seq
        return lines, first, last, highest

    def _load_progress(self) -> dict[str, Any]:
        try:
            return load_state(self.progress_path) or {}
        except StateFileError as exc:
            log.warning("dr.history_copy_progress_lost", error=str(exc), note="copying again from the start")
            return {}

    async def copy_to(self, store: BlobStore, prefix: str = "dr/history/") -> int:
        """Copy the records not copied yet to ``store``; returns how many were copied by this call.

        Each batch (up to ``copy_batch_records`` records or 1 MiB) becomes one new object
        ``<prefix><origin>/<first seq>-<last seq>-<sha256 prefix>.jsonl`` written with ``put_if_absent``:
        nothing is ever overwritten or deleted. Progress lives in a sidecar file
        (``dr-history.jsonl.copied``), written ahead: the batch about to be uploaded is recorded first, so
        after a crash the same batch (same records, same name) is uploaded again and found already there,
        instead of a differently cut batch overlapping it. The content hash in the name means an object
        of that name can only hold these very bytes. Should the local file be replaced (its highest seq
        below what was copied) or the sidecar be lost, copying restarts from seq 1 into new names; the
        repository may then hold a record twice, which readers fold by ``(origin, seq, at)``.
        """
        base = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        copied = 0
        async with self._copy_lock:
            progress = self._load_progress()
            done = int(progress.get("copied_through") or 0)
            pending = progress.get("pending")
            while True:
                through: int | None = None
                after = done
                if isinstance(pending, dict):
                    after, through = int(pending["first"]) - 1, int(pending["last"])
                lines, first, last, highest = await anyio.to_thread.run_sync(self._batch, after, through)
                if highest < done:
                    log.warning("dr.history_replaced", path=str(self.path), copied_through=done, highest=highest)
                    done, pending = 0, None
                    await anyio.to_thread.run_sync(save_state, self.progress_path, {"copied_through": 0})
                    continue
                if not lines:
                    if pending is not None:  # the pending batch is gone from the file (replaced): drop it
                        pending = None
                        await anyio.to_thread.run_sync(save_state, self.progress_path, {"copied_through": done})
                        continue
                    return copied
                if pending is None:
                    pending = {"first": first, "last": last}
                    await anyio.to_thread.run_sync(
                        save_state, self.progress_path, {"copied_through": done, "pending": pending}
                    )
                body = b"\n".join(lines) + b"\n"
                digest = hashlib.sha256(body).hexdigest()[:16]
                key = f"{base}{self.origin}/{first:012d}-{last:012d}-{digest}.jsonl"
                if await store.put_if_absent(key, body) is None:
                    log.info("dr.history_copy_exists", key=key, note="uploaded before a restart")
                copied += len(lines)
                done, pending = max(done, last), None
                await anyio.to_thread.run_sync(save_state, self.progress_path, {"copied_through": done})


def default_path(state_dir: Path) -> Path:
    return state_dir / HISTORY_NAME
