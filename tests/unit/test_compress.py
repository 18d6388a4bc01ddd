"""Compression codecs (kybdr_agent/backup/compress.py): round trips under random chunking, and refusal of
truncated, extended or corrupt compressed streams."""

from __future__ import annotations

import contextlib
import gzip

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.compress import CorruptCompressedData, Transform, compressor, decompressor
from kybdr_agent.backup.streamfmt import Compression

CODECS = [Compression.ZSTD, Compression.GZIP, Compression.NONE]
REAL_CODECS = [Compression.ZSTD, Compression.GZIP]

PROPS = settings(deadline=None, max_examples=100)

# Dump-like data: random bytes mixed with runs, so both incompressible and very compressible inputs occur.
payloads = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, 300)), max_size=20).map(
        lambda runs: b"".join(piece * count for piece, count in runs)
    ),
)
cut_lists = st.lists(st.integers(0, 100_000), max_size=12)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(min(c, len(data)) for c in cuts)
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


def run(transform: Transform, pieces: list[bytes]) -> bytes:
    return b"".join(transform.update(p) for p in pieces) + transform.finalize()


def compress(kind: Compression, data: bytes, cuts: list[int] | None = None, level: int | None = None) -> bytes:
    return run(compressor(kind, level), split_at(data, cuts or []))


def feed_all(kind: Compression, data: bytes, cuts: list[int]) -> bytes:
    """Decompress ``data`` fed in pieces; only ``finalize`` may complain about a clean prefix."""
    transform = decompressor(kind)
    out = b"".join(transform.update(p) for p in split_at(data, cuts))
    return out + transform.finalize()


@pytest.mark.parametrize("kind", CODECS)
@given(data=payloads, compress_cuts=cut_lists, decompress_cuts=cut_lists)
@PROPS
def test_round_trip_with_random_chunking(
    kind: Compression, data: bytes, compress_cuts: list[int], decompress_cuts: list[int]
) -> None:
    compressed = compress(kind, data, compress_cuts)
    assert feed_all(kind, compressed, decompress_cuts) == data


@pytest.mark.parametrize("kind", CODECS)
def test_empty_input_round_trips(kind: Compression) -> None:
    compressed = compress(kind, b"")
    assert feed_all(kind, compressed, []) == b""
    if kind is not Compression.NONE:
        assert compressed, "an empty stream still needs its codec's end marker"


@pytest.mark.parametrize(("kind", "level"), [(Compression.ZSTD, 1), (Compression.ZSTD, 19), (Compression.GZIP, 1)])
def test_explicit_levels_round_trip(kind: Compression, level: int) -> None:
    data = b"pg_dump custom archive " * 2000
    compressed = compress(kind, data, level=level)
    assert len(compressed) < len(data) // 10
    assert feed_all(kind, compressed, [100, 1000]) == data


def test_zstd_with_worker_threads_round_trips() -> None:
    data = bytes(range(256)) * 4000 + b"tail" * 1000
    transform = compressor(Compression.ZSTD, threads=2)
    compressed = run(transform, split_at(data, [1, 70_000, 500_000]))
    assert feed_all(Compression.ZSTD, compressed, [3, 9]) == data


def test_none_is_identity() -> None:
    comp, decomp = compressor(Compression.NONE), decompressor(Compression.NONE)
    assert comp.update(b"abc") == b"abc"
    assert comp.finalize() == b""
    assert decomp.update(b"xyz") == b"xyz"
    assert decomp.finalize() == b""


@given(payloads)
@PROPS
def test_gzip_output_is_standard_gzip_both_ways(data: bytes) -> None:
    assert gzip.decompress(compress(Compression.GZIP, data)) == data
    assert feed_all(Compression.GZIP, gzip.compress(data), []) == data


@given(payloads)
@PROPS
def test_zstd_output_is_standard_zstd_both_ways(data: bytes) -> None:
    ours = compress(Compression.ZSTD, data)
    reader = zstandard.ZstdDecompressor().decompressobj()
    assert reader.decompress(ours) == data
    theirs = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(data)
    assert feed_all(Compression.ZSTD, theirs, [5]) == data


@pytest.mark.parametrize("kind", REAL_CODECS)
@given(data=payloads, st_data=st.data())
@PROPS
def test_truncated_stream_fails_at_finalize(kind: Compression, data: bytes, st_data: st.DataObject) -> None:
    compressed = compress(kind, data)
    kept = st_data.draw(st.integers(0, len(compressed) - 1), label="kept")
    cuts = st_data.draw(st.lists(st.integers(0, kept), max_size=6), label="cuts")
    transform = decompressor(kind)
    released = b"".join(transform.update(p) for p in split_at(compressed[:kept], cuts))
    assert data.startswith(released)
    with pytest.raises(CorruptCompressedData):
        transform.finalize()


