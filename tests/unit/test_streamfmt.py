"""Properties of the framed backup stream (kybdr_agent/backup/streamfmt.py): header codec, sealing and opening
under arbitrary chunking on both sides, and detection of every kind of tampering."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kybdr_agent.backup import streamfmt
from kybdr_agent.backup.streamfmt import (
    DATA_KEY_SIZE,
    DEFAULT_FRAME_SIZE,
    FORMAT_VERSION,
    HEADER_SIZE,
    KEY_ID_SIZE,
    MAGIC,
    MAX_FRAME_SIZE,
    MAX_FRAMES,
    MIN_FRAME_SIZE,
    NONCE_PREFIX_SIZE,
    TAG_SIZE,
    Cipher,
    Compression,
    StreamFormatError,
    StreamHeader,
    StreamIntegrityError,
    StreamOpener,
    StreamSealer,
)

KEY = bytes(range(DATA_KEY_SIZE))
OTHER_KEY = bytes(reversed(range(DATA_KEY_SIZE)))
KEY_ID = b"K" * KEY_ID_SIZE
PREFIX = b"\x01\x02\x03\x04\x05\x06\x07"
STREAM_ERRORS = (StreamIntegrityError, StreamFormatError)

# Offsets of the header fields (">8sBBBBI16s7s").
VERSION_AT = 8
COMPRESSION_AT = 9
CIPHER_AT = 10
RESERVED_AT = 11
FRAME_SIZE_AT = 12

SLOW = settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(deadline=None, max_examples=100)

ciphers = st.sampled_from([Cipher.AES_256_GCM, Cipher.NONE])
frame_sizes = st.integers(MIN_FRAME_SIZE, 64)
payloads = st.binary(max_size=400)


def make_header(
    cipher: Cipher = Cipher.AES_256_GCM,
    frame_size: int = 16,
    compression: Compression = Compression.ZSTD,
    key_id: bytes = KEY_ID,
    nonce_prefix: bytes = PREFIX,
) -> StreamHeader:
    return StreamHeader(
        compression=compression, cipher=cipher, frame_size=frame_size, key_id=key_id, nonce_prefix=nonce_prefix
    )


def key_for(cipher: Cipher) -> bytes | None:
    return KEY if cipher is Cipher.AES_256_GCM else None


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the given offsets (clamped, sorted, duplicates give empty chunks)."""
    points = sorted(min(max(c, 0), len(data)) for c in cuts)
    pieces = []
    start = 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


def seal(data: bytes, header: StreamHeader, key: bytes | None, cuts: list[int] | None = None) -> bytes:
    sealer = StreamSealer(header, key)
    out = b"".join(sealer.update(piece) for piece in split_at(data, cuts or []))
    return out + sealer.finalize()


def open_stream(
    sealed: bytes,
    key: bytes | None,
    cuts: list[int] | None = None,
    expected: StreamHeader | None = None,
) -> tuple[bytes, Exception | None]:
    """Feed ``sealed`` to an opener; return everything it released and the error that stopped it, if any."""
    opener = StreamOpener(key, expected=expected)
    released = bytearray()
    try:
        for piece in split_at(sealed, cuts or []):
            released += opener.update(piece)
        released += opener.finalize()
    except STREAM_ERRORS as exc:
        return bytes(released), exc
    return bytes(released), None


def assert_rejected(sealed: bytes, key: bytes | None, plaintext: bytes, cuts: list[int] | None = None) -> None:
    released, error = open_stream(sealed, key, cuts)
    assert error is not None, "a damaged stream was opened without any error"
    assert plaintext.startswith(released), "the opener released bytes that are not the true plaintext"


def frames_of(sealed: bytes, header: StreamHeader) -> list[bytes]:
    body = sealed[HEADER_SIZE:]
    size = header.sealed_frame_size
    return [body[i : i + size] for i in range(0, len(body), size)]


# --------------------------------------------------------------------------------------------- header


