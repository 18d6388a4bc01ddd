"""Copying a finished backup to the DR region's bucket: data and globals server-side, then the manifest.

The backup is complete before a copy starts, so a failed copy never makes it less of a backup: the error
says the backup is stored in the primary and its copy failed, the DR bucket keeps no data without a
manifest (best effort: the DR region may be what failed, and the copy's lease there lets the DR bucket's
sweep remove what stays), and the primary's manifest is rewritten with the replication record only after
the DR manifest exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Final

import anyio

from kybdr_agent.backup.lease import hold_lease
from kybdr_agent.backup.manifest import Manifest, manifest_key_path
from kybdr_agent.errors import KybdrError
from kybdr_agent.storage.base import BlobStore, ReplicaStore
from kybdr_agent.telemetry import get_logger
from kybdr_agent.telemetry.tracing import stage

CLEANUP_DEADLINE: Final = 60.0
log = get_logger("kybdr_agent.copies")


def stored_objects(m: Manifest) -> list[tuple[str, int]]:
    """A backup's objects besides its manifest, with their sizes: the data, and the globals if it has them."""
    found = [(m.object_key, m.stored_bytes)]
    if m.globals is not None:
        found.append((m.globals.object_key, m.globals.stored_bytes))
    return found


async def _check_size(store: BlobStore, key: str, size: int) -> None:
    info = await store.stat(key)
    if info is None or info.size != size:
        raise KybdrError(f"the copy of {key} has {info.size if info else 'no'} bytes, expected {size}")


async def copy_to_dr(
    primary: BlobStore, replica: ReplicaStore, made: Manifest, *, now: Callable[[], datetime]
) -> Manifest:
    """Copy ``made`` to ``replica``; the manifest with its replication record, as stored in both."""
    started = time.monotonic()
    key = manifest_key_path(made.database, made.id)
    try:
        # Under a lease in the DR bucket too, so a sweep there tells a copy in progress from a dead one.
        async with hold_lease(replica, made.database, made.id, now=now):
            with stage("copy", backup_id=made.id, stored_bytes=made.stored_bytes):
                for object_key, size in stored_objects(made):
                    await replica.copy_from(primary, object_key, size)
                    await _check_size(replica, object_key, size)
            record = {
                **replica.location(),
                "copied_at": now().isoformat(),
                "seconds": f"{time.monotonic() - started:.3f}",
            }
            replicated = made.model_copy(update={"replication": {**made.replication, "cross_region": record}})
            await replica.put_bytes(key, replicated.to_json())
    except BaseException as exc:
        with anyio.move_on_after(CLEANUP_DEADLINE, shield=True):
            for object_key, _size in stored_objects(made):
                try:
                    await replica.delete(object_key)
                except KybdrError as cleanup_error:
                    log.warning("copy.cleanup_failed", key=object_key, error=str(cleanup_error))
        if isinstance(exc, KybdrError):
            raise KybdrError(
                f"backup {made.id} is stored in the primary repository, but its cross-region copy failed: {exc}"
            ) from exc
        raise
    await primary.put_bytes(key, replicated.to_json())
    return replicated
