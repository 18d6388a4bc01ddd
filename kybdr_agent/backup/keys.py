"""Master keys, the key ring, and per-backup data keys.

Each backup gets a fresh random 256-bit data key; only its wrapped form is stored, in the manifest: sealed
with AES-256-GCM under a key file's master key and bound to the backup id (``wrap = "aes-256-gcm"``), or
made and wrapped by AWS KMS (``wrap = "aws-kms"``, ``kms.py``). Changing the master key therefore never
touches old backups: the old key stays in the ring (``encryption.old_key_files``, or ``kms_key_id`` when the
provider is a file) so they can still be opened, and ``kybdr-agent key rotate`` (``rotate.py``) re-wraps
their data keys under the new one, after which the old key can go. A key id derived from the key itself
(for KMS, the key's own id) tells which ring entry a backup needs, with no naming to keep in sync.

The ring's operations are async because a KMS key is a network service: ``new_data_key`` (a backup),
``open`` (restore, validation) and ``rewrap`` (rotation). A key file's are the same operations done locally.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kybdr_agent.backup.manifest import Encryption
from kybdr_agent.backup.streamfmt import DATA_KEY_SIZE, KEY_ID_SIZE

MASTER_KEY_SIZE: Final = 32
WRAP_ALGORITHM: Final = "aes-256-gcm"
_WRAP_NONCE_SIZE: Final = 12
_WRAP_TAG_SIZE: Final = 16
_HEX_KEY: Final = re.compile(rb"[0-9a-fA-F]{64}")
_WRAP_AAD_PREFIX: Final = b"kybdr-data-key-v1:"


class KeyMaterialError(ValueError):
    """A key file is missing, unreadable or malformed, or no key in the ring opens a backup."""


@dataclass(frozen=True)
class NewDataKey:
    """A fresh data key for one backup: the plaintext that seals its stream, and the manifest's record of it."""

    plaintext: bytes = field(repr=False)
    encryption: Encryption

    @property
    def key_id(self) -> bytes:
        """The id for the stream header: the master key that wrapped this data key."""
        assert self.encryption.key_id is not None
        return bytes.fromhex(self.encryption.key_id)


def data_key_encryption(key_id: bytes, wrap: str, wrapped: str) -> Encryption:
    return Encryption(cipher="aes-256-gcm", key_id=key_id.hex(), wrap=wrap, wrapped_data_key=wrapped)


