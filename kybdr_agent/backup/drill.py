"""A restore drill: restore a backup into a scratch database, compare row counts with the manifest, drop it.

The drill's scratch name (``kybdr_drill_*``) is held (``scratch.py``) from before the restore creates it until
after it is dropped, so a sweep elsewhere never takes a drill in progress for a leftover, and a drill cut
short by ``kill -9`` is dropped by the next sweep.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from kybdr_agent.backup import facts
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.restore import restore_backup
from kybdr_agent.backup.scratch import DRILL_PREFIX, drop_scratch, held
from kybdr_agent.errors import KybdrError
from kybdr_agent.postgres.connection import Connection
from kybdr_agent.storage.base import BlobStore


async def drill_one(
    store: BlobStore, connection: Connection, maintenance: str, keyring: KeyRing | None, m: Manifest
) -> dict[str, Any]:
    scratch = f"{DRILL_PREFIX}{secrets.token_hex(6)}"
    started = time.monotonic()
    result: dict[str, Any] = {"database": m.database, "backup_id": m.id, "scratch_database": scratch}
    async with connection.connect(maintenance) as admin, held(admin, scratch):
        try:
            restored = await restore_backup(
                m,
                store=store,
                keyring=keyring,
                connection=connection,
                maintenance_database=maintenance,
                target=scratch,
                no_owner=True,
            )
            result["restore_seconds"] = restored.seconds
            async with connection.connect(scratch) as copy:
                counts = await facts.row_counts(copy, only=set(m.row_counts))
            mismatches = {
                table: {"expected": expected, "restored": counts.get(table)}
                for table, expected in m.row_counts.items()
                if counts.get(table) != expected
            }
            result["tables_compared"] = len(m.row_counts)
            result["mismatches"] = mismatches
            result["passed"] = not mismatches
            if mismatches:
                result["error"] = f"{len(mismatches)} table(s) differ from the row counts taken at backup time"
        except KybdrError as exc:
            result["passed"] = False
            result["error"] = str(exc)
        finally:
            # Whatever happened, cancellation included, the scratch database goes; a failure to drop it is
            # recorded (and the next sweep retries), never allowed to replace the drill's own verdict.
            error = await drop_scratch(admin, scratch)
            if error is not None:
                result["cleanup_error"] = f"could not drop {scratch}: {error}"
    result["seconds"] = round(time.monotonic() - started, 3)
    return result