@pytest.mark.parametrize("kind", REAL_CODECS)
def test_every_truncation_of_a_small_stream_fails(kind: Compression) -> None:
    data = b"hello, world " * 50
    compressed = compress(kind, data)
    for kept in range(len(compressed)):
        transform = decompressor(kind)
        transform.update(compressed[:kept])
        with pytest.raises(CorruptCompressedData):
            transform.finalize()


@pytest.mark.parametrize("kind", REAL_CODECS)
@given(data=payloads, garbage=st.binary(min_size=1, max_size=64), st_data=st.data())
@PROPS
def test_trailing_garbage_fails(kind: Compression, data: bytes, garbage: bytes, st_data: st.DataObject) -> None:
    stream = compress(kind, data) + garbage
    cuts = st_data.draw(st.lists(st.integers(0, len(stream)), max_size=6), label="cuts")
    with pytest.raises(CorruptCompressedData):
        feed_all(kind, stream, cuts)


@pytest.mark.parametrize("kind", REAL_CODECS)
@pytest.mark.parametrize("same_chunk", [True, False])
def test_trailing_garbage_fails_in_update(kind: Compression, same_chunk: bool) -> None:
    stream = compress(kind, b"some data" * 10)
    transform = decompressor(kind)
    if same_chunk:
        last = stream + b"X"
    else:
        assert transform.update(stream) == b"some data" * 10
        last = b"X"
    with pytest.raises(CorruptCompressedData, match="after the end"):
        transform.update(last)


@pytest.mark.parametrize("kind", REAL_CODECS)
def test_a_second_concatenated_stream_is_refused(kind: Compression) -> None:
    one = compress(kind, b"first")
    with pytest.raises(CorruptCompressedData):
        feed_all(kind, one + compress(kind, b"second"), [])


@pytest.mark.parametrize("kind", REAL_CODECS)
def test_empty_updates_after_the_end_are_fine(kind: Compression) -> None:
    transform = decompressor(kind)
    out = transform.update(compress(kind, b"abc"))
    assert out + transform.update(b"") + transform.finalize() == b"abc"


@pytest.mark.parametrize("kind", REAL_CODECS)
@given(data=st.binary(max_size=200), st_data=st.data())
@PROPS
def test_arbitrary_bytes_never_raise_anything_but_corrupt(
    kind: Compression, data: bytes, st_data: st.DataObject
) -> None:
    cuts = st_data.draw(st.lists(st.integers(0, len(data)), max_size=4), label="cuts")
    with contextlib.suppress(CorruptCompressedData):
        feed_all(kind, data, cuts)


@pytest.mark.parametrize("kind", REAL_CODECS)
def test_garbage_input_is_corrupt(kind: Compression) -> None:
    with pytest.raises(CorruptCompressedData):
        feed_all(kind, b"this is not compressed at all" * 3, [])


def test_gzip_crc_mismatch_is_corrupt() -> None:
    stream = bytearray(compress(Compression.GZIP, b"payload " * 100))
    stream[-5] ^= 0xFF  # inside the CRC32 trailer
    with pytest.raises(CorruptCompressedData):
        feed_all(Compression.GZIP, bytes(stream), [])


@pytest.mark.parametrize("kind", REAL_CODECS)
@given(data=st.binary(min_size=1, max_size=2000), st_data=st.data())
@PROPS
def test_a_bit_flip_never_decodes_to_different_data(kind: Compression, data: bytes, st_data: st.DataObject) -> None:
    """docs/format.md: zstd frames carry an XXH64 content checksum and gzip a CRC32, so damage is caught by
    the codec itself; a flip may only go unnoticed where it cannot change the output (e.g. gzip's MTIME)."""
    stream = bytearray(compress(kind, data))
    index = st_data.draw(st.integers(0, len(stream) - 1), label="byte")
    stream[index] ^= 1 << st_data.draw(st.integers(0, 7), label="bit")
    try:
        out = feed_all(kind, bytes(stream), [])
    except CorruptCompressedData:
        return
    assert out == data


def test_zstd_frames_carry_a_content_checksum() -> None:
    frame = compress(Compression.ZSTD, b"checksummed " * 100)
    params = zstandard.get_frame_parameters(frame)
    assert params.has_checksum