class WrappingKey(Protocol):
    """A master key of the ring: a key file (``MasterKey``) or a KMS key (``kms.KmsKey``).

    ``known_key_id`` is None only for a KMS alias not yet resolved; ``resolve_key_id()`` resolves it."""

    wrap_algorithm: ClassVar[str]

    @property
    def label(self) -> str: ...

    @property
    def known_key_id(self) -> bytes | None: ...

    async def resolve_key_id(self) -> bytes: ...

    async def generate(self, backup_id: str) -> NewDataKey: ...

    async def wrap_data_key(self, data_key: bytes, backup_id: str) -> tuple[bytes, str]: ...

    async def unwrap_data_key(self, wrapped: str, backup_id: str) -> bytes: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class MasterKey:
    """A 32-byte master key and its id (the first 16 bytes of an HMAC of a fixed label under the key).

    ``source`` says where it came from ("encryption.key_file /etc/…"), for messages; it is not compared."""

    material: bytes = field(repr=False)
    source: str = field(default="a key file", compare=False)
    wrap_algorithm: ClassVar[str] = WRAP_ALGORITHM

    def __post_init__(self) -> None:
        if len(self.material) != MASTER_KEY_SIZE:
            raise KeyMaterialError(f"a master key is {MASTER_KEY_SIZE} bytes, got {len(self.material)}")

    @property
    def key_id(self) -> bytes:
        return hmac.new(self.material, b"kybdr key id v1", hashlib.sha256).digest()[:KEY_ID_SIZE]

    def wrap(self, data_key: bytes, backup_id: str) -> str:
        """Seal a data key for one backup; binding the id stops a wrapped key being moved to another."""
        nonce = os.urandom(_WRAP_NONCE_SIZE)
        sealed = AESGCM(self.material).encrypt(nonce, data_key, _WRAP_AAD_PREFIX + backup_id.encode())
        return base64.b64encode(nonce + sealed).decode("ascii")

    def unwrap(self, wrapped: str, backup_id: str) -> bytes:
        try:
            raw = base64.b64decode(wrapped, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyMaterialError("the manifest's wrapped data key is not valid base64") from exc
        if len(raw) != _WRAP_NONCE_SIZE + DATA_KEY_SIZE + _WRAP_TAG_SIZE:
            raise KeyMaterialError("the manifest's wrapped data key has the wrong length")
        nonce, sealed = raw[:_WRAP_NONCE_SIZE], raw[_WRAP_NONCE_SIZE:]
        try:
            key = AESGCM(self.material).decrypt(nonce, sealed, _WRAP_AAD_PREFIX + backup_id.encode())
        except InvalidTag:
            raise KeyMaterialError(
                "the data key does not unwrap with the master key: wrong key, or a tampered manifest"
            ) from None
        if len(key) != DATA_KEY_SIZE:
            raise KeyMaterialError("unwrapped data key has the wrong length")
        return key

    # --- as a WrappingKey ---------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return self.source

    @property
    def known_key_id(self) -> bytes:
        return self.key_id

    async def resolve_key_id(self) -> bytes:
        return self.key_id

    async def generate(self, backup_id: str) -> NewDataKey:
        data_key = new_data_key()
        return NewDataKey(data_key, data_key_encryption(self.key_id, WRAP_ALGORITHM, self.wrap(data_key, backup_id)))

    async def wrap_data_key(self, data_key: bytes, backup_id: str) -> tuple[bytes, str]:
        return self.key_id, self.wrap(data_key, backup_id)

    async def unwrap_data_key(self, wrapped: str, backup_id: str) -> bytes:
        return self.unwrap(wrapped, backup_id)

    async def aclose(self) -> None:
        return None


def parse_key_material(raw: bytes) -> bytes:
    """Accept the three ways people store 32 bytes: raw, 64 hex digits, or base64 (whitespace ignored)."""
    if len(raw) == MASTER_KEY_SIZE:
        return raw
    text = raw.strip()
    if _HEX_KEY.fullmatch(text):
        return bytes.fromhex(text.decode("ascii"))
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) == MASTER_KEY_SIZE:
        return decoded
    raise KeyMaterialError(
        f"a key file must hold {MASTER_KEY_SIZE} bytes: raw, as 64 hex digits, or base64 "
        f"(this one holds {len(raw)} bytes that are none of those)"
    )


