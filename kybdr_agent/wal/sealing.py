"""How one WAL file is sealed and opened: the backup stream format around a whole file, and its data keys.

**Data keys.** With a key file, every file gets a fresh data key, wrapped locally and bound to the file's
object key (``MasterKey.wrap``'s associated data), so a wrapped key moved to another file does not open.
With AWS KMS a fresh key per file would be a ``GenerateDataKey`` call per 16 MiB segment (latency on the
archiving path, and a request per segment in CloudTrail and on the bill): a KMS data key is instead reused
for at most ``KMS_KEY_REUSE_FILES`` files or ``KMS_KEY_REUSE_SECONDS`` seconds and bound to the cluster
(``wal/<system identifier>``, the encryption context KMS records), each file still sealed under its own
random nonce prefix (56 bits: a few hundred files per key are far from any collision). ``data_key_binding``
is the one rule both sides use. Opened keys are cached (a small LRU) so a restore asks KMS once per data
key, not once per segment.

The CPU work — compressing, sealing, hashing, opening — is plain functions and a decoder object the
archive runs in worker threads.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import anyio

from kybdr_agent.backup import compress
from kybdr_agent.backup.keys import KeyRing, NewDataKey, wrap_of
from kybdr_agent.backup.streamfmt import Compression, StreamHeader, StreamOpener, StreamSealer
from kybdr_agent.errors import KeyUnavailable
from kybdr_agent.wal.names import WalFile
from kybdr_agent.wal.pageheader import LONG_HEADER_SIZE
from kybdr_agent.wal.records import WAL_PREFIX, WalRecord, check_system_identifier, wal_object_key

NONCE_PREFIX_BYTES: Final = 7
NO_KEY_ID: Final = bytes(16)
KMS_WRAP: Final = "aws-kms"
KMS_KEY_REUSE_FILES: Final = 256
KMS_KEY_REUSE_SECONDS: Final = 300.0
OPENED_KEYS_CACHED: Final = 64


def data_key_binding(system_identifier: str, file: WalFile, wrap: str) -> str:
    """What a WAL file's wrapped data key is bound to: its object key, or (KMS, a reused key) its cluster."""
    if wrap == KMS_WRAP:
        return f"{WAL_PREFIX}/{check_system_identifier(system_identifier)}"
    return wal_object_key(system_identifier, file)


def record_binding(record: WalRecord) -> str:
    """The binding of an archived file's data key, from its record (``KeyRing.open``'s and ``rewrap``'s id)."""
    return data_key_binding(record.system_identifier, record.wal_file(), wrap_of(record.encryption))


def extends(archived: bytes, new: bytes) -> bool:
    """Whether ``new`` continues ``archived``: the archived content without its trailing zeros is a prefix.

    pg_receivewal pre-allocates a segment with zeros and fills it as WAL arrives, so a later copy of the same
    ``.partial`` holds every byte of an earlier one, followed by more WAL where the earlier had zeros."""
    kept = archived.rstrip(b"\0")
    return new[: len(kept)] == kept


@dataclass(frozen=True, slots=True)
class Sealed:
    stored: bytes
    sha256: str
    frames: int


SEAL_CHUNK: Final = 1 << 20


def seal(data: bytes, header: StreamHeader, data_key: bytes | None, level: int | None) -> Sealed:
    """compress → seal → hash, one worker-thread call for a whole file (a segment fits in memory).

    Fed in ``SEAL_CHUNK`` pieces so that, besides the file, only its sealed copy is held (in
    pieces, then joined), not a compressed copy and a sealed one of the whole file besides."""
    packer = compress.compressor(header.compression, level if header.compression is not Compression.NONE else None)
    sealer = StreamSealer(header, data_key)
    pieces: list[bytes] = []
    with memoryview(data) as view:
        for start in range(0, len(data), SEAL_CHUNK):
            packed = packer.update(bytes(view[start : start + SEAL_CHUNK]))
            if packed:
                pieces.append(sealer.update(packed))
    pieces += (sealer.update(packer.finalize()), sealer.finalize())
    stored = b"".join(pieces)
    pieces.clear()
    return Sealed(stored, hashlib.sha256(stored).hexdigest(), sealer.frames_sealed)


