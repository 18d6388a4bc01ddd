"""The backup manifest: what a backup is, in one JSON document written after its data.

PURE. A backup exists if and only if its manifest does, so everything a restore, a validation or a
retention decision needs is here, and nothing here depends on reading the data object.

Two kinds share the document: a ``logical`` backup (pg_dump's custom archive of one database) and a
``physical`` one (pg_basebackup's tar of the whole cluster, ``PhysicalInfo``). A physical backup belongs to
a cluster, not a database: its ``database`` is ``@cluster-<system identifier>`` (``cluster_database``), so
listing, retention, leases and the sweep group it per cluster with the code they already have. The ``@``
is percent-encoded in keys like any other character (``backups/%40cluster-7…/<id>/``), and a logical
backup of a database really named like that is refused (``service.py``), so the two never share a group.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Final, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kybdr_agent.storage.parts import PartRun
from kybdr_agent.wal.names import WalError, check_segment_size, check_timeline, parse_lsn

MANIFEST_FORMAT: Final = 1
MANIFEST_NAME: Final = "manifest.json"
DATA_NAME: Final = "data"
GLOBALS_NAME: Final = "globals"
BACKUPS_PREFIX: Final = "backups"

BACKUP_ID_PATTERN: Final = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
# Object-key form of a database name: everything but [A-Za-z0-9_-] percent-encoded, so "." and ".." and
# "/" can never become path components.
_KEY_SAFE: Final = "_-"
CLUSTER_PREFIX: Final = "@cluster-"
_SYSTEM_IDENTIFIER: Final = re.compile(r"[1-9][0-9]{0,19}")


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


def cluster_database(system_identifier: str) -> str:
    """The ``database`` of a physical backup: its cluster, by system identifier (``pg_control_system()``)."""
    if not _SYSTEM_IDENTIFIER.fullmatch(system_identifier) or int(system_identifier) >= 1 << 64:
        raise ValueError(f"{system_identifier!r} is not a system identifier")
    return CLUSTER_PREFIX + system_identifier


def is_cluster_database(database: str) -> bool:
    """Whether ``database`` is the reserved spelling physical backups use (never a logical backup's)."""
    return database.startswith(CLUSTER_PREFIX)


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


class PhysicalInfo(BaseModel):
    """What a physical base backup needs to become a running cluster: the WAL from ``start_lsn`` to
    ``stop_lsn`` on ``timeline``, replayed, makes the tar consistent (``wal.window``). Read from the tar itself
    (``backup_label``, ``backup_manifest``, ``global/pg_control``: ``basetar.py``), not from pg_basebackup's
    messages, so they describe exactly what was stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system_identifier: str = Field(description="pg_control's system identifier, in decimal")
    timeline: int = Field(description="the timeline the backup started and ended on")
    start_lsn: str = Field(description="where replay starts (backup_label's START WAL LOCATION)")
    stop_lsn: str = Field(description="the end of the backup-end record: replay must reach it to be consistent")
    wal_segment_size: int
    stop_time: datetime = Field(description="the server's clock after the backup ended: no earlier recovery target")
    server_version_num: int
    tar_bytes: int = Field(description="bytes of the tar pg_basebackup wrote")

    @model_validator(mode="after")
    def _holds_together(self) -> PhysicalInfo:
        cluster_database(self.system_identifier)
        try:
            check_timeline(self.timeline)
            check_segment_size(self.wal_segment_size)
            start, stop = parse_lsn(self.start_lsn), parse_lsn(self.stop_lsn)
        except WalError as exc:
            raise ValueError(str(exc)) from None
        if stop <= start:
            raise ValueError("the stop LSN is not after the start LSN")
        if self.stop_time.tzinfo is None or self.stop_time.utcoffset() is None:
            raise ValueError("stop_time must carry a time zone")
        return self


class Manifest(BaseModel):
    """One completed backup. Unknown fields are kept out (extra='forbid') so a tampered manifest fails.

    For a physical backup ``pg_dump_version`` is pg_basebackup's version and ``dump_bytes`` the tar's size."""

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
    kind: Literal["logical", "physical"] = Field(
        "logical", description="logical: pg_dump of one database; physical: pg_basebackup of the cluster"
    )
    physical: PhysicalInfo | None = Field(None, description="a physical backup's WAL position and cluster")

    @model_validator(mode="after")
    def _globals_beside_the_data(self) -> Manifest:
        # A manifest names only its own objects: an edited one could otherwise point a restore's roles at
        # another backup's globals (the catalog checks the data object's key the same way).
        if self.globals is not None and self.globals.object_key != globals_key_path(self.database, self.id):
            raise ValueError("the globals object is not in the backup's own folder")
        return self

    @model_validator(mode="after")
    def _kind_holds_together(self) -> Manifest:
        # Edited into the other kind, a manifest must not parse: a logical restore would feed a tar to
        # pg_restore, a physical one a custom archive to tar.
        if self.kind == "physical":
            if self.physical is None:
                raise ValueError("a physical backup needs its physical fields")
            if self.database != cluster_database(self.physical.system_identifier):
                raise ValueError("a physical backup's database must name its cluster")
            if self.globals is not None or self.snapshot is not None or self.row_counts:
                raise ValueError("a physical backup has no globals object, snapshot or row counts")
            if self.physical.tar_bytes != self.dump_bytes:
                raise ValueError("a physical backup's tar size and dump size differ")
        elif self.physical is not None or is_cluster_database(self.database):
            raise ValueError("a logical backup has no physical fields and names a database, not a cluster")
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