def load_master_key(path: Path) -> MasterKey:
    try:
        info = path.stat()
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyMaterialError(f"cannot read key file {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) & ~stat.S_IRGRP:
        # Group read is allowed (a dedicated service group); anything more is a leak waiting to happen.
        raise KeyMaterialError(
            f"key file {path} is accessible by others (mode {stat.S_IMODE(info.st_mode):04o}); chmod 600"
        )
    return MasterKey(parse_key_material(raw))


def generate_master_key_file(path: Path) -> MasterKey:
    """Write a new random key, hex-encoded, readable by the owner only."""
    material = secrets.token_bytes(MASTER_KEY_SIZE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(material.hex() + "\n")
    return MasterKey(material)


class KeyRing:
    """The current master key (wraps new backups' data keys) and older ones (still able to open old backups).

    Keys are found by the manifest's ``wrap`` and ``key_id``, never by the stream header: after a rotation the
    header (authenticated, so never rewritten) still names the key the backup was made with, while the
    manifest names the key that wraps its data key now. ``aclose`` (or ``async with``) closes a KMS client.
    """

    def __init__(self, current: WrappingKey, older: Sequence[WrappingKey] = ()) -> None:
        self.current = current
        self.older = tuple(older)

    @property
    def keys(self) -> tuple[WrappingKey, ...]:
        return (self.current, *self.older)

    def find(self, key_id: bytes) -> MasterKey:
        """The key file with this id (the sync lookup for file keys)."""
        for key in self.keys:
            if isinstance(key, MasterKey) and hmac.compare_digest(key.key_id, key_id):
                return key
        raise KeyMaterialError(
            f"no key in the key ring has id {key_id.hex()}: add the key this backup was made with to "
            "encryption.old_key_files"
        )

    async def new_data_key(self, backup_id: str) -> NewDataKey:
        """A fresh data key for a backup, wrapped by the current key (KMS: ``GenerateDataKey``)."""
        return await self.current.generate(backup_id)

    async def opener(self, encryption: Encryption) -> WrappingKey | None:
        """The ring's key for this manifest's wrapped data key, by wrap and key id; None when no key matches."""
        wanted = _key_id_of(encryption)
        wrap = wrap_of(encryption)
        for key in self.keys:
            if key.wrap_algorithm == wrap and hmac.compare_digest(await key.resolve_key_id(), wanted):
                return key
        return None

    async def open(self, backup_id: str, encryption: Encryption) -> bytes:
        """The plaintext data key of one backup; ``KeyMaterialError`` when no key of the ring opens it."""
        if encryption.wrapped_data_key is None:
            raise KeyMaterialError("the manifest has no wrapped data key")
        key = await self.opener(encryption)
        if key is None:
            raise KeyMaterialError(_no_key_message(encryption))
        return await key.unwrap_data_key(encryption.wrapped_data_key, backup_id)

    async def is_current(self, encryption: Encryption) -> bool:
        """Whether this data key is already wrapped by the current key (rotation skips it)."""
        return wrap_of(encryption) == self.current.wrap_algorithm and hmac.compare_digest(
            await self.current.resolve_key_id(), _key_id_of(encryption)
        )

    async def rewrap(self, backup_id: str, encryption: Encryption) -> Encryption:
        """The same data key wrapped by the current key, proven to unwrap to it before it is returned."""
        data_key = await self.open(backup_id, encryption)
        key_id, wrapped = await self.current.wrap_data_key(data_key, backup_id)
        if not hmac.compare_digest(await self.current.unwrap_data_key(wrapped, backup_id), data_key):
            raise KeyMaterialError(f"{self.current.label}: the re-wrapped data key does not unwrap to the same key")
        return data_key_encryption(key_id, self.current.wrap_algorithm, wrapped)

    async def aclose(self) -> None:
        for key in self.keys:
            await key.aclose()

    async def __aenter__(self) -> KeyRing:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def wrap_of(encryption: Encryption) -> str:
    """How a manifest's data key is wrapped; manifests before KMS support always say ``aes-256-gcm``."""
    return encryption.wrap or WRAP_ALGORITHM


def _key_id_of(encryption: Encryption) -> bytes:
    try:
        key_id = bytes.fromhex(encryption.key_id or "")
    except ValueError:
        raise KeyMaterialError("the manifest's key id is not hexadecimal") from None
    if len(key_id) != KEY_ID_SIZE:
        raise KeyMaterialError(f"the manifest's key id is not {KEY_ID_SIZE} bytes")
    return key_id


def _no_key_message(encryption: Encryption) -> str:
    key_id = encryption.key_id or "?"
    if wrap_of(encryption) == WRAP_ALGORITHM:
        return (
            f"no key in the key ring has id {key_id}: add the key file this backup was made with to "
            "encryption.old_key_files"
        )
    if wrap_of(encryption) == "aws-kms":
        return (
            f"the data key is wrapped by AWS KMS key id {key_id}, which is not encryption.kms_key_id: configure "
            "that KMS key (or its multi-Region replica in this region)"
        )
    return f"the data key is wrapped with {encryption.wrap!r}, which this agent does not know"


def new_data_key() -> bytes:
    return secrets.token_bytes(DATA_KEY_SIZE)
