"""Compression codecs as sans-I/O transforms (CPU only; callers run them in worker threads).

zstd is the default: on realistic dumps it is ~5× faster than gzip for a slightly better ratio
(shared/research/perf-anchors.md). gzip stays for the seed's compatibility. Both libraries release the GIL
while they work, which is what lets compression overlap with reading ``pg_dump``'s pipe.
"""

from __future__ import annotations

import zlib
from typing import Final, Protocol

import zstandard

from kybdr_agent.backup.streamfmt import Compression

DEFAULT_ZSTD_LEVEL: Final = 3
DEFAULT_GZIP_LEVEL: Final = 6
_GZIP_WBITS: Final = 31  # zlib's window bits for the gzip container (header + CRC32 trailer)


class CorruptCompressedData(ValueError):
    """The compressed stream is malformed or ends before its codec's end marker."""


class Transform(Protocol):
    """A byte transform fed in pieces: ``update()`` any number of times, then ``finalize()`` once."""

    def update(self, data: bytes) -> bytes: ...

    def finalize(self) -> bytes: ...


class _Identity:
    def update(self, data: bytes) -> bytes:
        return data

    def finalize(self) -> bytes:
        return b""


ZSTD_JOB_SIZE: Final = 512 << 10  # libzstd's smallest
ZSTD_OVERLAP_LOG: Final = 4  # each job starts from the last 1/32 of the window (64 KiB at level 3)


class _ZstdCompress:
    def __init__(self, level: int, threads: int) -> None:
        # The frame's content checksum (XXH64) lets decompression prove the dump came back byte for byte,
        # end to end, at a fraction of a second SHA-256's cost.
        if threads > 0:
            # libzstd's own worker compresses while the calling thread seals, hashes and hands over: that
            # overlap is what keeps pace with the shell's `zstd` (benchmarks/backup_bench.py). Its buffers
            # scale with the job size: at level 3 its default costs ~45 MiB, 2 MiB jobs ~13 MiB, 512 KiB
            # jobs ~5 MiB. A job first indexes the overlap it shares with the one before (by default an
            # eighth of the 2 MiB window: half a 512 KiB job, +10 % wall time); with 64 KiB of overlap the
            # small jobs are as fast as 2 MiB ones and the dump no larger (dataset B: 1 % smaller).
            params = zstandard.ZstdCompressionParameters.from_level(
                level,
                threads=threads,
                job_size=ZSTD_JOB_SIZE,
                overlap_log=ZSTD_OVERLAP_LOG,
                write_checksum=True,
            )
            compressor = zstandard.ZstdCompressor(compression_params=params)
        else:
            compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._obj = compressor.compressobj()

    def update(self, data: bytes) -> bytes:
        return bytes(self._obj.compress(data))

    def finalize(self) -> bytes:
        return bytes(self._obj.flush())


class _ZstdDecompress:
    def __init__(self) -> None:
        self._obj = zstandard.ZstdDecompressor().decompressobj()

    def _at_end(self) -> bool:
        return bool(self._obj.eof)

    def update(self, data: bytes) -> bytes:
        if self._at_end():
            if data:
                raise CorruptCompressedData("data after the end of the zstd frame")
            return b""
        try:
            out = bytes(self._obj.decompress(data))
        except zstandard.ZstdError as exc:
            raise CorruptCompressedData(f"zstd: {exc}") from exc
        if self._at_end() and self._obj.unused_data:
            raise CorruptCompressedData("data after the end of the zstd frame")
        return out

    def finalize(self) -> bytes:
        if not self._at_end():
            raise CorruptCompressedData("zstd stream ends before its final block")
        return b""


class _GzipCompress:
    def __init__(self, level: int) -> None:
        self._obj = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)

    def update(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def finalize(self) -> bytes:
        return self._obj.flush()


class _GzipDecompress:
    def __init__(self) -> None:
        self._obj = zlib.decompressobj(_GZIP_WBITS)

    def update(self, data: bytes) -> bytes:
        if self._obj.eof:
            if data:
                raise CorruptCompressedData("data after the end of the gzip member")
            return b""
        try:
            out = self._obj.decompress(data)
        except zlib.error as exc:
            raise CorruptCompressedData(f"gzip: {exc}") from exc
        if self._obj.unused_data:
            raise CorruptCompressedData("data after the end of the gzip member")
        return out

    def finalize(self) -> bytes:
        if not self._obj.eof:
            raise CorruptCompressedData("gzip stream ends before its trailer")
        return self._obj.flush()


def compressor(kind: Compression, level: int | None = None, threads: int = 0) -> Transform:
    """A fresh compressor; ``threads`` > 0 lets libzstd compress beside the calling thread."""
    if kind is Compression.ZSTD:
        return _ZstdCompress(DEFAULT_ZSTD_LEVEL if level is None else level, threads)
    if kind is Compression.GZIP:
        return _GzipCompress(DEFAULT_GZIP_LEVEL if level is None else level)
    return _Identity()


def decompressor(kind: Compression) -> Transform:
    """A fresh decompressor that insists on its codec's end marker, so truncation never passes silently."""
    if kind is Compression.ZSTD:
        return _ZstdDecompress()
    if kind is Compression.GZIP:
        return _GzipDecompress()
    return _Identity()