class Decoder:
    """open frames → decompress → hash → a file (or memory); the caller checks the totals against the record.

    Only authenticated bytes are decompressed and written (``StreamOpener``); the file is the caller's
    temporary, renamed into place only after every check passed."""

    def __init__(self, record: WalRecord, data_key: bytes | None, out: IO[bytes] | None) -> None:
        header = StreamHeader.decode(bytes.fromhex(record.stream_header))
        self.opener = StreamOpener(data_key, expected=header)
        self.unpacker = compress.decompressor(header.compression)
        self.stored_hash = hashlib.sha256()
        self.plain_hash = hashlib.sha256()
        self.stored = 0
        self.plain = 0
        self.head = b""
        self.out = out
        self.memory = bytearray()

    def update(self, chunk: bytes) -> None:
        self.stored_hash.update(chunk)
        self.stored += len(chunk)
        self._write(self.unpacker.update(self.opener.update(chunk)))

    def finalize(self) -> None:
        self._write(self.unpacker.update(self.opener.finalize()) + self.unpacker.finalize())
        if self.out is not None:
            self.out.flush()
            os.fsync(self.out.fileno())

    def _write(self, plain: bytes) -> None:
        if plain:
            if len(self.head) < LONG_HEADER_SIZE:
                self.head += plain[: LONG_HEADER_SIZE - len(self.head)]
            self.plain_hash.update(plain)
            self.plain += len(plain)
            if self.out is not None:
                self.out.write(plain)
            else:
                self.memory += plain


class WalKeys:
    """New data keys for WAL files and opened ones, from the agent's key ring (see the module docstring)."""

    def __init__(self, keyring: KeyRing | None, system_identifier: str) -> None:
        self.keyring = keyring
        self.system_identifier = system_identifier
        self._reused: tuple[NewDataKey, float, int] | None = None
        self._lock = anyio.Lock()
        self._opened: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    async def new(self, file: WalFile) -> NewDataKey | None:
        """A data key for sealing ``file``; None when there is no key ring (unencrypted archive)."""
        ring = self.keyring
        if ring is None:
            return None
        wrap = ring.current.wrap_algorithm
        binding = data_key_binding(self.system_identifier, file, wrap)
        if wrap != KMS_WRAP:
            return await ring.new_data_key(binding)
        async with self._lock:
            now = time.monotonic()
            if self._reused is not None:
                key, since, uses = self._reused
                if uses < KMS_KEY_REUSE_FILES and now - since < KMS_KEY_REUSE_SECONDS:
                    self._reused = (key, since, uses + 1)
                    return key
            key = await ring.new_data_key(binding)
            self._reused = (key, now, 1)
            return key

    async def open(self, record: WalRecord) -> bytes | None:
        """The plaintext data key of an archived file; None for an unencrypted one."""
        enc = record.encryption
        if enc.cipher == "none":
            return None
        if self.keyring is None:
            raise KeyUnavailable(
                f'{record.file_name} is encrypted; set encryption.key_file (or key_provider = "kms") to open it'
            )
        assert enc.wrapped_data_key is not None  # the record's own validation guarantees it
        cache_key = (record_binding(record), enc.wrapped_data_key)
        cached = self._opened.get(cache_key)
        if cached is not None:
            self._opened.move_to_end(cache_key)
            return cached
        try:
            key = await self.keyring.open(cache_key[0], enc)
        except (ValueError, KeyUnavailable) as exc:
            raise KeyUnavailable(f"{record.file_name}: {exc}") from None
        self._opened[cache_key] = key
        while len(self._opened) > OPENED_KEYS_CACHED:
            self._opened.popitem(last=False)
        return key


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
