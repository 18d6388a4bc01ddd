"""An append-only journal of finished jobs (JSON lines, fsynced), the agent's durable memory of outcomes.

Backups that failed leave no manifest, so success rates and "last failure" can only come from here. One
line per finished job; readers tolerate a torn last line (a crash mid-append) by skipping it.

The journal is bounded. ``journal.jsonl`` is rotated once it reaches ``max_bytes`` to ``journal.jsonl.<n>``
(n counts up, never reused), and at most ``keep`` rotated generations stay. When older ones go, what the
readers still need from them is folded into ``journal.jsonl.summary`` first, so no answer changes because
a file was dropped:

* ``counts``: how many records of each kind ended with each status (statistics' success rate);
* ``carried``: the records the readers' "latest of" questions depend on, in their original order — the last
  record of each (kind, status) (the last failed backup, the last drill) and, per backup, its latest
  conclusive full validation when that found it corrupt (retention's "invalid" set).

``records()`` yields the carried records first, then every live generation, oldest first, so a reader that
folds "the latest record wins" gets the same answer as it would from the unbounded journal. ``scan()``
tells carried (already counted) records apart from live ones, for the statistics aggregate.

The summary names the last generation folded into it (``folded_through``): a crash between writing the
summary and deleting the generation leaves a file that readers and the next rotation simply skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

MAX_BYTES: Final = 4 << 20  # rotate at 4 MiB: a few thousand job records
KEEP: Final = 4  # rotated generations kept besides the current file: at most ~20 MiB in all
SUMMARY_FORMAT: Final = 1


def carry_key(record: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a dropped record must still answer, as a key (the last record per key is carried), or None.

    Validations: only a full one that reached a verdict says anything about a backup (see
    ``BackupService._invalid_ids``), and only a "corrupt" verdict must outlive its generation — an "ok"
    one is the same as no verdict. Both get the same key, so a later "ok" replaces an earlier "corrupt".
    """
    kind = record.get("kind")
    if kind == "validate":
        result = record.get("result")
        if not isinstance(result, dict) or result.get("level") != "full" or not result.get("backup_id"):
            return None
        if not (result.get("ok") or result.get("corrupt")):
            return None  # inconclusive (no key, no pg_restore): no verdict
        return ("validate", str(result["backup_id"]))
    return (str(kind), str(record.get("status")))


def _still_needed(record: dict[str, Any]) -> bool:
    if record.get("kind") == "validate":
        result = record.get("result")
        return isinstance(result, dict) and not result.get("ok") and bool(result.get("corrupt"))
    return True


def _parse(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a torn line from a crash mid-append, or garbage
            continue
        if isinstance(record, dict):
            yield record


@dataclass
class Summary:
    """What rotated-out generations left behind (see the module docstring)."""

    folded_through: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    carried: list[dict[str, Any]] = field(default_factory=list)

    def fold(self, records: Iterable[dict[str, Any]]) -> None:
        """Count ``records`` (newly dropped) and keep, of them and the carried ones, what is still needed."""
        last: dict[tuple[Any, ...], dict[str, Any]] = {}
        for record in self.carried:
            key = carry_key(record)
            if key is not None:
                last[key] = record
        for record in records:
            by_status = self.counts.setdefault(str(record.get("kind")), {})
            status = str(record.get("status"))
            by_status[status] = by_status.get(status, 0) + 1
            key = carry_key(record)
            if key is not None:
                last.pop(key, None)  # re-inserted at the end: the dict's order is the records' order
                last[key] = record
        self.carried = [record for record in last.values() if _still_needed(record)]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": SUMMARY_FORMAT,
                "folded_through": self.folded_through,
                "counts": self.counts,
                "carried": self.carried,
            },
            default=str,
            separators=(",", ":"),
        )

    @classmethod
    def load(cls, path: Path) -> Summary:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError):
            return cls()  # unreadable: the live generations still answer; nothing here is worth failing for
        if not isinstance(raw, dict):
            return cls()
        counts = raw.get("counts") if isinstance(raw.get("counts"), dict) else {}
        carried = raw.get("carried") if isinstance(raw.get("carried"), list) else []
        folded = raw.get("folded_through")
        return cls(
            folded_through=folded if isinstance(folded, int) else 0,
            counts={
                str(kind): {str(s): int(n) for s, n in by.items() if isinstance(n, int)}
                for kind, by in (counts or {}).items()
                if isinstance(by, dict)
            },
            carried=[r for r in carried or [] if isinstance(r, dict)],
        )


