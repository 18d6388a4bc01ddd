"""The framed backup stream: a versioned header, then fixed-size sealed frames (specified in docs/format.md).

PURE: no I/O. The sealer and opener are sans-I/O byte transforms (``update()`` / ``finalize()``) so the
async pipeline only moves bytes between them, and so every property of the format can be tested without a
database or a store.

Why frames and not one AEAD over the whole dump: a dump is larger than memory, so it must be authenticated
piece by piece, and a restore must never hand ``pg_restore`` a byte that has not been authenticated. The
STREAM construction (Hoang–Reyhanitabar–Rogaway–Vizár, as in age and Tink) makes each frame's nonce
``prefix ‖ counter ‖ last-flag``: reordering changes the counter, truncation loses the frame sealed with
the last flag, and bytes appended after it have no frame to belong to — all three fail authentication.
The header is associated data of every frame, so flipping a header field (codec, key id, frame size) is
detected too.

When encryption is off the same framing is kept, with an (unkeyed, personalised) BLAKE2b tag over the same
associated data and position in place of GCM's tag: corruption, reordering and truncation are still caught
frame by frame, though without secrecy (anyone can recompute an unkeyed tag, so this protects against accidents, not
attackers; the manifest's SHA-256 covers the whole object as well).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC: Final = b"KYBDRSF\x00"
FORMAT_VERSION: Final = 1
TAG_SIZE: Final = 16
NONCE_PREFIX_SIZE: Final = 7
KEY_ID_SIZE: Final = 16
DATA_KEY_SIZE: Final = 32
DEFAULT_FRAME_SIZE: Final = 1 << 20
MIN_FRAME_SIZE: Final = 16
MAX_FRAME_SIZE: Final = 16 << 20
MAX_FRAMES: Final = 1 << 32

# magic, version, compression, cipher, reserved, frame size, key id, nonce prefix
_HEADER: Final = struct.Struct(f">8sBBBBI{KEY_ID_SIZE}s{NONCE_PREFIX_SIZE}s")
HEADER_SIZE: Final = _HEADER.size


class Compression(enum.IntEnum):
    """Codec applied to the dump before framing."""

    NONE = 0
    ZSTD = 1
    GZIP = 2


class Cipher(enum.IntEnum):
    """How frames are sealed."""

    NONE = 0  # integrity only: BLAKE2b-128 tag over position and header
    AES_256_GCM = 1


class StreamFormatError(ValueError):
    """The stream is not a valid kybdr stream: wrong magic, unknown version, or a malformed header."""


class StreamIntegrityError(ValueError):
    """A frame failed authentication: corrupt, truncated, reordered, extended, or the wrong key."""


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """Everything a reader needs to open the stream, bound as associated data to every frame."""

    compression: Compression
    cipher: Cipher
    frame_size: int
    key_id: bytes
    nonce_prefix: bytes
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not MIN_FRAME_SIZE <= self.frame_size <= MAX_FRAME_SIZE:
            raise StreamFormatError(f"frame size {self.frame_size} outside {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}")
        if len(self.key_id) != KEY_ID_SIZE:
            raise StreamFormatError(f"key id must be {KEY_ID_SIZE} bytes")
        if len(self.nonce_prefix) != NONCE_PREFIX_SIZE:
            raise StreamFormatError(f"nonce prefix must be {NONCE_PREFIX_SIZE} bytes")

    def encode(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            self.version,
            self.compression,
            self.cipher,
            0,
            self.frame_size,
            self.key_id,
            self.nonce_prefix,
        )

    @classmethod
    def decode(cls, data: bytes) -> StreamHeader:
        if len(data) < HEADER_SIZE:
            raise StreamFormatError(f"stream shorter than its {HEADER_SIZE}-byte header")
        magic, version, compression, cipher, reserved, frame_size, key_id, prefix = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise StreamFormatError("not a kybdr backup stream (bad magic)")
        if version != FORMAT_VERSION:
            raise StreamFormatError(f"unsupported stream format version {version}")
        if reserved != 0:
            raise StreamFormatError("reserved header byte is not zero")
        try:
            return cls(
                compression=Compression(compression),
                cipher=Cipher(cipher),
                frame_size=frame_size,
                key_id=key_id,
                nonce_prefix=prefix,
                version=version,
            )
        except ValueError as exc:
            raise StreamFormatError(f"bad stream header: {exc}") from exc

    @property
    def sealed_frame_size(self) -> int:
        return self.frame_size + TAG_SIZE


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    if counter >= MAX_FRAMES:
        raise StreamFormatError("stream exceeds the maximum number of frames")
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class _FrameCodec:
    """Seals and opens single frames under one header; the only place that knows the cipher."""

    def __init__(self, header: StreamHeader, data_key: bytes | None) -> None:
        self._header = header
        self._aad = header.encode()
        if header.cipher is Cipher.AES_256_GCM:
            if data_key is None or len(data_key) != DATA_KEY_SIZE:
                raise ValueError("AES-256-GCM frames need a 32-byte data key")
            self._aead: AESGCM | None = AESGCM(data_key)
        else:
            self._aead = None

    def _integrity_tag(self, nonce: bytes, payload: bytes) -> bytes:
        h = hashlib.blake2b(digest_size=TAG_SIZE, person=b"kybdr-frame-v1")
        h.update(self._aad)
        h.update(nonce)
        h.update(payload)
        return h.digest()

    def seal(self, counter: int, last: bool, plaintext: bytes) -> bytes:
        nonce = _nonce(self._header.nonce_prefix, counter, last)
        if self._aead is not None:
            return self._aead.encrypt(nonce, plaintext, self._aad)
        return plaintext + self._integrity_tag(nonce, plaintext)

    def open(self, counter: int, last: bool, sealed: bytes) -> bytes:
        nonce = _nonce(self._header.nonce_prefix, counter, last)
        where = f"frame {counter}{' (last)' if last else ''}"
        if self._aead is not None:
            try:
                return self._aead.decrypt(nonce, sealed, self._aad)
            except InvalidTag:
                raise StreamIntegrityError(
                    f"{where} failed authentication: the object is corrupt, truncated or reordered, "
                    "or was sealed with a different key"
                ) from None
        payload, tag = sealed[:-TAG_SIZE], sealed[-TAG_SIZE:]
        if not hmac.compare_digest(tag, self._integrity_tag(nonce, payload)):
            raise StreamIntegrityError(
                f"{where} failed its integrity check: the object is corrupt, truncated or reordered"
            )
        return payload


class StreamSealer:
    """Turns plaintext into the framed stream: header first, then one sealed frame per ``frame_size`` bytes.

    ``update()`` never seals the frame that might be the last one: it holds back up to one frame until
    more data proves it is not last, so the last flag is always right without knowing the length upfront.
    """

    def __init__(self, header: StreamHeader, data_key: bytes | None) -> None:
        self._codec = _FrameCodec(header, data_key)
        self._frame_size = header.frame_size
        self._pending = bytearray()
        self._counter = 0
        self._header_bytes: bytes | None = header.encode()
        self._finished = False

    def update(self, data: bytes) -> bytes:
        if self._finished:
            raise RuntimeError("update() after finalize()")
        self._pending += data
        out = bytearray(self._take_header())
        size = self._frame_size
        # Keep at least one byte pending: the frame holding the final byte is sealed only in finalize().
        while len(self._pending) > size:
            frame = bytes(self._pending[:size])
            del self._pending[:size]
            out += self._codec.seal(self._counter, False, frame)
            self._counter += 1
        return bytes(out)

    def finalize(self) -> bytes:
        if self._finished:
            raise RuntimeError("finalize() called twice")
        self._finished = True
        out = self._take_header() + self._codec.seal(self._counter, True, bytes(self._pending))
        self._pending.clear()
        self._counter += 1
        return out

    @property
    def frames_sealed(self) -> int:
        return self._counter

    def _take_header(self) -> bytes:
        header, self._header_bytes = self._header_bytes, None
        return header or b""


class StreamOpener:
    """Reads a framed stream back. ``update()`` returns only authenticated plaintext.

    A frame is opened as "not last" only once a byte beyond it has arrived; whatever remains at
    ``finalize()`` must open as the last frame, so a stream cut at a frame boundary is still detected.
    """

    def __init__(self, data_key: bytes | None = None, *, expected: StreamHeader | None = None) -> None:
        self._data_key = data_key
        self._expected = expected
        self._buffer = bytearray()
        self._header: StreamHeader | None = None
        self._codec: _FrameCodec | None = None
        self._counter = 0
        self._finished = False

    @property
    def header(self) -> StreamHeader | None:
        return self._header

    def update(self, data: bytes) -> bytes:
        if self._finished:
            raise RuntimeError("update() after finalize()")
        self._buffer += data
        if self._codec is None and not self._read_header():
            return b""
        assert self._codec is not None
        assert self._header is not None
        out = bytearray()
        sealed = self._header.sealed_frame_size
        while len(self._buffer) > sealed:
            frame = bytes(self._buffer[:sealed])
            del self._buffer[:sealed]
            out += self._codec.open(self._counter, False, frame)
            self._counter += 1
        return bytes(out)

    def finalize(self) -> bytes:
        if self._finished:
            raise RuntimeError("finalize() called twice")
        self._finished = True
        if self._codec is None and not self._read_header():
            raise StreamIntegrityError("stream truncated inside its header")
        assert self._codec is not None
        if len(self._buffer) < TAG_SIZE:
            raise StreamIntegrityError(f"stream truncated: {len(self._buffer)} bytes where the last frame should be")
        out = self._codec.open(self._counter, True, bytes(self._buffer))
        self._buffer.clear()
        self._counter += 1
        return out

    @property
    def frames_opened(self) -> int:
        return self._counter

    def _read_header(self) -> bool:
        if len(self._buffer) < HEADER_SIZE:
            return False
        header = StreamHeader.decode(bytes(self._buffer[:HEADER_SIZE]))
        if self._expected is not None and header != self._expected:
            raise StreamIntegrityError("stream header does not match the backup's manifest")
        del self._buffer[:HEADER_SIZE]
        if header.cipher is Cipher.AES_256_GCM and self._data_key is None:
            raise StreamIntegrityError(
                f"the stream is encrypted (key id {header.key_id.hex()}) and no data key was given"
            )
        self._header = header
        self._codec = _FrameCodec(header, self._data_key if header.cipher is Cipher.AES_256_GCM else None)
        return True