headers = st.builds(
    StreamHeader,
    compression=st.sampled_from(list(Compression)),
    cipher=ciphers,
    frame_size=st.integers(MIN_FRAME_SIZE, MAX_FRAME_SIZE),
    key_id=st.binary(min_size=KEY_ID_SIZE, max_size=KEY_ID_SIZE),
    nonce_prefix=st.binary(min_size=NONCE_PREFIX_SIZE, max_size=NONCE_PREFIX_SIZE),
)


@given(headers)
@FAST
def test_header_round_trip(header: StreamHeader) -> None:
    encoded = header.encode()
    assert len(encoded) == HEADER_SIZE
    assert encoded.startswith(MAGIC)
    assert StreamHeader.decode(encoded) == header


@given(headers, st.binary(max_size=64))
@FAST
def test_header_decode_ignores_bytes_after_the_header(header: StreamHeader, tail: bytes) -> None:
    assert StreamHeader.decode(header.encode() + tail) == header


def test_header_layout_is_pinned() -> None:
    header = make_header(Cipher.AES_256_GCM, DEFAULT_FRAME_SIZE, Compression.GZIP)
    expected = MAGIC + bytes([FORMAT_VERSION, 2, 1, 0]) + struct.pack(">I", DEFAULT_FRAME_SIZE) + KEY_ID + PREFIX
    assert header.encode() == expected
    assert HEADER_SIZE == 39
    assert header.sealed_frame_size == DEFAULT_FRAME_SIZE + TAG_SIZE


@given(headers, st.integers(0, len(MAGIC) - 1), st.integers(1, 255))
@FAST
def test_header_rejects_bad_magic(header: StreamHeader, index: int, xor: int) -> None:
    raw = bytearray(header.encode())
    raw[index] ^= xor
    with pytest.raises(StreamFormatError, match="magic"):
        StreamHeader.decode(bytes(raw))


@given(headers, st.integers(0, 255).filter(lambda v: v != FORMAT_VERSION))
@FAST
def test_header_rejects_unknown_version(header: StreamHeader, version: int) -> None:
    raw = bytearray(header.encode())
    raw[VERSION_AT] = version
    with pytest.raises(StreamFormatError, match="version"):
        StreamHeader.decode(bytes(raw))


@given(headers, st.integers(1, 255))
@FAST
def test_header_rejects_nonzero_reserved_byte(header: StreamHeader, reserved: int) -> None:
    raw = bytearray(header.encode())
    raw[RESERVED_AT] = reserved
    with pytest.raises(StreamFormatError, match="reserved"):
        StreamHeader.decode(bytes(raw))


@given(
    headers,
    st.one_of(st.integers(0, MIN_FRAME_SIZE - 1), st.integers(MAX_FRAME_SIZE + 1, 2**32 - 1)),
)
@FAST
def test_header_rejects_frame_size_out_of_range(header: StreamHeader, frame_size: int) -> None:
    raw = bytearray(header.encode())
    raw[FRAME_SIZE_AT : FRAME_SIZE_AT + 4] = struct.pack(">I", frame_size)
    with pytest.raises(StreamFormatError, match="frame size"):
        StreamHeader.decode(bytes(raw))


@pytest.mark.parametrize("at", [COMPRESSION_AT, CIPHER_AT])
@pytest.mark.parametrize("value", [3, 0x7F, 0xFF])
def test_header_rejects_unknown_codec_or_cipher(at: int, value: int) -> None:
    raw = bytearray(make_header().encode())
    raw[at] = value
    with pytest.raises(StreamFormatError, match="bad stream header"):
        StreamHeader.decode(bytes(raw))


@given(headers, st.data())
@FAST
def test_header_rejects_short_input(header: StreamHeader, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, HEADER_SIZE - 1))
    with pytest.raises(StreamFormatError, match="shorter"):
        StreamHeader.decode(header.encode()[:cut])


@pytest.mark.parametrize("frame_size", [0, MIN_FRAME_SIZE - 1, MAX_FRAME_SIZE + 1, -1])
def test_header_constructor_rejects_frame_size(frame_size: int) -> None:
    with pytest.raises(StreamFormatError):
        make_header(frame_size=frame_size)


