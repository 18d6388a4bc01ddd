"""What a physical base backup is, read from pg_basebackup's tar as it streams past: where its WAL starts and
ends, on which timeline, of which cluster — and that the tar is whole.

PURE. ``BaseTarReader.feed`` takes the tar in chunks of any size (the backup pump's worker thread calls it
with each chunk before compressing it; validation calls it with each decoded chunk) and keeps only headers
and three small files; memory is bounded whatever the cluster's size.

**Why the tar, not pg_basebackup's ``-v`` messages.** The messages ("write-ahead log end point: 0/2000100")
are translated under ``LC_MESSAGES`` and only reach a caller that keeps stderr; the tar is what was stored.
Three members say everything (PostgreSQL 15, ``-D - -Ft``: the server's tar with the backup manifest
injected by pg_basebackup as the last member):

* ``backup_label``: ``START WAL LOCATION`` (where replay starts), ``START TIMELINE``, ``BACKUP FROM``;
* ``backup_manifest``: its ``WAL-Ranges`` — the timeline(s) and the ``End-LSN``, the end of the backup-end
  record, which replay must reach to be consistent. Only its tail is kept (``MANIFEST_TAIL_BYTES``: the file
  list before it grows with the cluster), and the whole manifest is checked against its own
  ``Manifest-Checksum`` (SHA-256 of everything up to the line that holds it, as pg_verifybackup checks it),
  so the range read is the one PostgreSQL wrote;
* ``global/pg_control``: its first eight bytes are the system identifier (little-endian on the platforms
  PostgreSQL packages ship for), which keys the WAL archive — read from the tar, so a multi-host DSN that
  sent pg_basebackup to another server than the agent's session is caught rather than recorded.

The tar format is PostgreSQL's own (``src/port/tar.c``): ustar headers, names under 100 bytes, sizes in octal
or (from 8 GiB) base-256, two zero blocks at the end. Anything else — a bad header checksum, an unknown member
type, a truncated member, bytes after the end — is not a base backup this agent wrote.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Final

from kybdr_agent.wal.names import WalError, check_timeline, parse_lsn

BLOCK: Final = 512
BACKUP_LABEL: Final = "backup_label"
BACKUP_MANIFEST: Final = "backup_manifest"
PG_CONTROL: Final = "global/pg_control"
PG_VERSION: Final = "PG_VERSION"
TABLESPACE_MAP: Final = "tablespace_map"
MAX_SMALL_FILE: Final = 64 << 10  # backup_label, PG_VERSION, tablespace_map: a few hundred bytes each
MANIFEST_TAIL_BYTES: Final = 256 << 10  # the WAL-Ranges and the checksum line, with room for many timelines
_PG_CONTROL_HEAD: Final = 12  # uint64 system identifier, uint32 pg_control_version
_SPECIAL: Final = frozenset({BACKUP_LABEL, BACKUP_MANIFEST, PG_CONTROL, PG_VERSION, TABLESPACE_MAP})
_REGULAR: Final = (b"0", b"\0")
_DIRECTORY: Final = b"5"
_SYMLINK: Final = b"2"
_CHECKSUM_LINE: Final = re.compile(rb'"Manifest-Checksum": "([0-9a-f]{64})"\}\n?\Z')


class BaseTarError(ValueError):
    """The stream is not a whole PostgreSQL base backup tar, or its backup_label or manifest do not parse."""


@dataclass(frozen=True, slots=True)
class BackupLabel:
    start_lsn: int
    start_segment: str
    checkpoint_lsn: int
    start_timeline: int
    backup_from: str
    label: str


@dataclass(frozen=True, slots=True)
class WalRange:
    timeline: int
    start_lsn: int
    end_lsn: int


@dataclass(frozen=True, slots=True)
class BaseTarFacts:
    label: BackupLabel
    wal_ranges: tuple[WalRange, ...]
    system_identifier: str
    pg_control_version: int
    pg_version: str
    members: int
    tar_bytes: int
    tablespace_map: bool

    @property
    def timeline(self) -> int:
        return self.label.start_timeline

    @property
    def start_lsn(self) -> int:
        return self.label.start_lsn

    @property
    def stop_lsn(self) -> int:
        return self.wal_ranges[-1].end_lsn


def parse_backup_label(text: bytes) -> BackupLabel:
    """``backup_label`` as PostgreSQL 15 writes it (``build_backup_content``); every field needed, once."""
    fields: dict[str, str] = {}
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise BaseTarError("backup_label is not UTF-8 text") from None
    for line in lines:
        key, sep, value = line.partition(": ")
        if not sep:
            raise BaseTarError(f"backup_label has a line that is not 'KEY: value': {line[:80]!r}")
        if key in fields:
            raise BaseTarError(f"backup_label names {key} twice")
        fields[key] = value
    try:
        where = re.fullmatch(r"([0-9A-F]{1,8}/[0-9A-F]{1,8}) \(file ([0-9A-F]{24})\)", fields["START WAL LOCATION"])
        if where is None:
            raise BaseTarError(f"backup_label's START WAL LOCATION does not parse: {fields['START WAL LOCATION']!r}")
        timeline = fields["START TIMELINE"]
        if not timeline.isdigit():
            raise BaseTarError(f"backup_label's START TIMELINE is not a number: {timeline!r}")
        return BackupLabel(
            start_lsn=parse_lsn(where[1]),
            start_segment=where[2],
            checkpoint_lsn=parse_lsn(fields["CHECKPOINT LOCATION"]),
            start_timeline=check_timeline(int(timeline)),
            backup_from=fields["BACKUP FROM"],
            label=fields.get("LABEL", ""),
        )
    except KeyError as exc:
        raise BaseTarError(f"backup_label lacks {exc.args[0]}") from None
    except WalError as exc:
        raise BaseTarError(f"backup_label: {exc}") from None


def parse_wal_ranges(manifest_tail: bytes) -> tuple[WalRange, ...]:
    """The ``WAL-Ranges`` array of a backup manifest, from its tail (it is the last field but the checksum)."""
    start = manifest_tail.rfind(b'"WAL-Ranges": [')
    if start < 0:
        raise BaseTarError("backup_manifest has no WAL-Ranges (was it cut short?)")
    end = manifest_tail.find(b"]", start)
    if end < 0:
        raise BaseTarError("backup_manifest's WAL-Ranges do not end")
    try:
        items = json.loads(manifest_tail[start + len(b'"WAL-Ranges": ') : end + 1])
        ranges = tuple(
            WalRange(check_timeline(item["Timeline"]), parse_lsn(item["Start-LSN"]), parse_lsn(item["End-LSN"]))
            for item in items
        )
    except (ValueError, KeyError, TypeError) as exc:  # WalError is a ValueError, as is a JSON error
        raise BaseTarError(f"backup_manifest's WAL-Ranges do not parse: {exc}") from None
    if not ranges:
        raise BaseTarError("backup_manifest lists no WAL range")
    return ranges


def _number(raw: bytes, what: str) -> int:
    """A tar header number: octal digits (NUL or space ended), or base-256 with the high bit set."""
    if raw and raw[0] & 0x80:
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text or not all(48 <= c <= 55 for c in text):
        raise BaseTarError(f"tar header's {what} is not an octal number: {raw!r}")
    return int(text, 8)


def _name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise BaseTarError(f"a tar member's name is not UTF-8: {name[:80]!r}") from None
    return text.removeprefix("./").rstrip("/")


@dataclass
class _Capture:
    """What is kept of one small member: its first ``limit`` bytes."""

    name: str
    limit: int
    data: bytearray = field(default_factory=bytearray)


class _ManifestTail:
    """The manifest's last ``MANIFEST_TAIL_BYTES``, with everything before them hashed as it leaves."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.tail = bytearray()

    def add(self, data: bytes | memoryview) -> None:
        self.tail += data
        excess = len(self.tail) - MANIFEST_TAIL_BYTES
        if excess > 0:
            self.hash.update(self.tail[:excess])
            del self.tail[:excess]

    def verified(self) -> bytes:
        """The tail, once the checksum line at its end matches the SHA-256 of everything before that line."""
        tail = bytes(self.tail)
        match = _CHECKSUM_LINE.search(tail)
        cut = tail.rfind(b"\n", 0, match.start()) + 1 if match else 0
        if match is None or cut == 0:
            raise BaseTarError("backup_manifest does not end with its Manifest-Checksum line")
        self.hash.update(tail[:cut])
        if self.hash.hexdigest() != match[1].decode():
            raise BaseTarError("backup_manifest does not match its own Manifest-Checksum")
        return tail[:cut]


