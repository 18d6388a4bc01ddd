"""Leases: how a backup in progress proves it is alive, so everything not alive can be swept at once.

Before a backup creates its upload it writes ``backups/<db>/<id>/lease.json`` naming its owner (host, boot,
pid and the pid's start time) and renews it while it runs; it deletes the lease only after the manifest is
written or its leftovers are removed. A sweeper (the daemon's housekeeping, or any one-shot command) judges
a lease without waiting for hours:

- an owner on this host, this boot: alive exactly while that pid runs *and* started at the recorded time
  (a recycled pid is another process) — so a ``kill -9``'d backup is swept by the very next command;
- an owner on this host, an earlier boot: dead (the machine restarted since);
- an owner elsewhere: alive until ``renewed_at + ttl`` (clocks between hosts may differ by less than the ttl).

The judgement is a pure function of the lease, who is asking, and the time; only reading ``/proc`` and the
repository are I/O.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import anyio

from kybdr_agent.asyncutil import task_group
from kybdr_agent.backup.manifest import backup_prefix
from kybdr_agent.errors import KybdrError
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.telemetry import get_logger

LEASE_NAME: Final = "lease.json"
LEASE_FORMAT: Final = 1
LEASE_TTL: Final = timedelta(minutes=5)
RENEW_EVERY: Final = timedelta(minutes=1)
MAX_LEASE_BYTES: Final = 64 << 10
RELEASE_DEADLINE: Final = 30.0
log = get_logger("kybdr_agent.lease")


@dataclass(frozen=True)
class Owner:
    """Which process holds a lease. ``host`` joins the machine id and the host name, so two containers
    cloned from one image (same machine id, separate pid namespaces) are still told apart."""

    host: str
    boot_id: str
    pid: int
    pid_start: int

    def same_boot(self, other: Owner) -> bool:
        return self.host == other.host and self.boot_id == other.boot_id


@dataclass(frozen=True)
class Lease:
    backup_id: str
    database: str
    owner: Owner
    started_at: datetime
    renewed_at: datetime
    ttl_seconds: float

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"format": LEASE_FORMAT, **asdict(self)}
        data["started_at"] = self.started_at.isoformat()
        data["renewed_at"] = self.renewed_at.isoformat()
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Lease:
        """Parse a lease; anything malformed is a ``ValueError`` (and such a lease protects nothing)."""
        try:
            data = json.loads(raw)
            owner = data["owner"]
            return cls(
                backup_id=str(data["backup_id"]),
                database=str(data["database"]),
                owner=Owner(str(owner["host"]), str(owner["boot_id"]), int(owner["pid"]), int(owner["pid_start"])),
                started_at=_aware(datetime.fromisoformat(data["started_at"])),
                renewed_at=_aware(datetime.fromisoformat(data["renewed_at"])),
                ttl_seconds=float(data["ttl_seconds"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a lease: {exc}") from None


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("lease times must carry a time zone")
    return value


def lease_key(database: str, backup_id: str) -> str:
    return f"{backup_prefix(database, backup_id)}/{LEASE_NAME}"


def is_live(lease: Lease, here: Owner, now: datetime, pid_alive: Callable[[Owner], bool]) -> bool:
    """Whether the backup holding ``lease`` may still be running (see the module docstring)."""
    if lease.owner.same_boot(here):
        return pid_alive(lease.owner)
    if lease.owner.host == here.host:
        return False  # this machine rebooted since the lease was written: its process is gone
    return now < lease.renewed_at + timedelta(seconds=lease.ttl_seconds)


# --- this process and /proc ------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The pid's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None if no process
    runs under that pid."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or parentheses.
    fields = raw.rpartition(")")[2].split()
    if not fields or fields[0] in ("Z", "X"):
        return None  # a zombie (killed, not yet reaped) or dead task runs nothing any more
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def this_process() -> Owner:
    host = f"{_read('/etc/machine-id') or 'no-machine-id'}:{socket.gethostname()}"
    pid = os.getpid()
    return Owner(
        host=host, boot_id=_read("/proc/sys/kernel/random/boot_id"), pid=pid, pid_start=process_start(pid) or 0
    )


def pid_alive(owner: Owner) -> bool:
    """True while the owner's process runs (same pid, same start time: a recycled pid is another process).

    Where ``/proc`` hides other users' processes (``hidepid``), a pid the kernel still has but we cannot
    see is taken as alive: a sweep must never abort a backup it merely cannot inspect.
    """
    if Path(f"/proc/{owner.pid}/stat").exists():
        start = process_start(owner.pid)
        return start is not None and start == owner.pid_start
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return process_start(owner.pid) is not None


# --- holding a lease ---------------------------------------------------------------------------------


@asynccontextmanager
async def hold_lease(
    store: BlobStore,
    database: str,
    backup_id: str,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ttl: timedelta = LEASE_TTL,
    renew_every: timedelta = RENEW_EVERY,
) -> AsyncIterator[None]:
    """Write the lease, renew it while the block runs, and delete it afterwards (shielded, bounded).

    The lease is written before the block starts, so no upload of this backup can exist without it. A
    failed renewal is logged and retried at the next interval: the same host judges by pid, not by time,
    so only a sweeper on another host could take an expired lease for dead.
    """
    key = lease_key(database, backup_id)
    owner = this_process()
    started = now()

    async def write() -> None:
        lease = Lease(backup_id, database, owner, started, now(), ttl.total_seconds())
        await store.put_bytes(key, lease.to_json())

    await write()
    try:
        async with task_group() as tg:

            async def renew() -> None:
                while True:
                    await anyio.sleep(renew_every.total_seconds())
                    try:
                        await write()
                    except KybdrError as exc:
                        log.warning("lease.renew_failed", key=key, error=str(exc))

            tg.start_soon(renew)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.move_on_after(RELEASE_DEADLINE, shield=True):
            try:
                await store.delete(key)
            except KybdrError as exc:
                log.warning(
                    "lease.release_failed",
                    key=key,
                    error=str(exc),
                    note="the next sweep (the agent's next housekeeping tick, or the next kybdr-agent command) "
                    "removes it",
                )