@pytest.mark.parametrize("frame_size", [MIN_FRAME_SIZE, MAX_FRAME_SIZE])
def test_header_constructor_accepts_frame_size_bounds(frame_size: int) -> None:
    assert make_header(frame_size=frame_size).frame_size == frame_size


@pytest.mark.parametrize("size", [0, KEY_ID_SIZE - 1, KEY_ID_SIZE + 1])
def test_header_constructor_rejects_key_id_length(size: int) -> None:
    with pytest.raises(StreamFormatError, match="key id"):
        make_header(key_id=b"k" * size)


@pytest.mark.parametrize("size", [0, NONCE_PREFIX_SIZE - 1, NONCE_PREFIX_SIZE + 1])
def test_header_constructor_rejects_nonce_prefix_length(size: int) -> None:
    with pytest.raises(StreamFormatError, match="nonce prefix"):
        make_header(nonce_prefix=b"n" * size)


# ------------------------------------------------------------------------------------------ round trip


@given(ciphers, frame_sizes, payloads, st.lists(st.integers(0, 400)), st.lists(st.integers(0, 800)))
@SLOW
def test_round_trip_with_independent_chunking(
    cipher: Cipher, frame_size: int, plaintext: bytes, seal_cuts: list[int], open_cuts: list[int]
) -> None:
    header = make_header(cipher, frame_size)
    sealed = seal(plaintext, header, key_for(cipher), seal_cuts)
    released, error = open_stream(sealed, key_for(cipher), open_cuts)
    assert error is None
    assert released == plaintext


@given(ciphers, frame_sizes, st.integers(0, 6), st.lists(st.integers(0, 400)), st.lists(st.integers(0, 800)))
@SLOW
def test_round_trip_exact_multiples_of_frame_size(
    cipher: Cipher, frame_size: int, frames: int, seal_cuts: list[int], open_cuts: list[int]
) -> None:
    plaintext = bytes(i % 251 for i in range(frames * frame_size))
    header = make_header(cipher, frame_size)
    sealer = StreamSealer(header, key_for(cipher))
    sealed = b"".join(sealer.update(p) for p in split_at(plaintext, seal_cuts)) + sealer.finalize()
    # The frame holding the final byte is the last one; an empty stream still has one (empty) last frame.
    assert sealer.frames_sealed == max(frames, 1)
    assert len(sealed) == HEADER_SIZE + len(plaintext) + TAG_SIZE * max(frames, 1)
    opener = StreamOpener(key_for(cipher))
    released = b"".join(opener.update(p) for p in split_at(sealed, open_cuts)) + opener.finalize()
    assert released == plaintext
    assert opener.frames_opened == max(frames, 1)
    assert opener.header == header


@pytest.mark.parametrize("cipher", [Cipher.AES_256_GCM, Cipher.NONE])
def test_empty_input_is_one_empty_last_frame(cipher: Cipher) -> None:
    header = make_header(cipher)
    sealer = StreamSealer(header, key_for(cipher))
    sealed = sealer.finalize()
    assert len(sealed) == HEADER_SIZE + TAG_SIZE
    assert sealer.frames_sealed == 1
    assert open_stream(sealed, key_for(cipher)) == (b"", None)


@pytest.mark.parametrize("cipher", [Cipher.AES_256_GCM, Cipher.NONE])
def test_header_is_emitted_by_first_call_even_without_data(cipher: Cipher) -> None:
    header = make_header(cipher)
    sealer = StreamSealer(header, key_for(cipher))
    assert sealer.update(b"") == header.encode()
    assert sealer.update(b"x" * 16) == b""  # one full frame is held back: it might be the last
    assert len(sealer.update(b"y")) == header.sealed_frame_size


