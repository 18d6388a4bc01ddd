"""Reading a backup back: repository → SHA-256 → open frames → decompress → a sink, verified as it goes.

The sink only ever receives bytes whose frame has been authenticated; the totals (sizes, SHA-256 of the
stored object and of pg_dump's output) are checked when the stream ends, before the caller commits anything.
Stages and threads mirror the backup path: the event loop moves bytes, a worker thread does the CPU work.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from kybdr_agent.asyncutil import task_group
from kybdr_agent.backup import compress
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.streamfmt import (
    Compression,
    StreamFormatError,
    StreamHeader,
    StreamIntegrityError,
    StreamOpener,
)
from kybdr_agent.errors import IntegrityError, KeyUnavailable

QUEUE_DEPTH: Final = 4


@dataclass
class DecodeStats:
    stored_bytes: int = 0
    dump_bytes: int = 0
    frames: int = 0


@dataclass
class _Decoder:
    opener: StreamOpener
    decompressor: compress.Transform
    stored_hash: hashlib._Hash = field(default_factory=hashlib.sha256)
    stats: DecodeStats = field(default_factory=DecodeStats)

    def update(self, chunk: bytes) -> bytes:
        self.stored_hash.update(chunk)
        self.stats.stored_bytes += len(chunk)
        return self._plain(self.opener.update(chunk))

    def finalize(self) -> bytes:
        out = self._plain(self.opener.finalize())
        tail = self.decompressor.finalize()
        self.stats.dump_bytes += len(tail)
        self.stats.frames = self.opener.frames_opened
        return out + tail

    def _plain(self, packed: bytes) -> bytes:
        plain = self.decompressor.update(packed) if packed else b""
        self.stats.dump_bytes += len(plain)
        return plain


async def data_key_for(backup: Manifest, keyring: KeyRing | None) -> bytes | None:
    """The backup's plaintext data key, from whichever key of the ring wraps it now (the manifest's ``wrap``
    and ``key_id``; a KMS key is asked with ``Decrypt``). None for an unencrypted backup."""
    enc = backup.encryption
    if enc.cipher == "none":
        return None
    if keyring is None:
        raise KeyUnavailable(
            f'backup {backup.id} is encrypted; set encryption.key_file (or key_provider = "kms") to open it'
        )
    if enc.key_id is None or enc.wrapped_data_key is None:
        raise IntegrityError(f"backup {backup.id}'s manifest lacks its key id or wrapped data key")
    try:
        return await keyring.open(backup.id, enc)
    except (ValueError, KeyUnavailable) as exc:
        # A missing key, a wrong key and a tampered wrapped key look alike from here: report the key.
        raise KeyUnavailable(f"backup {backup.id}: {exc}") from None


async def _decoder(backup: Manifest, keyring: KeyRing | None) -> _Decoder:
    try:
        expected = StreamHeader.decode(bytes.fromhex(backup.stream_header))
    except (ValueError, StreamFormatError) as exc:
        raise IntegrityError(f"backup {backup.id}'s manifest has a bad stream header: {exc}") from None
    if expected.compression is not Compression[backup.compression.upper()]:
        raise IntegrityError(f"backup {backup.id}'s manifest disagrees with its stream header")
    # The header is compared whole with the manifest's copy, key id included: after a rotation it still
    # names the key the backup was made with, while the data key comes from the key that wraps it now.
    opener = StreamOpener(await data_key_for(backup, keyring), expected=expected)
    return _Decoder(opener, compress.decompressor(expected.compression))


async def stream_backup(
    store_read: Callable[[], AsyncIterator[bytes]],
    backup: Manifest,
    keyring: KeyRing | None,
    sink: Callable[[bytes], Awaitable[None]],
) -> DecodeStats:
    """Decode the whole backup into ``sink``; raise ``IntegrityError`` on the first inconsistency."""
    decoder = await _decoder(backup, keyring)
    raw_send, raw_recv = anyio.create_memory_object_stream[bytes](QUEUE_DEPTH)
    out_send, out_recv = anyio.create_memory_object_stream[bytes](QUEUE_DEPTH)
    async with task_group() as tg:
        tg.start_soon(_read_stage, store_read, raw_send)
        tg.start_soon(_decode_stage, decoder, raw_recv, out_send, backup.id)
        tg.start_soon(_sink_stage, out_recv, sink)
    _check_totals(backup, decoder)
    return decoder.stats


async def _read_stage(store_read: Callable[[], AsyncIterator[bytes]], send: MemoryObjectSendStream[bytes]) -> None:
    async with send:
        async for chunk in store_read():
            await send.send(chunk)


async def _decode_stage(
    decoder: _Decoder,
    recv: MemoryObjectReceiveStream[bytes],
    send: MemoryObjectSendStream[bytes],
    backup_id: str,
) -> None:
    async with recv, send:
        try:
            async for chunk in recv:
                plain = await anyio.to_thread.run_sync(decoder.update, chunk)
                if plain:
                    await send.send(plain)
            plain = await anyio.to_thread.run_sync(decoder.finalize)
        except (StreamIntegrityError, StreamFormatError, compress.CorruptCompressedData) as exc:
            raise IntegrityError(f"backup {backup_id} does not verify: {exc}") from None
        if plain:
            await send.send(plain)


async def _sink_stage(recv: MemoryObjectReceiveStream[bytes], sink: Callable[[bytes], Awaitable[None]]) -> None:
    async with recv:
        async for plain in recv:
            await sink(plain)


def _check_totals(backup: Manifest, decoder: _Decoder) -> None:
    problems: list[str] = []
    stats = decoder.stats
    if stats.stored_bytes != backup.stored_bytes:
        problems.append(f"object has {stats.stored_bytes} bytes, manifest says {backup.stored_bytes}")
    if decoder.stored_hash.hexdigest() != backup.sha256:
        problems.append("SHA-256 of the stored object differs from the manifest")
    if stats.dump_bytes != backup.dump_bytes:
        problems.append(f"decoded dump has {stats.dump_bytes} bytes, manifest says {backup.dump_bytes}")
    if stats.frames != backup.frames:
        problems.append(f"{stats.frames} frames, manifest says {backup.frames}")
    if problems:
        raise IntegrityError(f"backup {backup.id} does not verify: " + "; ".join(problems))
