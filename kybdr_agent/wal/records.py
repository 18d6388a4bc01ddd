"""PURE. The record of one archived WAL file — a segment, a partial, a timeline history or a backup history —
written as JSON beside the sealed object, after it: a file is in the archive if and only if its record is.

The record is what validation, the recovery window, retention and a restore read instead of the object: the
name and timeline, the cluster it belongs to, sizes, the SHA-256 of the stored object and of the file as
PostgreSQL wrote it, how it was sealed (the stream header, bound to every frame, and the wrapped data key, as
a backup manifest holds them — docs/format.md), where it came from (``stream``: pg_receivewal; or
``archive_command``) and when, and the span of commit timestamps in it when the archiver read them.

**Keys.** ``wal/<system identifier>/<timeline, 8 hex>/<file name>`` for the object and the same plus
``.json`` for its record. The system identifier (``pg_control_system()``) separates clusters that share a
repository: every fresh ``initdb`` — and ``pg_upgrade`` — starts again at timeline 1 and the same segment
names, so keying by timeline alone would mix two clusters' WAL (pgBackRest refuses such an archive through
``archive.info``; WAL-G's ``delete`` was bitten by ordering by names, ``walg#636``).

**Strict parsing.** Unknown fields are refused; the name must parse for the recorded segment size and agree
with the timeline, the partial flag and the object key; a full segment's size is the segment size; the stream
header must decode and agree with the recorded cipher and key id. A record that does not hold together is not
one, whatever produced it.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kybdr_agent.backup.manifest import Encryption
from kybdr_agent.backup.streamfmt import HEADER_SIZE, KEY_ID_SIZE, TAG_SIZE, Cipher, StreamFormatError, StreamHeader
from kybdr_agent.wal.names import (
    BackupHistoryFile,
    PartialSegment,
    Segment,
    TimelineHistoryFile,
    WalError,
    WalFile,
    check_segment_size,
    parse_wal_file_name,
)
from kybdr_agent.wal.timeline import MAX_HISTORY_BYTES
from kybdr_agent.wal.window import ArchivedSegment, CommitSpan

RECORD_FORMAT: Final = 1
WAL_PREFIX: Final = "wal"
RECORD_SUFFIX: Final = ".json"
MAX_BACKUP_HISTORY_BYTES: Final = 64 << 10
MAX_SYSTEM_IDENTIFIER: Final = (1 << 64) - 1

_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_SYSTEM_IDENTIFIER: Final = re.compile(r"[1-9][0-9]{0,19}")
_TIMELINE_DIR: Final = re.compile(r"[0-9A-F]{8}")


class WalRecordError(WalError):
    """A WAL record or repository key is not valid."""


def check_system_identifier(value: str) -> str:
    """A cluster's system identifier in decimal, as ``pg_control_system()`` and ``pg_controldata`` print it."""
    if not isinstance(value, str) or not _SYSTEM_IDENTIFIER.fullmatch(value) or int(value) > MAX_SYSTEM_IDENTIFIER:
        raise WalRecordError(f"{value!r} is not a system identifier (a decimal number up to 2^64-1)")
    return value


def wal_object_key(system_identifier: str, file: WalFile) -> str:
    return f"{WAL_PREFIX}/{check_system_identifier(system_identifier)}/{file.timeline:08X}/{file.name}"


def wal_record_key(system_identifier: str, file: WalFile) -> str:
    return wal_object_key(system_identifier, file) + RECORD_SUFFIX


def parse_wal_key(key: str, size: int) -> tuple[str, WalFile, bool]:
    """``(system identifier, file, is_record)`` from a repository key; anything else is refused."""
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) != 4 or parts[0] != WAL_PREFIX:
        raise WalRecordError(f"{key!r} is not a WAL archive key (wal/<system id>/<timeline>/<file>)")
    _, system_identifier, timeline_dir, name = parts
    check_system_identifier(system_identifier)
    is_record = name.endswith(RECORD_SUFFIX)
    file = parse_wal_file_name(name.removesuffix(RECORD_SUFFIX) if is_record else name, size)
    if not _TIMELINE_DIR.fullmatch(timeline_dir) or int(timeline_dir, 16) != file.timeline:
        raise WalRecordError(f"{key!r}: the folder does not name the file's timeline")
    return system_identifier, file, is_record