@given(ciphers, frame_sizes, payloads)
@FAST
def test_sealed_size_is_header_plus_payload_plus_tags(cipher: Cipher, frame_size: int, plaintext: bytes) -> None:
    sealer = StreamSealer(make_header(cipher, frame_size), key_for(cipher))
    sealed = sealer.update(plaintext) + sealer.finalize()
    frames = max(1, -(-len(plaintext) // frame_size))
    assert sealer.frames_sealed == frames
    assert len(sealed) == HEADER_SIZE + len(plaintext) + TAG_SIZE * frames


@given(frame_sizes, st.binary(min_size=32, max_size=300))
@FAST
def test_aes_frames_follow_the_stream_construction(frame_size: int, plaintext: bytes) -> None:
    """Each frame is AES-GCM under nonce ``prefix ‖ counter ‖ last`` with the header as associated data."""
    header = make_header(Cipher.AES_256_GCM, frame_size)
    sealed = seal(plaintext, header, KEY)
    frames = frames_of(sealed, header)
    for counter, frame in enumerate(frames):
        last = counter == len(frames) - 1
        nonce = PREFIX + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")
        chunk = plaintext[counter * frame_size : (counter + 1) * frame_size]
        assert frame == AESGCM(KEY).encrypt(nonce, chunk, header.encode())


def test_none_cipher_frames_are_plaintext_plus_blake2b_tag() -> None:
    header = make_header(Cipher.NONE, 16)
    plaintext = b"A" * 16 + b"B" * 5
    frames = frames_of(seal(plaintext, header, None), header)
    assert len(frames) == 2
    for counter, (frame, chunk, last) in enumerate(
        [(frames[0], plaintext[:16], False), (frames[1], plaintext[16:], True)]
    ):
        nonce = PREFIX + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")
        tag = hashlib.blake2b(header.encode() + nonce + chunk, digest_size=TAG_SIZE, person=b"kybdr-frame-v1")
        assert frame == chunk + tag.digest()


def test_different_nonce_prefixes_give_different_ciphertext() -> None:
    plaintext = b"same plaintext, same key" * 3
    one = seal(plaintext, make_header(nonce_prefix=b"\x00" * 7), KEY)
    two = seal(plaintext, make_header(nonce_prefix=b"\x00" * 6 + b"\x01"), KEY)
    assert one[HEADER_SIZE:] != two[HEADER_SIZE:]


def test_opener_with_expected_header_accepts_the_same_header() -> None:
    header = make_header(Cipher.AES_256_GCM, 32)
    sealed = seal(b"payload" * 20, header, KEY)
    assert open_stream(sealed, KEY, expected=header) == (b"payload" * 20, None)


def test_opener_exposes_header_only_once_read() -> None:
    header = make_header()
    sealed = seal(b"abc", header, KEY)
    opener = StreamOpener(KEY)
    assert opener.header is None
    assert opener.update(sealed[: HEADER_SIZE - 1]) == b""
    assert opener.header is None
    assert opener.update(sealed[HEADER_SIZE - 1 : HEADER_SIZE]) == b""
    assert opener.header == header


def test_none_cipher_stream_opens_even_if_a_key_is_given() -> None:
    header = make_header(Cipher.NONE)
    assert open_stream(seal(b"xyz" * 10, header, None), KEY) == (b"xyz" * 10, None)


def test_frame_counter_limit() -> None:
    """At most 2**32 frames: the counter is 4 bytes of the nonce and must never wrap."""
    assert streamfmt._nonce(PREFIX, 0, False) == PREFIX + b"\x00\x00\x00\x00\x00"
    assert streamfmt._nonce(PREFIX, MAX_FRAMES - 1, True) == PREFIX + b"\xff\xff\xff\xff\x01"
    with pytest.raises(StreamFormatError, match="maximum number of frames"):
        streamfmt._nonce(PREFIX, MAX_FRAMES, False)


# ------------------------------------------------------------------------------------------- misuse


@pytest.mark.parametrize("key", [None, b"", b"k" * 16, b"k" * 31, b"k" * 33])
def test_aes_needs_a_32_byte_key(key: bytes | None) -> None:
    with pytest.raises(ValueError, match="32-byte"):
        StreamSealer(make_header(Cipher.AES_256_GCM), key)


def test_aes_stream_without_a_key_is_refused() -> None:
    sealed = seal(b"secret", make_header(Cipher.AES_256_GCM), KEY)
    released, error = open_stream(sealed, None)
    assert released == b""
    assert isinstance(error, StreamIntegrityError)
    assert KEY_ID.hex() in str(error)


def test_sealer_rejects_use_after_finalize() -> None:
    sealer = StreamSealer(make_header(), KEY)
    sealer.finalize()
    with pytest.raises(RuntimeError):
        sealer.update(b"x")
    with pytest.raises(RuntimeError):
        sealer.finalize()


def test_opener_rejects_use_after_finalize() -> None:
    opener = StreamOpener(KEY)
    opener.update(seal(b"x", make_header(), KEY))
    opener.finalize()
    with pytest.raises(RuntimeError):
        opener.update(b"x")
    with pytest.raises(RuntimeError):
        opener.finalize()


@pytest.mark.parametrize("length", [0, 1, HEADER_SIZE - 1])
def test_stream_truncated_inside_header(length: int) -> None:
    sealed = seal(b"data", make_header(), KEY)
    released, error = open_stream(sealed[:length], KEY)
    assert released == b""
    assert isinstance(error, StreamIntegrityError)
    assert "header" in str(error)


# ------------------------------------------------------------------------------------------- tampering


@given(ciphers, frame_sizes, payloads, st.data())
@SLOW
def test_any_single_bit_flip_is_detected(
    cipher: Cipher, frame_size: int, plaintext: bytes, data: st.DataObject
) -> None:
    sealed = bytearray(seal(plaintext, make_header(cipher, frame_size), key_for(cipher)))
    index = data.draw(st.integers(0, len(sealed) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    sealed[index] ^= 1 << bit
    cuts = data.draw(st.lists(st.integers(0, len(sealed))), label="open cuts")
    assert_rejected(bytes(sealed), key_for(cipher), plaintext, cuts)


@pytest.mark.parametrize("cipher", [Cipher.AES_256_GCM, Cipher.NONE])
def test_every_bit_flip_in_a_small_stream_is_detected(cipher: Cipher) -> None:
    plaintext = bytes(range(40))  # three frames of 16: full, full, partial
    sealed = seal(plaintext, make_header(cipher, 16), key_for(cipher))
    for index in range(len(sealed)):
        for bit in range(8):
            damaged = bytearray(sealed)
            damaged[index] ^= 1 << bit
            assert_rejected(bytes(damaged), key_for(cipher), plaintext)


@given(ciphers, frame_sizes, payloads, st.data())
@SLOW
def test_truncation_anywhere_is_detected(
    cipher: Cipher, frame_size: int, plaintext: bytes, data: st.DataObject
) -> None:
    sealed = seal(plaintext, make_header(cipher, frame_size), key_for(cipher))
    length = data.draw(st.integers(0, len(sealed) - 1), label="kept")
    cuts = data.draw(st.lists(st.integers(0, length)), label="open cuts")
    assert_rejected(sealed[:length], key_for(cipher), plaintext, cuts)


@given(ciphers, frame_sizes, st.binary(min_size=1, max_size=400), st.data())
@SLOW
def test_truncation_at_frame_boundaries_is_detected(
    cipher: Cipher, frame_size: int, plaintext: bytes, data: st.DataObject
) -> None:
    header = make_header(cipher, frame_size)
    sealed = seal(plaintext, header, key_for(cipher))
    frames = frames_of(sealed, header)
    keep = data.draw(st.integers(0, len(frames) - 1), label="frames kept")
    truncated = header.encode() + b"".join(frames[:keep])
    assert_rejected(truncated, key_for(cipher), plaintext)


@pytest.mark.parametrize("cipher", [Cipher.AES_256_GCM, Cipher.NONE])
@pytest.mark.parametrize("length", [16, 17, 31, 32, 33, 48, 64])
def test_removing_the_whole_last_frame_is_detected(cipher: Cipher, length: int) -> None:
    header = make_header(cipher, 16)
    plaintext = bytes(range(length))
    sealed = seal(plaintext, header, key_for(cipher))
    frames = frames_of(sealed, header)
    assert len(frames) >= 1
    truncated = header.encode() + b"".join(frames[:-1])
    released, error = open_stream(truncated, key_for(cipher))
    assert isinstance(error, StreamIntegrityError)
    assert plaintext.startswith(released)


@given(ciphers, frame_sizes, st.data())
@SLOW
def test_swapping_two_frames_is_detected(cipher: Cipher, frame_size: int, data: st.DataObject) -> None:
    plaintext = data.draw(st.binary(min_size=frame_size + 1, max_size=400), label="plaintext")
    header = make_header(cipher, frame_size)
    frames = frames_of(seal(plaintext, header, key_for(cipher)), header)
    i = data.draw(st.integers(0, len(frames) - 2), label="i")
    j = data.draw(st.integers(i + 1, len(frames) - 1), label="j")
    frames[i], frames[j] = frames[j], frames[i]
    assert_rejected(header.encode() + b"".join(frames), key_for(cipher), plaintext)


@pytest.mark.parametrize("cipher", [Cipher.AES_256_GCM, Cipher.NONE])
def test_swapping_frames_with_identical_plaintext_is_detected(cipher: Cipher) -> None:
    header = make_header(cipher, 16)
    plaintext = b"\x00" * 48  # three identical frames: only the position tells them apart
    frames = frames_of(seal(plaintext, header, key_for(cipher)), header)
    assert len(set(frames)) == 3
    frames[0], frames[1] = frames[1], frames[0]
    assert_rejected(header.encode() + b"".join(frames), key_for(cipher), plaintext)


@given(ciphers, frame_sizes, st.data())
@SLOW
def test_dropping_or_duplicating_a_middle_frame_is_detected(
    cipher: Cipher, frame_size: int, data: st.DataObject
) -> None:
    plaintext = data.draw(st.binary(min_size=frame_size + 1, max_size=400), label="plaintext")
    header = make_header(cipher, frame_size)
    frames = frames_of(seal(plaintext, header, key_for(cipher)), header)
    i = data.draw(st.integers(0, len(frames) - 2), label="i")
    dropped = frames[:i] + frames[i + 1 :]
    duplicated = frames[: i + 1] + frames[i:]
    assert_rejected(header.encode() + b"".join(dropped), key_for(cipher), plaintext)
    assert_rejected(header.encode() + b"".join(duplicated), key_for(cipher), plaintext)


@given(ciphers, frame_sizes, payloads, st.binary(min_size=1, max_size=100), st.data())
@SLOW
def test_appended_bytes_are_detected(
    cipher: Cipher, frame_size: int, plaintext: bytes, extra: bytes, data: st.DataObject
) -> None:
    sealed = seal(plaintext, make_header(cipher, frame_size), key_for(cipher)) + extra
    cuts = data.draw(st.lists(st.integers(0, len(sealed))), label="open cuts")
    assert_rejected(sealed, key_for(cipher), plaintext, cuts)


@pytest.mark.parametrize("cipher", [Cipher.AES_256_GCM, Cipher.NONE])
def test_appending_a_whole_valid_stream_is_detected(cipher: Cipher) -> None:
    header = make_header(cipher, 16)
    one = seal(b"first" * 5, header, key_for(cipher))
    assert_rejected(one + one[HEADER_SIZE:], key_for(cipher), b"first" * 5)
    assert_rejected(one + one, key_for(cipher), b"first" * 5)


@given(frame_sizes, payloads, st.binary(min_size=DATA_KEY_SIZE, max_size=DATA_KEY_SIZE), st.data())
@FAST
def test_wrong_data_key_is_detected(frame_size: int, plaintext: bytes, wrong: bytes, data: st.DataObject) -> None:
    if wrong == KEY:
        wrong = OTHER_KEY
    sealed = seal(plaintext, make_header(Cipher.AES_256_GCM, frame_size), KEY)
    cuts = data.draw(st.lists(st.integers(0, len(sealed))), label="open cuts")
    released, error = open_stream(sealed, wrong, cuts)
    assert isinstance(error, StreamIntegrityError)
    assert released == b""


def _other_headers(header: StreamHeader) -> list[StreamHeader]:
    return [
        make_header(header.cipher, header.frame_size, Compression.GZIP, header.key_id, header.nonce_prefix),
        make_header(header.cipher, header.frame_size + 1, header.compression, header.key_id, header.nonce_prefix),
        make_header(header.cipher, header.frame_size, header.compression, b"X" * KEY_ID_SIZE, header.nonce_prefix),
        make_header(header.cipher, header.frame_size, header.compression, header.key_id, b"\xff" * 7),
        make_header(
            Cipher.NONE if header.cipher is Cipher.AES_256_GCM else Cipher.AES_256_GCM,
            header.frame_size,
            header.compression,
            header.key_id,
            header.nonce_prefix,
        ),
    ]


@pytest.mark.parametrize("cipher", [Cipher.AES_256_GCM, Cipher.NONE])
@pytest.mark.parametrize("which", range(5))
def test_expected_header_mismatch_is_detected(cipher: Cipher, which: int) -> None:
    header = make_header(cipher, 32, Compression.ZSTD)
    sealed = seal(b"payload" * 10, header, key_for(cipher))
    released, error = open_stream(sealed, KEY, expected=_other_headers(header)[which])
    assert released == b""
    assert isinstance(error, StreamIntegrityError)
    assert "manifest" in str(error)


@pytest.mark.parametrize("cipher", [Cipher.AES_256_GCM, Cipher.NONE])
def test_header_field_substitution_is_detected_without_expected(cipher: Cipher) -> None:
    """Re-encoding a valid header with another codec or key id (a consistent forgery, not a bit flip) fails."""
    header = make_header(cipher, 32, Compression.ZSTD)
    plaintext = b"payload" * 10
    sealed = seal(plaintext, header, key_for(cipher))
    for other in _other_headers(header)[:4]:
        assert_rejected(other.encode() + sealed[HEADER_SIZE:], key_for(cipher), plaintext)


@given(
    ciphers,
    frame_sizes,
    st.binary(min_size=1, max_size=300),
    st.data(),
)
@SLOW
def test_opener_never_releases_unauthenticated_plaintext(
    cipher: Cipher, frame_size: int, plaintext: bytes, data: st.DataObject
) -> None:
    """Corrupt the last byte of one frame (its tag): nothing of that frame, or of any frame after it, is ever
    released, however the stream is chunked; fed a frame at a time, every frame before it is.

    Only a prefix is required under arbitrary chunking: an ``update()`` that opens several frames and then
    meets the damaged one raises without returning the good frames it had just authenticated (the caller
    gets the error instead, and the restore fails either way) — dropping authenticated plaintext is safe,
    releasing unauthenticated plaintext is not."""
    header = make_header(cipher, frame_size)
    frames = frames_of(seal(plaintext, header, key_for(cipher)), header)
    victim = data.draw(st.integers(0, len(frames) - 1), label="frame")
    damaged = bytearray(frames[victim])
    damaged[-1] ^= 0x01
    frames[victim] = bytes(damaged)
    stream = header.encode() + b"".join(frames)
    before_victim = plaintext[: victim * frame_size]
    cuts = data.draw(st.lists(st.integers(0, len(stream))), label="open cuts")
    released, error = open_stream(stream, key_for(cipher), cuts)
    assert isinstance(error, StreamIntegrityError)
    assert before_victim.startswith(released), "released bytes of the damaged frame or beyond"
    assert len(released) % frame_size == 0, "released part of a frame"
    frame_by_frame = [HEADER_SIZE + i * header.sealed_frame_size for i in range(len(frames))]
    released, error = open_stream(stream, key_for(cipher), frame_by_frame)
    assert isinstance(error, StreamIntegrityError)
    assert released == before_victim
