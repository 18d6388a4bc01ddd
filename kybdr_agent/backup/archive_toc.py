"""PURE. pg_dump's custom archive (``-Fc``) read as a stream: its header, its table of contents, and how much
data each entry's block holds — without a seekable file, without keeping any table data.

Why read the archive ourselves instead of asking ``pg_restore --list``: ``contents`` must say how big each
table is, which only the data blocks tell (the TOC of a piped dump carries no offsets or lengths), and a
selective restore must decide *before* anything is created which entries belong to the tables asked for,
which needs each entry's dependencies (``--list`` does not show them). Both come from one pass over the
stream the backup decodes to; nothing is written to disk.

The layout (PostgreSQL's ``pg_backup_archiver.c`` ReadHead/ReadToc and ``pg_backup_custom.c``): ``PGDMP``,
version bytes, integer and offset sizes, the format, the compression (an int before 1.15, a byte from 1.15),
the creation time, three strings; then the entry count and the entries; then, for every entry whose offset
flag says it has data, one block — a type byte (1 table data, 3 large objects), the entry's id, and
length-prefixed chunks ending with a zero length (large-object blocks: an OID before each object's chunks,
a zero OID at the end). Integers are a sign byte and ``int_size`` little-endian bytes; strings are an
integer length (-1 for NULL) and the bytes. Versions 1.14–1.16 are read (pg_dump 12–17); others are refused.

Bounded memory: the header and TOC are buffered (up to ``toc_limit``, an error past it); the data blocks
after them are counted as they pass and never kept (``archive_data``). The result does not depend on how
the stream is cut, and an archive that ends early — anywhere, even between two blocks — is an error, never
a partial answer (every entry the TOC says has data must have had its whole block).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from kybdr_agent.backup.archive_data import BlockError, BlockScanner, DataStats, Expected
from kybdr_agent.backup.globals_sql import decode_name

MAGIC: Final = b"PGDMP"
SUPPORTED: Final = ((1, 14), (1, 15), (1, 16))
TOC_LIMIT: Final = 64 << 20
ARCH_CUSTOM: Final = 1
NO_DATA: Final = 3  # K_OFFSET_NO_DATA; 1 (position not set: a piped dump) and 2 (position set) have data
_OFFSET_FLAGS: Final = (1, 2, 3)
_COMPRESSION: Final = {0: "none", 1: "gzip", 2: "lz4", 3: "zstd"}
_ENCODING: Final = re.compile(r"client_encoding\s*=\s*'([^']*)'", re.IGNORECASE)


class ArchiveError(Exception):
    """The stream is not a readable pg_dump custom archive (corrupt, or not one at all)."""


class ArchiveTruncated(ArchiveError):
    """The archive ends before everything its TOC promises."""


class UnsupportedArchive(ArchiveError):
    """A custom archive of a version (or kind) this reader does not know."""


class Section(IntEnum):
    NONE = 1
    PRE_DATA = 2
    DATA = 3
    POST_DATA = 4


@dataclass(frozen=True)
class Header:
    version: tuple[int, int, int]
    int_size: int
    off_size: int
    compression: str  # "none", "gzip", "lz4", "zstd"
    created: str  # the dumping host's local time, as pg_dump wrote it
    database: str
    server_version: str
    pg_dump_version: str

    @property
    def compressed(self) -> bool:
        return self.compression != "none"


@dataclass(frozen=True)
class TocEntry:
    dump_id: int
    desc: str  # "TABLE", "TABLE DATA", "INDEX", "FK CONSTRAINT", …
    tag: str
    namespace: str | None
    owner: str | None
    tablespace: str | None
    section: Section
    dependencies: tuple[int, ...]
    has_data: bool
    defn: str  # the SQL that creates it ("" for none)


@dataclass(frozen=True)
class Archive:
    header: Header
    encoding: str
    entries: tuple[TocEntry, ...]
    data: dict[int, DataStats] = field(default_factory=dict)


class _Short(Exception):
    """Not enough bytes buffered; ``end`` is how many the unit needs at least."""

    def __init__(self, end: int) -> None:
        self.end = end


class _Cursor:
    def __init__(self, buf: bytearray, pos: int, int_size: int) -> None:
        self.buf, self.pos, self.int_size = buf, pos, int_size

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise _Short(end)
        out = bytes(self.buf[self.pos : end])
        self.pos = end
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def integer(self) -> int:
        raw = self.take(1 + self.int_size)
        value = int.from_bytes(raw[1:], "little")
        return -value if raw[0] else value

    def string(self, keep: bool = True) -> bytes | None:
        n = self.integer()
        if n < 0:
            return None
        if n > TOC_LIMIT:
            raise ArchiveError(f"a string of {n} bytes in the table of contents: a corrupt archive")
        if not keep:
            end = self.pos + n
            if end > len(self.buf):
                raise _Short(end)
            self.pos = end
            return b""
        return self.take(n)


def _latin1(raw: bytes | None) -> str | None:
    """Empty strings are as good as none: pg_dump writes "" for "no schema", "no tablespace"."""
    return raw.decode("latin-1") if raw else None


def _decoded(text: str | None, encoding: str) -> str | None:
    return None if text is None else decode_name(text, encoding)


class ArchiveParser:
    """Feed the archive chunk by chunk (``feed``), then ``finish()`` for the whole ``Archive``.

    ``toc`` is set as soon as the table of contents has been read (a caller that only needs it may stop
    there); the data statistics are complete only after ``finish()`` returned."""

    def __init__(self, toc_limit: int = TOC_LIMIT) -> None:
        self._limit = toc_limit
        self._buf = bytearray()
        self._off = 0  # start of the unread part of _buf
        self._need = 0  # do not try the next unit before _buf holds this many bytes
        self._consumed = 0  # header and TOC bytes parsed so far
        self._header: Header | None = None
        self._int_size = 4
        self._count: int | None = None
        self._raw: list[TocEntry] = []  # names as latin-1 text until the archive's encoding is known
        self.toc: Archive | None = None
        self._blocks: BlockScanner | None = None

    # --- header and TOC -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the archive; ``ArchiveError`` on corruption (after which the parser is spent)."""
        if self._blocks is not None:
            try:
                self._blocks.feed(data)
            except BlockError as exc:
                raise ArchiveError(str(exc)) from None
            return
        self._buf += data
        while len(self._buf) >= self._need:
            cursor = _Cursor(self._buf, self._off, self._int_size)
            try:
                toc = self._unit(cursor)
            except _Short as short:
                self._check_limit(self._consumed + short.end - self._off)
                if self._off > 1 << 20 and self._off * 2 > len(self._buf):
                    del self._buf[: self._off]
                    short.end -= self._off
                    self._off = 0
                self._need = short.end
                return
            self._consumed += cursor.pos - self._off
            self._check_limit(self._consumed)
            self._off = cursor.pos
            if toc is not None:
                rest = bytes(self._buf[self._off :])
                self._buf = bytearray()
                self.toc = toc
                self._blocks = BlockScanner(
                    [
                        Expected(
                            e.dump_id,
                            e.desc == "BLOBS",
                            e.desc == "TABLE DATA" and not toc.header.compressed,
                            describe(e),
                        )
                        for e in toc.entries
                        if e.has_data
                    ],
                    self._int_size,
                )
                self.feed(rest)
                return

    @property
    def toc_size(self) -> int | None:
        """How many bytes the header and table of contents take (once ``toc`` is set): the archive's head."""
        return self._consumed if self.toc is not None else None

    def _check_limit(self, size: int) -> None:
        if size > self._limit:
            raise ArchiveError(
                f"the archive's table of contents is larger than {self._limit >> 20} MiB; kybdr-agent reads "
                "tables of contents up to that size"
            )

    def _unit(self, c: _Cursor) -> Archive | None:
        """Read the next piece of the header or TOC; the archive once the TOC is complete."""
        if self._header is None:
            self._header = self._read_header(c)
            self._int_size = self._header.int_size
        elif self._count is None:
            count = c.integer()
            if not 0 <= count <= self._limit // 8:
                raise ArchiveError(f"the table of contents claims {count} entries: a corrupt archive")
            self._count = count
        else:
            self._raw.append(self._read_entry(c))
        return self._build() if self._count is not None and len(self._raw) == self._count else None

    def _read_header(self, c: _Cursor) -> Header:
        if c.take(5) != MAGIC:
            raise ArchiveError("not a pg_dump custom-format archive (no PGDMP signature)")
        version = (c.byte(), c.byte(), c.byte())
        if version[:2] not in SUPPORTED:
            known = ", ".join(f"{a}.{b}" for a, b in SUPPORTED)
            raise UnsupportedArchive(
                f"archive version {version[0]}.{version[1]} is not one kybdr-agent reads ({known}: pg_dump 12 to 17)"
            )
        int_size, off_size, fmt = c.byte(), c.byte(), c.byte()
        if not 1 <= int_size <= 8 or not 1 <= off_size <= 16:
            raise ArchiveError(f"implausible integer/offset sizes {int_size}/{off_size}: a corrupt archive")
        if fmt != ARCH_CUSTOM:
            raise UnsupportedArchive(f"archive format {fmt} is not the custom format (1)")
        c.int_size = int_size
        if version[:2] >= (1, 15):
            algorithm = c.byte()
            compression = _COMPRESSION.get(algorithm, f"unknown ({algorithm})")
        else:
            compression = "none" if c.integer() == 0 else "gzip"
        sec, minute, hour, mday, mon, year, _isdst = (c.integer() for _ in range(7))
        names = [(c.string() or b"").decode("utf-8", "replace") for _ in range(3)]
        return Header(
            version=version,
            int_size=int_size,
            off_size=off_size,
            compression=compression,
            created=f"{year + 1900:04d}-{mon + 1:02d}-{mday:02d} {hour:02d}:{minute:02d}:{sec:02d}",
            database=names[0],
            server_version=names[1],
            pg_dump_version=names[2],
        )

    def _read_entry(self, c: _Cursor) -> TocEntry:
        assert self._header is not None
        dump_id = c.integer()
        if dump_id <= 0:
            raise ArchiveError(f"entry id {dump_id} out of range: a corrupt table of contents")
        c.integer()  # had a data dumper
        c.string(keep=False)  # catalog table oid
        c.string(keep=False)  # oid
        tag, desc = c.string(), c.string()
        section = c.integer()
        if section not in tuple(Section):
            raise ArchiveError(f"entry {dump_id} has section {section}: a corrupt table of contents")
        defn = c.string()
        c.string(keep=False)  # drop statement
        c.string(keep=False)  # COPY statement
        namespace, tablespace = c.string(), c.string()
        c.string(keep=False)  # table access method
        if self._header.version[:2] >= (1, 16):
            c.integer()  # relkind
        owner = c.string()
        c.string(keep=False)  # "false": WITH OIDS
        deps: list[int] = []
        while (dep := c.string()) is not None:
            try:
                deps.append(int(dep))
            except ValueError:
                raise ArchiveError(f"entry {dump_id} has a dependency {dep!r}: a corrupt table of contents") from None
        flag = c.byte()
        if flag not in _OFFSET_FLAGS:
            raise ArchiveError(f"entry {dump_id} has data offset flag {flag}: a corrupt table of contents")
        c.take(self._header.off_size)
        if desc is None or tag is None:
            raise ArchiveError(f"entry {dump_id} has no type or name: a corrupt table of contents")
        return TocEntry(
            dump_id=dump_id,
            desc=desc.decode("latin-1"),
            tag=tag.decode("latin-1"),
            namespace=_latin1(namespace),
            owner=_latin1(owner),
            tablespace=_latin1(tablespace),
            section=Section(section),
            dependencies=tuple(deps),
            has_data=flag != NO_DATA,
            defn=_latin1(defn) or "",
        )

    def _build(self) -> Archive:
        assert self._header is not None
        encoding = "UTF8"
        for entry in self._raw:
            if entry.desc == "ENCODING" and (found := _ENCODING.search(entry.defn)):
                encoding = found.group(1)
        seen: set[int] = set()
        entries: list[TocEntry] = []
        for entry in self._raw:
            if entry.dump_id in seen:
                raise ArchiveError(f"entry id {entry.dump_id} appears twice: a corrupt table of contents")
            seen.add(entry.dump_id)
            entries.append(
                dataclasses.replace(
                    entry,
                    tag=decode_name(entry.tag, encoding),
                    namespace=_decoded(entry.namespace, encoding),
                    owner=_decoded(entry.owner, encoding),
                    tablespace=_decoded(entry.tablespace, encoding),
                    defn=decode_name(entry.defn, encoding),
                )
            )
        self._raw = []
        return Archive(self._header, encoding, tuple(entries))

    def finish(self) -> Archive:
        """The whole archive; ``ArchiveTruncated`` unless every byte it promises has been fed."""
        if self.toc is None or self._blocks is None:
            where = "header" if self._header is None else "table of contents"
            raise ArchiveTruncated(f"the archive ends inside its {where}")
        try:
            data = self._blocks.finish()
        except BlockError as exc:
            raise (ArchiveTruncated if exc.truncated else ArchiveError)(str(exc)) from None
        return dataclasses.replace(self.toc, data=dict(data))


