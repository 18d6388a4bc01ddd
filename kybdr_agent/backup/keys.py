"""Master keys, the key ring, and per-backup data keys.

Each backup gets a fresh random 256-bit data key; only its wrapped form (AES-256-GCM under a master key,
bound to the backup id) is stored, in the manifest. Rotating the master key therefore never touches old
backups: the old key stays in the ring (``encryption.old_key_files``) so they can still be opened, and a key
id derived from the key itself tells which ring entry a backup needs, with no naming to keep in sync.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
class MasterKey:
    """A 32-byte master key and its id (the first 16 bytes of an HMAC of a fixed label under the key)."""

    material: bytes = field(repr=False)

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


@dataclass(frozen=True)
class KeyRing:
    """The current master key (used for new backups) and older ones (still able to open old backups)."""

    current: MasterKey
    older: tuple[MasterKey, ...] = ()

    def find(self, key_id: bytes) -> MasterKey:
        for key in (self.current, *self.older):
            if hmac.compare_digest(key.key_id, key_id):
                return key
        raise KeyMaterialError(
            f"no key in the key ring has id {key_id.hex()}: add the key this backup was made with to "
            "encryption.old_key_files"
        )


def new_data_key() -> bytes:
    return secrets.token_bytes(DATA_KEY_SIZE)
