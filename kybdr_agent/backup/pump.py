"""The backup data path's moving part: a child's stdout → compress → seal frames → SHA-256 → the store's writer.

Two stages joined by a hand-over of whole buffers, so a slow store slows the child instead of growing memory:

    pump   (worker thread) reads the child's pipe, compresses, seals and hashes until a buffer is full
    writer (event loop)    hands each full buffer to the store (which keeps a bounded number in flight)

The buffers are the store's own where it lends them (an S3 upload's part buffers, filled in place and sent
as they are), else a pair of ``FILL_BYTES`` buffers reused once written; either way memory is a fixed
number of buffers whatever the dump's size. The event loop wakes once per buffer, not per chunk; the CPU
work runs in the worker thread, where zstd, zlib and hashlib release the GIL, so reading the pipe,
compressing and uploading overlap (shared/research/perf-anchors.md: compressing in the reading thread
costs 1.5× the shell pipeline; a hop per 1 MiB chunk ~1.6 CPU-s per GB on two busy cores).

Kept apart from ``pipeline.py`` (what a logical backup is: snapshot, facts, globals, manifest) because it is
the same for every child whose output becomes a backup object: pg_dump and pg_basebackup.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from kybdr_agent.asyncutil import TailBuffer, task_group
from kybdr_agent.backup import compress
from kybdr_agent.backup.pgdump import PipeReader, child_process, drain_into, failure_message
from kybdr_agent.backup.streamfmt import StreamSealer
from kybdr_agent.errors import DumpError
from kybdr_agent.storage.base import BlobWriter
from kybdr_agent.telemetry.tracing import annotate, stage

READ_CHUNK: Final = 1 << 20
# Sealed bytes per buffer for a store that does not lend its own (a folder): one worker-thread hop fills it,
# ~12 MiB of a typical dump; two of them let the pump fill one while the other is written.
FILL_BYTES: Final = 4 << 20
FILL_BUFFERS: Final = 2


class BackupProgress(Protocol):
    """Anything with a ``bytes_done`` the pipeline can update (a job's progress record)."""

    bytes_done: int


@dataclass
class Encoder:
    """compress → seal → hash, as one sans-I/O step so a single worker-thread hop does all the CPU work."""

    compressor: compress.Transform
    sealer: StreamSealer
    stored_hash: hashlib._Hash = field(default_factory=hashlib.sha256)
    dump_bytes: int = 0
    compressed_bytes: int = 0

    def update(self, chunk: bytes) -> bytes:
        self.dump_bytes += len(chunk)
        packed = self.compressor.update(chunk)
        self.compressed_bytes += len(packed)
        sealed = self.sealer.update(packed) if packed else b""
        self.stored_hash.update(sealed)
        return sealed

    def finalize(self) -> bytes:
        packed = self.compressor.finalize()
        self.compressed_bytes += len(packed)
        sealed = self.sealer.update(packed) + self.sealer.finalize()
        self.stored_hash.update(sealed)
        return sealed


async def stream_child(
    argv: list[str],
    env: dict[str, str],
    encoder: Encoder,
    sink: BlobWriter,
    progress: BackupProgress | None = None,
    *,
    tool: str = "pg_dump",
) -> None:
    """Run ``argv`` (pg_dump, pg_basebackup) with its stdout through the encoder into ``sink``; raise with the
    tool's stderr tail unless it exits 0 and every byte is stored."""
    stderr = TailBuffer()
    read_fd, write_fd = os.pipe()
    reader = PipeReader(read_fd)
    lender = sink if isinstance(sink, BufferLender) else _Recycled(sink)
    try:
        async with child_process(argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd) as proc:
            os.close(write_fd)
            write_fd = -1
            # No queue: a filled buffer waits in the hand-over until the writer takes it (memory is the buffers).
            out_send, out_recv = anyio.create_memory_object_stream[tuple[bytearray, int]](0)
            async with task_group() as tg:
                tg.start_soon(drain_into, proc.stderr, stderr)
                tg.start_soon(_pump_stage, _Pump(reader, encoder), lender, out_send, progress)
                tg.start_soon(_write_stage, out_recv, lender)
                # The dump stage is pg_dump's life; encode and upload are its siblings, not its children.
                with stage("dump", pid=proc.pid) as dump_span:
                    returncode = await proc.wait()
                    annotate(dump_span, returncode=returncode)
            if returncode != 0:
                raise DumpError(failure_message(tool, returncode, stderr))
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        reader.close()


@runtime_checkable
class BufferLender(Protocol):
    """A writer that lends buffers to fill in place and takes them back full (an S3 upload's part buffers),
    so the bytes the pump seals are the bytes stored, without a copy. ``lend`` waits while all are in use."""

    async def lend(self) -> bytearray: ...

    async def write_lent(self, buffer: bytearray, length: int) -> None: ...


class _Recycled:
    """``BufferLender`` for a writer that takes bytes: ``FILL_BUFFERS`` buffers, each reused once written."""

    def __init__(self, sink: BlobWriter) -> None:
        self._sink = sink
        self._made = 0
        self._give_back, self._free = anyio.create_memory_object_stream[bytearray](FILL_BUFFERS)

    async def lend(self) -> bytearray:
        if self._made < FILL_BUFFERS:
            self._made += 1
            return bytearray(FILL_BYTES)
        return await self._free.receive()

    async def write_lent(self, buffer: bytearray, length: int) -> None:
        if length:
            await self._sink.write(memoryview(buffer)[:length])
        self._give_back.send_nowait(buffer)


@dataclass
class _Pump:
    """read → compress → seal → hash into a buffer, all in the worker thread that calls ``fill``.

    One hop per buffer: the thread reads pg_dump's pipe in ``READ_CHUNK`` pieces, runs each through the
    encoder and copies what it sealed into the buffer; sealed bytes that do not fit wait for the next one."""

    reader: PipeReader
    encoder: Encoder
    _pending: memoryview = field(default_factory=lambda: memoryview(b""))
    _ended: bool = False

    def fill(self, buffer: bytearray) -> tuple[int, bool]:
        """Fill ``buffer`` with the stream's next sealed bytes; how many, and whether the stream has ended (then
        they include its tail). Only the last buffer of a stream is short."""
        size = len(buffer)
        filled = 0
        with memoryview(buffer) as view:
            while filled < size:
                if self._pending:
                    take = min(len(self._pending), size - filled)
                    view[filled : filled + take] = self._pending[:take]
                    self._pending = self._pending[take:]
                    filled += take
                elif self._ended:
                    break
                else:
                    chunk = self.reader.read(READ_CHUNK)
                    if chunk:
                        self._pending = memoryview(self.encoder.update(chunk))
                    else:
                        self._pending = memoryview(self.encoder.finalize())
                        self._ended = True
        return filled, self._ended and not self._pending


async def _pump_stage(
    pump: _Pump,
    lender: BufferLender,
    send: MemoryObjectSendStream[tuple[bytearray, int]],
    progress: BackupProgress | None,
) -> None:
    with stage("encode") as span:
        async with send:
            ended = False
            while not ended:
                buffer = await lender.lend()
                # abandon_on_cancel: a cancelled backup must not wait for a read that only pg_dump's death (in
                # child_process's cleanup, after this task group) can end; the reader closes its own pipe.
                length, ended = await anyio.to_thread.run_sync(pump.fill, buffer, abandon_on_cancel=True)
                if progress is not None:
                    progress.bytes_done = pump.encoder.dump_bytes
                await send.send((buffer, length))
        annotate(span, dump_bytes=pump.encoder.dump_bytes, compressed_bytes=pump.encoder.compressed_bytes)


async def _write_stage(recv: MemoryObjectReceiveStream[tuple[bytearray, int]], lender: BufferLender) -> None:
    with stage("upload") as span:
        written = 0
        async with recv:
            async for buffer, length in recv:
                await lender.write_lent(buffer, length)
                written += length
        annotate(span, bytes=written)