@dataclass
class Scan:
    """A consistent view of the journal: what was folded away, and the live records (read lazily)."""

    summary: Summary
    live: Iterator[dict[str, Any]]


class Journal:
    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = max(1, keep)
        # Appends (the event loop) and reads (worker threads) share one process: rotation renames files,
        # so a reader opens every generation under this lock and then reads the open files at leisure.
        self._lock = threading.Lock()

    @property
    def summary_path(self) -> Path:
        return self.path.with_name(self.path.name + ".summary")

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                end = os.fstat(fd).st_size
                if end and os.pread(fd, 1, end - 1) != b"\n":
                    line = "\n" + line  # a crash tore the last line: never glue this record onto it
                os.write(fd, line.encode())
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size >= self.max_bytes:
                self._rotate()

    def records(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        """Carried records, then every live record, oldest first (see the module docstring)."""
        scan = self.scan()
        for record in _chain(scan):
            if kind is None or record.get("kind") == kind:
                yield record

    def scan(self) -> Scan:
        with self._lock:
            summary = Summary.load(self.summary_path)
            files: list[IO[str]] = []
            for _, path in self._generations(summary.folded_through):
                with contextlib.suppress(FileNotFoundError):
                    files.append(open(path, encoding="utf-8", errors="replace"))  # noqa: SIM115 - closed below
            with contextlib.suppress(FileNotFoundError):
                files.append(open(self.path, encoding="utf-8", errors="replace"))  # noqa: SIM115 - closed below
        return Scan(summary, _read_all(files))

    # --- rotation (called with the lock held) ---------------------------------------------------

    def _generations(self, after: int = 0) -> list[tuple[int, Path]]:
        """Rotated generations newer than ``after``, oldest first."""
        found: list[tuple[int, Path]] = []
        prefix = self.path.name + "."
        try:
            entries = list(self.path.parent.iterdir())
        except FileNotFoundError:
            return []
        for entry in entries:
            suffix = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
            if suffix.isdigit() and int(suffix) > after:
                found.append((int(suffix), entry))
        return sorted(found)

    def _rotate(self) -> None:
        summary = Summary.load(self.summary_path)
        everything = self._generations()
        number = max([summary.folded_through, *(n for n, _ in everything)]) + 1
        os.replace(self.path, self.path.with_name(f"{self.path.name}.{number}"))
        live = [(n, p) for n, p in self._generations() if n > summary.folded_through]
        dropping = live[: max(0, len(live) - self.keep)]
        if dropping:
            for n, path in dropping:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    summary.fold(_parse(fh))
                summary.folded_through = n
            self._write_summary(summary)
        for n, path in everything:
            if n <= summary.folded_through:
                path.unlink(missing_ok=True)  # folded by an earlier rotation that stopped before deleting
        for _, path in dropping:
            path.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)

    def _write_summary(self, summary: Summary) -> None:
        temp = self.summary_path.with_name(self.summary_path.name + ".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, summary.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.summary_path)


def _chain(scan: Scan) -> Iterator[dict[str, Any]]:
    yield from scan.summary.carried
    yield from scan.live


def _read_all(files: list[IO[str]]) -> Iterator[dict[str, Any]]:
    try:
        for fh in files:
            yield from _parse(fh)
    finally:
        for fh in files:
            fh.close()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