class TocCapture:
    """The archive's head — its header and table of contents, byte for byte — kept from a stream fed to it.

    That head alone is an archive ``pg_restore --section=post-data`` can restore from: post-data entries
    (indexes, constraints, triggers, …) carry no data, so pg_restore never seeks into the data blocks a
    piped archive has no offsets for. Fed until ``complete``; later chunks are ignored without a copy."""

    def __init__(self, toc_limit: int = TOC_LIMIT) -> None:
        self._parser = ArchiveParser(toc_limit)
        self._head = bytearray()
        self.complete = False

    def feed(self, data: bytes) -> None:
        if self.complete:
            return
        self._head += data
        self._parser.feed(data)
        size = self._parser.toc_size
        if size is not None:
            del self._head[size:]
            self.complete = True

    @property
    def head(self) -> bytes:
        if not self.complete:
            raise ArchiveTruncated("the archive ended inside its table of contents")
        return bytes(self._head)


def describe(entry: TocEntry) -> str:
    where = f"{entry.namespace}." if entry.namespace else ""
    return f"{entry.desc} {where}{entry.tag}"


def parse(chunks: Iterable[bytes], *, toc_limit: int = TOC_LIMIT) -> Archive:
    """The whole archive from its chunks, however they are cut."""
    parser = ArchiveParser(toc_limit)
    for chunk in chunks:
        parser.feed(chunk)
    return parser.finish()