class CommitTimes(BaseModel):
    """Commit and abort records found in the file: how many, the earliest and the latest timestamp."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(ge=0)
    first: datetime | None = None
    last: datetime | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CommitTimes:
        self.span()
        return self

    def span(self) -> CommitSpan:
        try:
            return CommitSpan(self.count, self.first, self.last)
        except WalError as exc:
            raise ValueError(str(exc)) from None


class WalRecord(BaseModel):
    """One archived WAL file. ``name`` is PostgreSQL's name for it, without ``.partial`` (see ``partial``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = RECORD_FORMAT
    system_identifier: str
    name: str
    partial: bool = False
    timeline: int
    wal_segment_size: int
    size: int = Field(ge=0, description="bytes of the file as PostgreSQL (or pg_receivewal) wrote it")
    plaintext_sha256: str = Field(description="SHA-256 of the file as PostgreSQL wrote it")
    stored_bytes: int = Field(description="bytes of the sealed object in the repository")
    sha256: str = Field(description="SHA-256 of the sealed object")
    frames: int = Field(ge=1)
    stream_header: str = Field(description="hex of the stream header, bound to every frame")
    encryption: Encryption
    object_key: str
    source: Literal["stream", "archive_command"]
    archived_at: datetime
    agent_version: str
    commits: CommitTimes | None = Field(None, description="commit timestamps in the file; None when not read")

    @model_validator(mode="after")
    def _holds_together(self) -> WalRecord:
        check_system_identifier(self.system_identifier)
        check_segment_size(self.wal_segment_size)
        file = self.wal_file()
        if file.timeline != self.timeline:
            raise ValueError(f"{self.file_name} is not on timeline {self.timeline}")
        if self.object_key != wal_object_key(self.system_identifier, file):
            raise ValueError("the object key is not the file's own key")
        self._check_size(file)
        for field in ("sha256", "plaintext_sha256"):
            if not _SHA256.fullmatch(getattr(self, field)):
                raise ValueError(f"{field} is not a lower-case hex SHA-256")
        self._check_sealing()
        if self.archived_at.tzinfo is None or self.archived_at.utcoffset() is None:
            raise ValueError("archived_at must carry a time zone")
        if self.commits is not None and not isinstance(file, Segment | PartialSegment):
            raise ValueError("only a segment carries commit timestamps")
        return self

    def _check_size(self, file: WalFile) -> None:
        if isinstance(file, Segment):
            ok, what = self.size == self.wal_segment_size, f"exactly {self.wal_segment_size} bytes"
        elif isinstance(file, PartialSegment):
            ok, what = 0 < self.size <= self.wal_segment_size, f"1 to {self.wal_segment_size} bytes"
        elif isinstance(file, TimelineHistoryFile):
            ok, what = 0 < self.size <= MAX_HISTORY_BYTES, f"1 to {MAX_HISTORY_BYTES} bytes"
        else:
            ok, what = 0 < self.size <= MAX_BACKUP_HISTORY_BYTES, f"1 to {MAX_BACKUP_HISTORY_BYTES} bytes"
        if not ok:
            raise ValueError(f"{self.file_name} is {self.size} bytes; it must be {what}")

    def _check_sealing(self) -> None:
        try:
            header = StreamHeader.decode(bytes.fromhex(self.stream_header))
        except (ValueError, StreamFormatError) as exc:
            raise ValueError(f"stream header: {exc}") from None
        if len(self.stream_header) != 2 * HEADER_SIZE:
            raise ValueError("stream header has trailing bytes")
        encrypted = header.cipher == Cipher.AES_256_GCM
        if encrypted != (self.encryption.cipher == "aes-256-gcm"):
            raise ValueError("the stream header's cipher is not the recorded one")
        if encrypted:
            if self.encryption.key_id != header.key_id.hex() or not self.encryption.wrapped_data_key:
                raise ValueError("an encrypted record needs its key id (as in the header) and wrapped data key")
        elif header.key_id != bytes(KEY_ID_SIZE) or self.encryption.key_id or self.encryption.wrapped_data_key:
            raise ValueError("an unencrypted record carries no key")
        compressed = self.stored_bytes - HEADER_SIZE - self.frames * TAG_SIZE
        if not 0 <= compressed <= self.frames * header.frame_size:
            raise ValueError("stored_bytes does not fit the stream header and frame count")

    @property
    def file_name(self) -> str:
        return self.name + ".partial" if self.partial else self.name

    def wal_file(self) -> WalFile:
        """The file this record is of (``parse_wal_file_name`` of its archived name)."""
        try:
            file = parse_wal_file_name(self.file_name, self.wal_segment_size)
        except WalError as exc:
            raise ValueError(str(exc)) from None
        if self.partial and not isinstance(file, PartialSegment):
            raise ValueError(f"{self.name} cannot be partial: only a segment can")
        return file

    def archived_segment(self) -> ArchivedSegment:
        """The window's view of a segment record (WalRecordError for a history file)."""
        file = self.wal_file()
        if isinstance(file, TimelineHistoryFile | BackupHistoryFile):
            raise WalRecordError(f"{self.file_name} is not a segment")
        segment = file.segment if isinstance(file, PartialSegment) else file
        return ArchivedSegment(segment, self.partial, self.commits.span() if self.commits is not None else None)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> WalRecord:
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise WalRecordError(
                f"WAL record is not valid: {exc.error_count()} problem(s): {exc.errors()[0]['msg']}"
            ) from None
