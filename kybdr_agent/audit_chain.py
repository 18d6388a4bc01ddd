"""The audit trail's hash chain: how a record is sealed, and how a sequence of lines is checked.

PURE. No files here: ``audit`` reads and writes the segments and feeds their lines to ``ChainChecker`` one at
a time, so the rules that decide "this trail was tampered with" are tested on lists of strings, exhaustively.

Each record carries its position (``seq``, 0, 1, 2 …), the ``hash`` of the record before it (``prev``; a fixed
``GENESIS`` for the first) and its own ``hash``: SHA-256 over its canonical JSON without the ``hash`` field
(keys sorted, no spaces, ASCII). Editing a record changes its hash; removing, inserting or reordering records
breaks the run of ``seq`` or of ``prev``. What a chain without a secret cannot show is a rewrite of everything
after a point (every later hash recomputed) or a cut-off tail: that is why the journal is also shipped to the
repository, whose copy an attacker on this host cannot rewrite unseen.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

GENESIS: Final = "0" * 64
MAX_TEXT: Final = 512  # longer strings in a record are cut: a record is one small line
MAX_RECORD_BYTES: Final = 8 << 10  # a record whose detail is still larger keeps a note instead of the detail
_REQUIRED: Final[Mapping[str, tuple[type, ...]]] = {
    "seq": (int,),
    "at": (str,),
    "host": (str,),
    "caller": (str,),
    "operation": (str,),
    "target": (str, type(None)),
    "outcome": (str,),
    "detail": (dict,),
    "prev": (str,),
    "hash": (str,),
}


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: every field but ``hash``, as canonical JSON."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as plain JSON that reads back identically (so its hash can be recomputed from the line):
    strings cut to ``MAX_TEXT``, non-finite floats and unknown types as text, nesting bounded."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, datetime):
        return iso(value)
    if depth >= 4:
        return str(value)[:MAX_TEXT]
    if isinstance(value, Mapping):
        return {str(key)[:MAX_TEXT]: jsonable(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item, depth + 1) for item in value]
    return str(value)[:MAX_TEXT]


def iso(at: datetime) -> str:
    """A time as the trail writes it: ISO 8601 in UTC (a naive time is taken to be UTC already)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Link:
    """The chain's head: the last record's ``seq`` and ``hash`` (``seq`` -1 and ``GENESIS`` before the first)."""

    seq: int = -1
    hash: str = GENESIS


def seal(
    head: Link,
    *,
    at: datetime,
    host: str,
    caller: str,
    operation: str,
    target: str | None,
    outcome: str,
    detail: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record that follows ``head``, with its ``hash``."""
    record: dict[str, Any] = {
        "seq": head.seq + 1,
        "at": iso(at),
        "host": jsonable(str(host)),
        "caller": jsonable(str(caller)),
        "operation": jsonable(str(operation)),
        "target": None if target is None else jsonable(str(target)),
        "outcome": jsonable(str(outcome)),
        "detail": jsonable(dict(detail or {})),
        "prev": head.hash,
    }
    if len(canonical(record)) > MAX_RECORD_BYTES:
        record["detail"] = {"truncated": True}
    record["hash"] = record_hash(record)
    return record


def encode(record: Mapping[str, Any]) -> bytes:
    """One journal line: the record's fields in their natural order (the hash does not depend on it)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def decode(line: bytes | str) -> dict[str, Any] | None:
    """A line's record, or None when it is not a JSON object."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class Problem:
    """Why a line broke the chain; ``seq`` is the line's own seq when it has one."""

    seq: int | None
    reason: str


def intact_line(line: bytes) -> bool:
    """Whether a line is a record with every field, of the right type, and a hash that matches its contents."""
    record = decode(line)
    return record is not None and _malformed(record) is None and record["hash"] == record_hash(record)


def last_link(tail: bytes) -> Link | None:
    """The chain's head as the last record in ``tail`` (the end of a segment) states it, if any."""
    for line in reversed(tail.splitlines()):
        record = decode(line)
        if record is not None and isinstance(record.get("seq"), int) and isinstance(record.get("hash"), str):
            return Link(record["seq"], record["hash"])
    return None


def parse_at(value: object) -> datetime | None:
    """A record's ``at`` as an aware time, or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _malformed(record: Mapping[str, Any]) -> str | None:
    for name, types in _REQUIRED.items():
        value = record.get(name)
        if name not in record or not isinstance(value, types) or (name == "seq" and isinstance(value, bool)):
            return f"malformed record: {name!r} is missing or of the wrong type"
    return None


class ChainChecker:
    """Feed it the trail's lines in order; the first one that does not follow is a ``Problem``.

    ``where`` names each line (``audit-000001.jsonl line 7``) so a duplicate can point at its twin."""

    def __init__(self) -> None:
        self.head = Link()
        self.checked = 0
        self._where_last: str | None = None

    def check(self, line: bytes | str, *, complete: bool = True, where: str = "") -> Problem | None:
        record = decode(line)
        if record is None:
            if not complete:
                return Problem(None, "truncated: the last line ends mid-record (cut off, or a crash mid-write)")
            return Problem(None, "unparsable line: not a JSON record")
        malformed = _malformed(record)
        if malformed is not None:
            raw = record.get("seq")
            return Problem(raw if isinstance(raw, int) and not isinstance(raw, bool) else None, malformed)
        seq: int = record["seq"]
        if record["hash"] != record_hash(record):
            return Problem(seq, "record edited: its hash does not match its contents")
        expected = self.head.seq + 1
        if seq > expected:
            return Problem(
                seq, f"expected seq {expected}, found {seq}: a record was removed, or the records were reordered"
            )
        if seq < expected:
            if seq == self.head.seq and self._where_last:
                return Problem(seq, f"seq {seq} again (as at {self._where_last}): one of the two was inserted")
            return Problem(seq, f"seq {seq} after seq {self.head.seq}: a record was inserted, or moved back")
        if record["prev"] != self.head.hash:
            before = "the genesis value" if expected == 0 else f"the hash of the record before it (seq {expected - 1})"
            return Problem(seq, f"chain broken: prev is not {before}; one of the two was replaced or inserted")
        self.head = Link(seq, record["hash"])
        self.checked += 1
        self._where_last = where or None
        return None


@dataclass(frozen=True)
class AuditReport:
    """What ``walk`` found: ok, how many records check out, and where the first bad one is and why."""

    ok: bool
    records: int
    segments: int
    file: str | None = None
    line: int | None = None
    seq: int | None = None
    reason: str | None = None


def walk(files: Iterable[tuple[str, Iterable[tuple[bytes, bool]]]], segments: int) -> AuditReport:
    """Check every segment's lines (each with whether it ended in a newline), in order, as one chain."""
    checker = ChainChecker()
    for name, lines in files:
        for number, (line, complete) in enumerate(lines, start=1):
            problem = checker.check(line, complete=complete, where=f"{name} line {number}")
            if problem is not None:
                return AuditReport(False, checker.checked, segments, name, number, problem.seq, problem.reason)
    return AuditReport(True, checker.checked, segments)
