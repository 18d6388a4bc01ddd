"""PURE. The data blocks that follow a custom archive's table of contents, counted as they stream past.

``archive_toc`` reads the header and the TOC; this scans what comes after: for every entry the TOC says has
data, one block — a type byte (1 table data, 3 large objects), the entry's id, then length-prefixed chunks
ending with a zero length (a large-object block: each object's OID before its chunks, a zero OID at the
end). Nothing is kept but counts, so memory stays flat however large a table is, and it is the hot loop of
``contents`` (pg_dump -Z0 writes one chunk per COPY row): one ``struct`` read and one ``bytes.count`` per
chunk, nothing copied but a field cut by a chunk boundary.

Strict on purpose: a block for an entry without data, a second block for one entry, a wrong block type, a
negative length or a byte after the last block is corruption; ending before every promised block was read
whole is truncation. Either way the caller gets an error, never totals that look complete.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

BLK_DATA: Final = 1
BLK_BLOBS: Final = 3
# pg_dump ends each table's COPY data with the end-marker line and two empty lines: not rows.
END_OF_COPY: Final = b"\\.\n\n\n"
_TAIL: Final = len(END_OF_COPY) + 1


class BlockError(Exception):
    """The data blocks are corrupt (``truncated``: they end before what the TOC promises)."""

    def __init__(self, message: str, *, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


@dataclass
class DataStats:
    """One data block: its payload bytes (compressed bytes if the archive is compressed), the COPY lines in
    it (uncompressed table data only, pg_dump's end marker not counted) and, for large objects, how many."""

    bytes: int = 0
    rows: int = 0
    large_objects: int = 0


@dataclass(frozen=True)
class Expected:
    """An entry whose block must come: its id, whether it holds large objects, whether to count its rows,
    and how to name it in an error."""

    dump_id: int
    blobs: bool
    count_rows: bool
    name: str


def _int_struct(int_size: int) -> struct.Struct:
    return struct.Struct("<B" + {1: "B", 2: "H", 4: "I", 8: "Q"}.get(int_size, f"{int_size}s"))


class BlockScanner:
    def __init__(self, expected: list[Expected], int_size: int) -> None:
        self.stats: dict[int, DataStats] = {}
        self._expect = {e.dump_id: e for e in expected}
        self._int = _int_struct(int_size)
        self._small = bytearray()  # a length, id or OID cut by a chunk boundary
        self._state = "block" if expected else "done"  # block | len | body | oid | done
        self._entry: Expected | None = None
        self._current = DataStats()
        self._count_rows = False
        self._remaining = 0
        self._tail = b""  # the last bytes of the current table's data: its end-of-COPY marker

    def _read_int(self, data: bytes, pos: int) -> int:
        sign, value = self._int.unpack_from(data, pos)
        if isinstance(value, bytes):
            value = int.from_bytes(value, "little")
        return int(-value if sign else value)

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        int_size, unpack = self._int.size, self._int.unpack_from
        while pos < end:
            state = self._state
            if state == "body":
                take = min(self._remaining, end - pos)
                stop = pos + take
                stats = self._current
                stats.bytes += take
                if self._count_rows:
                    stats.rows += data.count(b"\n", pos, stop)
                    self._tail = data[stop - _TAIL : stop] if take >= _TAIL else (self._tail + data[pos:stop])[-_TAIL:]
                pos = stop
                self._remaining -= take
                if self._remaining:
                    continue
                self._state = "len"
                # The hot path, one chunk after another: the next length is whole in this piece of the stream.
                if end - pos >= int_size:
                    sign, length = unpack(data, pos)
                    if not sign and isinstance(length, int) and length > 0:
                        self._remaining = length
                        self._state = "body"
                        pos += int_size
                continue
            if state == "done":
                raise BlockError("bytes follow the archive's last data block: a corrupt archive")
            size = int_size + (1 if state == "block" else 0)
            if self._small or end - pos < size:
                piece = data[pos : pos + size - len(self._small)]
                self._small += piece
                pos += len(piece)
                if len(self._small) < size:
                    return
                whole = bytes(self._small)
                self._small.clear()
                self._field(whole, 0)
            else:
                self._field(data, pos)
                pos += size

    def _field(self, data: bytes, pos: int) -> None:
        state = self._state
        if state == "block":
            self._open(data[pos], self._read_int(data, pos + 1))
            return
        value = self._read_int(data, pos)
        if state == "oid":
            if value == 0:
                self._close()
            else:
                self._current.large_objects += 1
                self._state = "len"
        elif value < 0:
            raise BlockError(f"a data chunk of length {value}: a corrupt archive")
        elif value == 0:
            assert self._entry is not None
            if self._entry.blobs:
                self._state = "oid"
            else:
                self._close()
        else:
            self._remaining = value
            self._state = "body"

    def _open(self, kind: int, dump_id: int) -> None:
        entry = self._expect.get(dump_id)
        if entry is None or dump_id in self.stats:
            why = "a second data block" if dump_id in self.stats else "a data block"
            raise BlockError(f"{why} for entry {dump_id}, which the table of contents gives none: a corrupt archive")
        if kind != (BLK_BLOBS if entry.blobs else BLK_DATA):
            raise BlockError(f"data block type {kind} for {entry.name}: a corrupt archive")
        self._current = self.stats[dump_id] = DataStats()
        self._entry = entry
        self._count_rows = entry.count_rows
        self._tail = b""
        self._state = "oid" if entry.blobs else "len"

    def _close(self) -> None:
        # The marker counts only as a line of its own: a row cannot end in a lone backslash-dot (it is escaped).
        if self._count_rows and self._tail in (END_OF_COPY, b"\n" + END_OF_COPY):
            self._current.rows -= 3
            self._current.bytes -= len(END_OF_COPY)
        self._entry = None
        self._state = "done" if len(self.stats) == len(self._expect) else "block"

    def finish(self) -> dict[int, DataStats]:
        """Every block's counts; ``BlockError(truncated=True)`` unless every promised block was read whole."""
        if self._state == "done":
            return self.stats
        if self._entry is not None:
            raise BlockError(f"the archive ends inside the data of {self._entry.name}", truncated=True)
        missing = [e for i, e in self._expect.items() if i not in self.stats]
        raise BlockError(
            f"the archive ends before the data of {len(missing)} entries (the first: {missing[0].name})",
            truncated=True,
        )
