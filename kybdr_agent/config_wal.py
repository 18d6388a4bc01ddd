"""``[wal]``: continuous WAL archiving (point-in-time recovery), off by default.

Two ways WAL reaches the agent's spool, ``mode``: ``"stream"`` — the agent runs ``pg_receivewal`` on a
physical replication slot (``slot_name``, created if missing) and the segments appear as it completes them;
``"archive_command"`` — PostgreSQL's ``archive_command = 'kybdr-agent wal-push %p'`` hands each file to the
running agent. Either way the shipper seals what is in ``spool_dir`` into the repository and deletes it only
once archived; past ``max_spool_bytes`` of unshipped WAL the agent alerts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

GIB: Final = 1 << 30
MIB: Final = 1 << 20


class WalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="archive WAL continuously (point-in-time recovery)")
    mode: Literal["stream", "archive_command"] = Field(
        "stream", description='"stream": pg_receivewal on a replication slot; "archive_command": kybdr-agent wal-push'
    )
    slot_name: str = Field(
        "kybdr_agent",
        pattern=r"^[a-z0-9_]{1,63}$",
        description="the physical replication slot pg_receivewal streams from (stream mode; created if missing)",
    )
    spool_dir: Path | None = Field(
        None, description="where WAL waits until it is archived (default: backup.backup_dir/wal-spool)"
    )
    max_spool_bytes: int = Field(
        GIB, ge=16 * MIB, le=1 << 40, description="unarchived WAL in the spool past which the agent alerts"
    )
    max_partial_age: float = Field(
        60.0, ge=1, le=3600, description="seconds between shipments of the segment being written (.partial)"
    )
    # Each file in flight holds its plaintext and its sealed copy (~40 MiB for a 16 MiB segment): 4 at once
    # measured ~180 MiB peak under a write-heavy load; sealing is CPU-bound, so more gained nothing on a folder.
    upload_concurrency: int = Field(2, ge=1, le=32, description="WAL files uploaded at once")
    push_user: str = Field(
        "postgres",
        pattern=r"^[a-z_][a-z0-9_.-]{0,31}$",
        description="archive_command mode: the OS user PostgreSQL runs as; through the control socket it may "
        "only hand over WAL (it is never an admin of the agent unless it is the agent's own user)",
    )

    @field_validator("spool_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        if value is not None and "\x00" in str(value):
            raise ValueError("must not contain a NUL character")
        return value

    def spool_path(self, backup_dir: Path) -> Path:
        """``spool_dir``, else ``<backup.backup_dir>/wal-spool``."""
        return self.spool_dir or backup_dir / "wal-spool"
