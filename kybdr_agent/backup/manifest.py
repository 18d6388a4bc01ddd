"""The backup manifest: what a backup is, in one JSON document written after its data.

PURE. A backup exists if and only if its manifest does, so everything a restore, a validation or a
retention decision needs is here, and nothing here depends on reading the data object.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Final, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kybdr_agent.storage.parts import PartRun

MANIFEST_FORMAT: Final = 1
MANIFEST_NAME: Final = "manifest.json"
DATA_NAME: Final = "data"
GLOBALS_NAME: Final = "globals"
BACKUPS_PREFIX: Final = "backups"

BACKUP_ID_PATTERN: Final = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
# Object-key form of a database name: everything but [A-Za-z0-9_-] percent-encoded, so "." and ".." and
# "/" can never become path components.
_KEY_SAFE: Final = "_-"


class InvalidBackupId(ValueError):
    """An id from outside does not match the backup id pattern; it never reaches a path or a key."""


def new_backup_id(now: datetime) -> str:
    """Sortable and safe: ``20261124T215226Z-3f9a1c2b``."""
    utc = now.astimezone(UTC)
    return f"{utc.year:04d}{utc:%m%dT%H%M%S}Z-{secrets.token_hex(4)}"


def check_backup_id(value: str) -> str:
    if not BACKUP_ID_PATTERN.fullmatch(value):
        raise InvalidBackupId(f"{value!r} is not a backup id (expected the form 20261124T215226Z-3f9a1c2b)")
    return value


def database_key(database: str) -> str:
    if not database:
        raise ValueError("database name is empty")
    return quote(database, safe=_KEY_SAFE).replace(".", "%2E")


def backup_prefix(database: str, backup_id: str) -> str:
    return f"{BACKUPS_PREFIX}/{database_key(database)}/{check_backup_id(backup_id)}"


def data_key_path(database: str, backup_id: str) -> str:
    return f"{backup_prefix(database, backup_id)}/{DATA_NAME}"


def globals_key_path(database: str, backup_id: str) -> str:
    return f"{backup_prefix(database, backup_id)}/{GLOBALS_NAME}"


def manifest_key_path(database: str, backup_id: str) -> str:
    return f"{backup_prefix(database, backup_id)}/{MANIFEST_NAME}"


class Encryption(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cipher: Literal["aes-256-gcm", "none"]
    key_id: str | None = None
    wrap: str | None = None
    wrapped_data_key: str | None = None


class GlobalsObject(BaseModel):
    """The server's roles, memberships, role settings and tablespaces (``pg_dumpall --globals-only``), stored
    beside the data as a second stream: same format, codec, frame size and data key, its own nonce prefix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    object_key: str
    sql_bytes: int = Field(description="bytes pg_dumpall --globals-only wrote")
    compressed_bytes: int
    stored_bytes: int = Field(description="bytes of the globals object in the repository")
    sha256: str = Field(description="SHA-256 of the stored globals object")
    frames: int
    stream_header: str = Field(description="hex of the globals stream's header, bound to every frame")
    role_passwords: bool = Field(
        description="whether role password hashes are included: only when the agent's role could read "
        "pg_authid and the backup is encrypted (else pg_dumpall --no-role-passwords)"
    )
    pg_dumpall_version: str


class Manifest(BaseModel):
    """One completed backup. Unknown fields are kept out (extra='forbid') so a tampered manifest fails."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = MANIFEST_FORMAT
    id: str
    database: str
    status: Literal["completed"] = "completed"
    agent_version: str
    server_version: str
    pg_dump_version: str
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    dump_bytes: int = Field(description="bytes pg_dump wrote (uncompressed custom-format archive)")
    compressed_bytes: int
    stored_bytes: int = Field(description="bytes of the data object in the repository")
    sha256: str = Field(description="SHA-256 of the stored data object")
    compression: Literal["zstd", "gzip", "none"]
    compression_level: int | None = None
    frame_size: int
    frames: int
    stream_header: str = Field(description="hex of the stream header, bound to every frame")
    encryption: Encryption
    storage: Literal["file", "s3"]
    object_key: str
    parts: list[PartRun] = []
    checksum_algorithm: str | None = None
    database_size_bytes: int | None = None
    snapshot: str | None = None
    labels: list[str] = []
    description: str | None = None
    row_counts: dict[str, int] = {}
    replication: dict[str, dict[str, str]] = {}
    globals: GlobalsObject | None = Field(
        None, description="the server's globals taken with this backup; absent in backups made before they were"
    )

    @model_validator(mode="after")
    def _globals_beside_the_data(self) -> Manifest:
        # A manifest names only its own objects: an edited one could otherwise point a restore's roles at
        # another backup's globals (the catalog checks the data object's key the same way).
        if self.globals is not None and self.globals.object_key != globals_key_path(self.database, self.id):
            raise ValueError("the globals object is not in the backup's own folder")
        return self

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            manifest = cls.model_validate_json(raw)
        except ValidationError as exc:
            raise ValueError(
                f"manifest is not valid: {exc.error_count()} problem(s): {exc.errors()[0]['msg']}"
            ) from exc
        check_backup_id(manifest.id)
        return manifest

    @property
    def part_count(self) -> int:
        return sum(run.count for run in self.parts)