class BaseTarReader:
    """Feed it the whole tar, then ``finish()`` for the facts; any inconsistency raises ``BaseTarError``."""

    def __init__(self) -> None:
        self.tar_bytes = 0
        self.members = 0
        self._header = bytearray()
        self._content_left = 0
        self._padding_left = 0
        self._capture: _Capture | None = None
        self._manifest: _ManifestTail | None = None
        self._zero_blocks = 0
        self._kept: dict[str, bytes] = {}
        self._special_seen: set[str] = set()  # only the members read: a set of every name would grow with the cluster

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.tar_bytes += len(view)
        pos, end = 0, len(view)
        while pos < end:
            if self._content_left:
                take = min(self._content_left, end - pos)
                self._content(view[pos : pos + take])
                self._content_left -= take
                pos += take
                if not self._content_left:
                    self._member_done()
            elif self._padding_left:
                take = min(self._padding_left, end - pos)
                if any(view[pos : pos + take]):
                    raise BaseTarError("a tar member's padding is not zeros")
                self._padding_left -= take
                pos += take
            else:
                take = min(BLOCK - len(self._header), end - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) == BLOCK:
                    header = bytes(self._header)
                    self._header.clear()
                    self._block(header)

    def _content(self, chunk: memoryview) -> None:
        if self._manifest is not None:
            self._manifest.add(chunk)
        elif self._capture is not None:
            room = self._capture.limit - len(self._capture.data)
            if room > 0:
                self._capture.data += chunk[:room]

    def _block(self, header: bytes) -> None:
        if self._zero_blocks:
            if any(header):
                raise BaseTarError("the tar has data after its end-of-archive blocks")
            self._zero_blocks += 1
            return
        if not any(header):
            self._zero_blocks = 1
            return
        stored = _number(header[148:156], "checksum")
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise BaseTarError(
                f"tar header {self.members + 1} has a bad checksum (the stream is not a tar, or damaged)"
            )
        name = _name(header)
        kind = header[156:157]
        size = _number(header[124:136], "size")
        if kind not in (*_REGULAR, _DIRECTORY, _SYMLINK):
            raise BaseTarError(f"tar member {name!r} has type {kind!r}, which a base backup does not hold")
        if kind != _REGULAR[0] and kind != _REGULAR[1] and size:
            raise BaseTarError(f"tar member {name!r} is not a file but has {size} bytes")
        if name in _SPECIAL:
            if name in self._special_seen:
                raise BaseTarError(f"the tar holds {name!r} twice")
            self._special_seen.add(name)
        self.members += 1
        self._content_left = size
        self._padding_left = -size % BLOCK
        if name == BACKUP_MANIFEST:
            self._manifest = _ManifestTail()
        elif name == PG_CONTROL:
            self._capture = _Capture(name, _PG_CONTROL_HEAD)
        elif name in (BACKUP_LABEL, PG_VERSION, TABLESPACE_MAP):
            if size > MAX_SMALL_FILE:
                raise BaseTarError(f"{name} is {size} bytes, far more than PostgreSQL writes")
            self._capture = _Capture(name, MAX_SMALL_FILE)
        if not size:
            self._member_done()

    def _member_done(self) -> None:
        if self._manifest is not None:
            self._kept[BACKUP_MANIFEST] = self._manifest.verified()
            self._manifest = None
        elif self._capture is not None:
            self._kept[self._capture.name] = bytes(self._capture.data)
            self._capture = None

    def finish(self) -> BaseTarFacts:
        if self._content_left or self._padding_left or self._header:
            raise BaseTarError("the tar ends in the middle of a member (it was cut short)")
        if self._zero_blocks < 2:
            raise BaseTarError("the tar lacks its end-of-archive blocks (it was cut short)")
        for name in (BACKUP_LABEL, BACKUP_MANIFEST, PG_CONTROL, PG_VERSION):
            if name not in self._kept:
                raise BaseTarError(f"the tar has no {name}: it is not a PostgreSQL base backup")
        label = parse_backup_label(self._kept[BACKUP_LABEL])
        ranges = parse_wal_ranges(self._kept[BACKUP_MANIFEST])
        control = self._kept[PG_CONTROL]
        if len(control) < _PG_CONTROL_HEAD:
            raise BaseTarError("global/pg_control is too short")
        self._check_ranges(label, ranges)
        return BaseTarFacts(
            label=label,
            wal_ranges=ranges,
            system_identifier=str(int.from_bytes(control[:8], "little")),
            pg_control_version=int.from_bytes(control[8:12], "little"),
            pg_version=self._kept[PG_VERSION].decode("ascii", "replace").strip(),
            members=self.members,
            tar_bytes=self.tar_bytes,
            tablespace_map=bool(self._kept.get(TABLESPACE_MAP, b"").strip()),
        )

    @staticmethod
    def _check_ranges(label: BackupLabel, ranges: tuple[WalRange, ...]) -> None:
        first, last = ranges[0], ranges[-1]
        if first.start_lsn != label.start_lsn or first.timeline != label.start_timeline:
            raise BaseTarError("backup_manifest's WAL range does not start where backup_label says")
        if len(ranges) > 1:
            raise BaseTarError(
                f"the server changed timeline during the backup (timelines {first.timeline}..{last.timeline}); "
                "take the backup again"
            )
        if last.end_lsn <= last.start_lsn:
            raise BaseTarError("backup_manifest's WAL range ends where it starts")
