"""The repository side of WAL: every archived file sealed with the backup stream format, then its record.

A WAL file goes into the repository as a backup's data does (``docs/format.md``): compressed, cut into
authenticated frames under the stream header, hashed; then its record (``wal/records.py``), the one write
that makes the file part of the archive. A reader trusts nothing it has not checked: ``fetch`` verifies the
stored object's SHA-256, every frame, the codec's own end marker and checksum, the plaintext's SHA-256 and
size, and for a segment its first page against the name and the cluster (``wal/pageheader.py``), and only
then renames the file into place.

**Idempotent, never overwriting.** PostgreSQL re-archives a file after a crash and pg_receivewal re-sends
what it had not confirmed, so ``push`` of content already archived returns the existing record. A full
segment, a history file or a backup history file archived with *different* content is refused
(``WalConflict``): two clusters sharing a system identifier, or a corrupt spool, must stop the archiver
loudly rather than replace good WAL (pgBackRest refuses the same; barman-cloud overwrote). A ``.partial`` is
the only file that changes: a newer copy replaces the archived one only when it extends it — the archived
content, without its zero padding (pg_receivewal pre-allocates the whole segment), is a prefix of the new.

**Data keys** and the sealing itself: ``wal/sealing.py``.

**One writer.** Objects are written with plain PUTs, object first, record second; the agent is the only
writer of its cluster's prefix (a second agent archiving the same cluster to the same repository is a
configuration error this module does not arbitrate).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Final, Literal

import anyio
from pydantic import ValidationError

from kybdr_agent import __version__
from kybdr_agent.asyncutil import task_group
from kybdr_agent.backup import compress
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Encryption
from kybdr_agent.backup.streamfmt import (
    Cipher,
    Compression,
    StreamFormatError,
    StreamHeader,
    StreamIntegrityError,
)
from kybdr_agent.errors import IntegrityError, KybdrError, NotFound
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.wal.names import PartialSegment, Segment, WalError, WalFile, check_segment_size, parse_wal_file_name
from kybdr_agent.wal.pageheader import SegmentHeaderError, check_segment_header
from kybdr_agent.wal.records import (
    RECORD_SUFFIX,
    WAL_PREFIX,
    CommitTimes,
    WalRecord,
    WalRecordError,
    check_system_identifier,
    parse_wal_key,
    wal_object_key,
    wal_record_key,
)
from kybdr_agent.wal.sealing import (
    NO_KEY_ID,
    NONCE_PREFIX_BYTES,
    Decoder,
    WalKeys,
    extends,
    fsync_dir,
    seal,
)

MAX_RECORD_BYTES: Final = 64 << 10
RECORD_READ_CONCURRENCY: Final = 16
PARTIALS_REMEMBERED: Final = 64


class WalConflict(KybdrError):
    """The file is already archived with different content; the archive keeps what it has."""


class WalRejected(KybdrError):
    """The file is not what its name says (size, first page, cluster): it is never archived under that name."""


class WalIntegrityError(IntegrityError):
    """An archived WAL file or its record does not verify; the message names the file."""


@dataclass(frozen=True, slots=True)
class _PartialSeen:
    """What this process archived of a partial: enough to check a newer copy extends it without a GET."""

    plaintext_sha256: str
    kept: int
    kept_sha256: str


class WalArchive:
    """WAL files of one cluster (system identifier) in one BlobStore, sealed with the stream format."""

    def __init__(
        self,
        store: BlobStore,
        *,
        system_identifier: str,
        segment_size: int,
        keyring: KeyRing | None,
        compression: Compression,
        compression_level: int | None,
        frame_size: int,
    ) -> None:
        self.store = store
        self.system_identifier = check_system_identifier(system_identifier)
        self.segment_size = check_segment_size(segment_size)
        self.keyring = keyring
        self.compression = compression
        self.compression_level = compression_level
        self.frame_size = frame_size
        StreamHeader(compression, Cipher.NONE, frame_size, NO_KEY_ID, bytes(NONCE_PREFIX_BYTES))  # checks it
        self._keys = WalKeys(keyring, self.system_identifier)
        self._partials: OrderedDict[str, _PartialSeen] = OrderedDict()

    def describe(self) -> str:
        return f"{self.store.describe()}/{WAL_PREFIX}/{self.system_identifier}"

    # --- writing ----------------------------------------------------------------------------------

    async def push(
        self,
        file_name: str,
        data: bytes,
        *,
        source: Literal["stream", "archive_command"],
        commits: CommitTimes | None = None,
    ) -> WalRecord:
        """Seal + store object, then its record. Idempotent: same plaintext already archived -> its record.
        A full segment already archived with DIFFERENT content -> raises WalConflict (never overwrites).
        A .partial may be replaced by a longer one of the same segment."""
        file = self._parse(file_name)
        self._check_content(file, data)
        plaintext_sha256 = await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
        existing = await self._read_record(file)
        if existing is not None:
            if existing.plaintext_sha256 == plaintext_sha256 and existing.size == len(data):
                return existing
            if not isinstance(file, PartialSegment):
                raise WalConflict(
                    f"{file.name} is already archived in {self.describe()} with different content "
                    f"(SHA-256 {existing.plaintext_sha256[:16]}…, this copy {plaintext_sha256[:16]}…); "
                    "the archived copy is kept"
                )
            await self._check_extends(existing, data)
        record = await self._store(file, data, plaintext_sha256, source, commits)
        if isinstance(file, PartialSegment):
            await self._remember_partial(record.object_key, plaintext_sha256, data)
        return record

    def _parse(self, file_name: str) -> WalFile:
        try:
            return parse_wal_file_name(file_name, self.segment_size)
        except WalError as exc:
            raise WalRejected(str(exc)) from None

    def _check_content(self, file: WalFile, data: bytes) -> None:
        if isinstance(file, Segment | PartialSegment):
            segment = file if isinstance(file, Segment) else file.segment
            limit = f"{self.segment_size} bytes" if isinstance(file, Segment) else f"1 to {self.segment_size} bytes"
            size_ok = (
                len(data) == self.segment_size if isinstance(file, Segment) else 0 < len(data) <= self.segment_size
            )
            if not size_ok:
                raise WalRejected(f"{file.name} is {len(data)} bytes; a WAL file of that name is {limit}")
            try:
                # magic=None: the archive keeps any PostgreSQL version's WAL; name, address and cluster must agree.
                check_segment_header(data, segment, system_identifier=int(self.system_identifier), magic=None)
            except SegmentHeaderError as exc:
                raise WalRejected(f"{file.name} refused: {exc}") from None

    async def _check_extends(self, existing: WalRecord, data: bytes) -> None:
        seen = self._partials.get(existing.object_key)
        if seen is not None and seen.plaintext_sha256 == existing.plaintext_sha256:
            prefix = data[: seen.kept]
            ok = len(prefix) == seen.kept and hashlib.sha256(prefix).hexdigest() == seen.kept_sha256
        else:
            archived = await self.read_bytes(existing)
            ok = await anyio.to_thread.run_sync(extends, archived, data)
        if not ok:
            raise WalConflict(
                f"{existing.file_name} is already archived in {self.describe()} with content this copy does not "
                "extend; the archived copy is kept"
            )

    async def _remember_partial(self, key: str, plaintext_sha256: str, data: bytes) -> None:
        def measure() -> _PartialSeen:
            kept = data.rstrip(b"\0")
            return _PartialSeen(plaintext_sha256, len(kept), hashlib.sha256(kept).hexdigest())

        self._partials[key] = await anyio.to_thread.run_sync(measure)
        self._partials.move_to_end(key)
        while len(self._partials) > PARTIALS_REMEMBERED:
            self._partials.popitem(last=False)

    async def _store(
        self,
        file: WalFile,
        data: bytes,
        plaintext_sha256: str,
        source: Literal["stream", "archive_command"],
        commits: CommitTimes | None,
    ) -> WalRecord:
        prefix = os.urandom(NONCE_PREFIX_BYTES)
        new_key = await self._keys.new(file)
        if new_key is None:
            header = StreamHeader(self.compression, Cipher.NONE, self.frame_size, NO_KEY_ID, prefix)
            data_key: bytes | None = None
            encryption = Encryption(cipher="none")
        else:
            header = StreamHeader(self.compression, Cipher.AES_256_GCM, self.frame_size, new_key.key_id, prefix)
            data_key, encryption = new_key.plaintext, new_key.encryption
        sealed = await anyio.to_thread.run_sync(seal, data, header, data_key, self.compression_level)
        partial = isinstance(file, PartialSegment)
        try:
            record = WalRecord(
                system_identifier=self.system_identifier,
                name=file.segment.name if isinstance(file, PartialSegment) else file.name,
                partial=partial,
                timeline=file.timeline,
                wal_segment_size=self.segment_size,
                size=len(data),
                plaintext_sha256=plaintext_sha256,
                stored_bytes=len(sealed.stored),
                sha256=sealed.sha256,
                frames=sealed.frames,
                stream_header=header.encode().hex(),
                encryption=encryption,
                object_key=wal_object_key(self.system_identifier, file),
                source=source,
                archived_at=datetime.now(UTC),
                agent_version=__version__,
                commits=commits,
            )
        except ValidationError as exc:
            raise WalRejected(f"{file.name}: {exc.errors()[0]['msg']}") from None
        await self.store.put_bytes(record.object_key, sealed.stored)
        await self.store.put_bytes(wal_record_key(self.system_identifier, file), record.to_json())
        return record

    # --- reading ----------------------------------------------------------------------------------

    async def stat(self, file_name: str, timeline: int) -> WalRecord | None:
        """The record of one file, or None when it is not archived. ``timeline`` must be the name's."""
        file = self._parse(file_name)
        if file.timeline != timeline:
            raise WalRejected(f"{file_name} is not a file of timeline {timeline}")
        return await self._read_record(file)

    async def records(self) -> list[WalRecord]:
        """Every record of this system identifier (bounded concurrency of GETs); unreadable -> raises."""
        keys: list[str] = []
        async for info in self.store.list_objects(f"{WAL_PREFIX}/{self.system_identifier}/"):
            if info.key.endswith(RECORD_SUFFIX):
                keys.append(info.key)
        found: dict[str, WalRecord] = {}
        limiter = anyio.CapacityLimiter(RECORD_READ_CONCURRENCY)

        async def read(key: str) -> None:
            async with limiter:
                try:
                    system_identifier, file, _ = parse_wal_key(key, self.segment_size)
                except WalError as exc:
                    raise WalIntegrityError(
                        f"{key} in {self.store.describe()} is not a WAL record's key: {exc}"
                    ) from None
                if system_identifier != self.system_identifier:
                    raise WalIntegrityError(f"{key} is listed under another cluster's prefix")
                record = await self._read_record(file)
                if record is not None:  # removed since the listing (retention): not an error
                    found[key] = record

        async with task_group() as tg:
            for key in keys:
                tg.start_soon(read, key)
        return [found[key] for key in sorted(found)]

    async def _read_record(self, file: WalFile) -> WalRecord | None:
        key = wal_record_key(self.system_identifier, file)
        try:
            raw = await self.store.get_bytes(key, max_size=MAX_RECORD_BYTES)
        except NotFound:
            return None
        try:
            record = WalRecord.from_json(raw)
        except WalRecordError as exc:
            raise WalIntegrityError(f"{file.name}: the record {key} is not valid: {exc}") from None
        if (
            record.system_identifier != self.system_identifier
            or record.wal_segment_size != self.segment_size
            or record.file_name != file.name
        ):
            raise WalIntegrityError(
                f"{file.name}: the record {key} describes {record.file_name} of cluster {record.system_identifier} "
                f"({record.wal_segment_size}-byte segments), not this file"
            )
        return record

    async def fetch(self, record: WalRecord, dest: Path, *, mode: int = 0o600) -> None:
        """Read, check sha256 of the stored object, open frames, decompress, check plaintext_sha256 and (for
        segments) the page header (wal/pageheader.py); write dest atomically (tmp, fsync, rename). Any
        mismatch -> raises WalIntegrityError naming the file; dest is never left half-written.

        ``mode`` is the new file's permission bits (0600: WAL holds the database's data)."""
        self._check_ours(record)
        data_key = await self._keys.open(record)
        temp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            with os.fdopen(fd, "wb") as out:
                await self._decode(record, out, data_key)
            os.replace(temp, dest)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        await anyio.to_thread.run_sync(fsync_dir, dest.parent)

    async def read_bytes(self, record: WalRecord) -> bytes:
        """The file's verified content in memory (a partial compared with a newer copy; small files)."""
        self._check_ours(record)
        decoder = await self._decode(record, None, await self._keys.open(record))
        return bytes(decoder.memory)

    async def _decode(self, record: WalRecord, out: IO[bytes] | None, data_key: bytes | None) -> Decoder:
        try:
            decoder = Decoder(record, data_key, out)
        except (StreamFormatError, ValueError) as exc:
            raise WalIntegrityError(f"{record.file_name}: the record's stream header is not usable: {exc}") from None
        try:
            async for chunk in self.store.read(record.object_key):
                await anyio.to_thread.run_sync(decoder.update, chunk)
            await anyio.to_thread.run_sync(decoder.finalize)
        except NotFound:
            raise WalIntegrityError(f"{record.file_name}: the record exists but its object does not") from None
        except (StreamIntegrityError, StreamFormatError, compress.CorruptCompressedData) as exc:
            raise WalIntegrityError(f"{record.file_name} does not verify: {exc}") from None
        self._check_totals(record, decoder)
        return decoder

    def _check_ours(self, record: WalRecord) -> None:
        if record.system_identifier != self.system_identifier or record.wal_segment_size != self.segment_size:
            raise WalIntegrityError(
                f"{record.file_name}: the record is of cluster {record.system_identifier}, not {self.system_identifier}"
            )

    def _check_totals(self, record: WalRecord, decoder: Decoder) -> None:
        problems: list[str] = []
        if decoder.stored != record.stored_bytes:
            problems.append(f"the object has {decoder.stored} bytes, the record says {record.stored_bytes}")
        if decoder.stored_hash.hexdigest() != record.sha256:
            problems.append("the SHA-256 of the stored object differs from the record's")
        if decoder.plain != record.size:
            problems.append(f"it decodes to {decoder.plain} bytes, the record says {record.size}")
        if decoder.plain_hash.hexdigest() != record.plaintext_sha256:
            problems.append("the SHA-256 of the decoded file differs from the record's")
        if decoder.opener.frames_opened != record.frames:
            problems.append(f"{decoder.opener.frames_opened} frames, the record says {record.frames}")
        file = record.wal_file()
        if not problems and isinstance(file, Segment | PartialSegment):
            segment = file if isinstance(file, Segment) else file.segment
            try:
                check_segment_header(decoder.head, segment, system_identifier=int(self.system_identifier), magic=None)
            except SegmentHeaderError as exc:
                problems.append(str(exc))
        if problems:
            raise WalIntegrityError(f"{record.file_name} does not verify: " + "; ".join(problems))
