"""What the WAL component tells the rest of the agent: the spool check it publishes on the event hub (for the
``wal_spool_full`` alert) and the state the status route, ``/healthz`` and the metrics read.

PURE. Plain values only: no I/O, so the notifier, the metrics and the routes can depend on it without depending on
the shipper or the receiver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class WalSpoolChecked:
    """The shipper's periodic look at its spool: unarchived WAL against ``wal.max_spool_bytes``.

    Published every few seconds; the alert book turns it into one ``wal_spool_full`` message when the spool
    goes over its bound and one "resolved" when it is back under."""

    at: datetime
    spool_dir: str
    spool_bytes: int
    max_spool_bytes: int
    files: int
    oldest: str | None  # the oldest file waiting
    last_error: str | None

    @property
    def over(self) -> bool:
        return self.spool_bytes > self.max_spool_bytes


@dataclass
class ShipperState:
    """The shipper's counters and last outcome (for status, health and metrics)."""

    files_shipped: int = 0
    bytes_shipped: int = 0
    partials_shipped: int = 0
    last_shipped: str | None = None
    last_shipped_at: datetime | None = None
    spool_bytes: int = 0
    spool_files: int = 0
    oldest: str | None = None
    waiting_retry: int = 0
    rejected: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None
    heartbeat: float | None = None  # anyio.current_time() of the last completed scan

    def to_json(self) -> dict[str, Any]:
        return {
            "files_shipped": self.files_shipped,
            "bytes_shipped": self.bytes_shipped,
            "partials_shipped": self.partials_shipped,
            "last_shipped": self.last_shipped,
            "last_shipped_at": self.last_shipped_at.isoformat() if self.last_shipped_at else None,
            "spool_bytes": self.spool_bytes,
            "spool_files": self.spool_files,
            "oldest_waiting": self.oldest,
            "waiting_retry": self.waiting_retry,
            "rejected": self.rejected,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at.isoformat() if self.last_error_at else None,
        }


@dataclass
class ReceiverState:
    """pg_receivewal under supervision, and the replication slot it streams from (stream mode)."""

    slot: str
    running: bool = False
    pid: int | None = None
    starts: int = 0
    last_exit: str | None = None
    last_exit_at: datetime | None = None
    slot_retained_bytes: int | None = None  # pg_current_wal_lsn() - restart_lsn: WAL the slot holds
    slot_wal_status: str | None = None  # pg_replication_slots.wal_status: reserved, extended, unreserved, lost
    slot_checked_at: datetime | None = None
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "running": self.running,
            "pid": self.pid,
            "starts": self.starts,
            "last_exit": self.last_exit,
            "last_exit_at": self.last_exit_at.isoformat() if self.last_exit_at else None,
            "slot_retained_bytes": self.slot_retained_bytes,
            "slot_wal_status": self.slot_wal_status,
            "slot_checked_at": self.slot_checked_at.isoformat() if self.slot_checked_at else None,
            "last_error": self.last_error,
            **self.extra,
        }
