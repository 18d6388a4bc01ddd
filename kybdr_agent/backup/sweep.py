"""The repository sweep: remove what dead backups left behind, at once, and never touch a live one.

A backup folder ``backups/<db>/<id>/`` without a manifest is either a backup in progress or the remains
of one that died (a killed process, a failed abort, a cleanup cut short). The lease beside it tells which
(``lease.py``). What is dead is removed on the spot — open multipart uploads aborted, temp files and data
objects deleted, the lease last — by the daemon at start and on each housekeeping tick, and by every
one-shot command before it starts. Leftovers with no lease at all (an agent older than leases, a cleanup
cut short) wait ``grace`` (``daemon.sweep_older_than``, default none) and then go too.

Listing and deciding are separate: ``plan`` is pure. Before removing anything the sweeper reads the lease
and then the manifest again, in that order: a backup deletes its lease only after its manifest is written,
so "no live lease, then no manifest" can only mean the backup is dead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from kybdr_agent.backup.lease import LEASE_NAME, MAX_LEASE_BYTES, Lease, Owner, is_live
from kybdr_agent.backup.manifest import BACKUP_ID_PATTERN, BACKUPS_PREFIX, MANIFEST_NAME
from kybdr_agent.errors import NotFound
from kybdr_agent.storage.base import BlobStore, IncompleteUpload, ObjectInfo
from kybdr_agent.storage.local import TEMP_MARKER
from kybdr_agent.telemetry import get_logger

LEASELESS_FLOOR: Final = timedelta(minutes=2)
LEASE_TEMP: Final = f"{TEMP_MARKER}{LEASE_NAME}"
log = get_logger("kybdr_agent.sweep")


@dataclass
class Folder:
    """One backup folder's listing: objects by name, open uploads, and the newest activity seen."""

    prefix: str
    objects: dict[str, ObjectInfo] = field(default_factory=dict)
    uploads: list[IncompleteUpload] = field(default_factory=list)

    @property
    def has_manifest(self) -> bool:
        return MANIFEST_NAME in self.objects

    @property
    def has_lease(self) -> bool:
        return LEASE_NAME in self.objects

    def lease_being_written(self) -> bool:
        return any(u.key.rpartition("/")[2].startswith(LEASE_TEMP) for u in self.uploads)

    def newest(self) -> datetime | None:
        times = [o.modified for o in self.objects.values()] + [u.initiated for u in self.uploads]
        return max(times) if times else None


@dataclass
class SweepReport:
    aborted_uploads: list[str] = field(default_factory=list)
    removed_orphans: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "aborted_uploads": self.aborted_uploads,
            "removed_orphans": self.removed_orphans,
            "live_backups": self.live,
            "waiting_for_grace": self.waiting,
        }


def _folder_of(key: str) -> str | None:
    """``backups/<db>/<id>`` for a key inside a backup folder; None for anything else (left alone)."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != BACKUPS_PREFIX or not BACKUP_ID_PATTERN.fullmatch(parts[2]):
        return None
    return "/".join(parts[:3])


def plan(objects: list[ObjectInfo], uploads: list[IncompleteUpload]) -> list[Folder]:
    """PURE. The folders that may hold leftovers: any with an open upload, or with objects but no manifest.

    A folder with a manifest is a backup; only its open uploads (a manifest rewrite cut short) and a
    lease its dead owner never removed are candidates, never its objects.
    """
    folders: dict[str, Folder] = {}
    for info in objects:
        prefix = _folder_of(info.key)
        if prefix is not None:
            folders.setdefault(prefix, Folder(prefix)).objects[info.key.rpartition("/")[2]] = info
    for upload in uploads:
        prefix = _folder_of(upload.key)
        if prefix is not None:
            folders.setdefault(prefix, Folder(prefix)).uploads.append(upload)
    return [
        f for f in sorted(folders.values(), key=lambda f: f.prefix) if f.uploads or f.has_lease or not f.has_manifest
    ]


def leaseless_due(folder: Folder, now: datetime, grace: timedelta) -> bool:
    """PURE. A folder with no lease is swept once its newest trace is older than ``grace``.

    One leaseless state is legitimate: a folder store writes the lease itself through a temp file, so in
    the instant before the lease appears its folder holds only that temp file. Such a folder waits
    ``LEASELESS_FLOOR`` whatever the grace (S3 writes the lease in one atomic request: no such state).
    """
    newest = folder.newest()
    if newest is None:
        return True
    if folder.lease_being_written() and newest > now - LEASELESS_FLOOR:
        return False
    return newest <= now - grace


async def _read_lease(store: BlobStore, prefix: str) -> Lease | None:
    try:
        raw = await store.get_bytes(f"{prefix}/{LEASE_NAME}", max_size=MAX_LEASE_BYTES)
    except NotFound:
        return None
    try:
        return Lease.from_json(raw)
    except ValueError:
        log.warning("sweep.unreadable_lease", prefix=prefix)
        return None


async def sweep_repository(
    store: BlobStore,
    *,
    now: datetime,
    grace: timedelta,
    here: Owner,
    pid_alive: Callable[[Owner], bool],
    skip: Callable[[str], bool] = lambda _prefix: False,
) -> SweepReport:
    """Abort and delete what dead backups left; report what was live or still within its grace."""
    report = SweepReport()
    # Uploads first, then objects, then (per folder) the lease and the manifest: each later read is at
    # least as new as the earlier ones, so a backup that starts or finishes meanwhile is never mistaken.
    uploads = await store.incomplete_uploads(f"{BACKUPS_PREFIX}/")
    objects = [info async for info in store.list_objects(f"{BACKUPS_PREFIX}/")]
    for folder in plan(objects, uploads):
        if skip(folder.prefix):
            report.live.append(folder.prefix)
            continue
        lease = await _read_lease(store, folder.prefix)
        if lease is not None and is_live(lease, here, now, pid_alive):
            report.live.append(folder.prefix)
            continue
        if lease is None and not leaseless_due(folder, now, grace):
            report.waiting.append(folder.prefix)
            continue
        manifest_now = await store.stat(f"{folder.prefix}/{MANIFEST_NAME}")
        for upload in folder.uploads:
            await store.abort_incomplete(upload)
            report.aborted_uploads.append(upload.key)
        if manifest_now is None:
            for name, info in sorted(folder.objects.items()):
                if name != LEASE_NAME:
                    await store.delete(info.key)
                    report.removed_orphans.append(info.key)
        if lease is not None or folder.has_lease:
            await store.delete(f"{folder.prefix}/{LEASE_NAME}")
            report.removed_orphans.append(f"{folder.prefix}/{LEASE_NAME}")
    return report
