"""The restore spool: the decoded archive on local disk, because ``pg_restore -j N`` needs a seekable file.

A parallel restore cannot read a pipe: pg_restore's workers seek to each table's data in the archive. So
the backup is decoded (every frame authenticated, the totals checked) into a file under ``restore.spool_dir``,
and pg_restore runs against it only once the whole stream verified. The file holds the plaintext dump, so
the directory is created 0700 and the file 0600 with ``O_EXCL`` (never an existing file or a symlink's
target), room is checked before anything is created, and the file is deleted whatever happens — success,
failure or cancellation — in a clean-up with no checkpoint a cancellation could interrupt.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO, Final

import anyio

from kybdr_agent.backup.decode import stream_backup
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.errors import KybdrError
from kybdr_agent.storage.base import BlobStore

SPOOL_MARGIN: Final = 64 << 20  # beyond the dump itself: the filesystem's own needs, other writers
_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


def check_room(spool_dir: Path, dump_bytes: int) -> None:
    """Refuse, before anything is created, a spool directory that cannot take ``dump_bytes`` plus a margin.

    The directory may not exist yet (it is created on use), but its parent must."""
    existing = spool_dir if spool_dir.exists() else spool_dir.parent
    if not existing.is_dir():
        raise KybdrError(
            f"restore.spool_dir {str(spool_dir)!r} cannot be used: {str(existing)!r} is not an existing "
            "directory; a parallel restore (--jobs > 1) spools the decoded archive there"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KybdrError(f"restore.spool_dir {str(spool_dir)!r} cannot be used: {str(existing)!r} is not writable")
    need = dump_bytes + SPOOL_MARGIN
    try:
        free = shutil.disk_usage(existing).free
    except OSError as exc:
        raise KybdrError(f"restore.spool_dir {str(spool_dir)!r}: cannot read its free space: {exc}") from None
    if free < need:
        raise KybdrError(
            f"restore.spool_dir {str(spool_dir)!r} has {_gib(free)} free; a parallel restore of this backup needs "
            f"{_gib(need)} (the {_gib(dump_bytes)} dump and a margin): free space, point restore.spool_dir "
            "elsewhere, or restore without --jobs (streaming, no spool)"
        )


def _create(spool_dir: Path, backup_id: str) -> tuple[Path, BinaryIO]:
    try:
        spool_dir.mkdir(mode=0o700, exist_ok=True)
        if not spool_dir.is_dir() or spool_dir.is_symlink():
            raise KybdrError(f"restore.spool_dir {str(spool_dir)!r} is not a directory")
        path = spool_dir / f"restore-{backup_id}-{secrets.token_hex(4)}.dump"
        fd = os.open(path, _FLAGS, 0o600)
    except OSError as exc:
        raise KybdrError(f"cannot create the restore spool in {str(spool_dir)!r}: {exc.strerror}") from None
    return path, os.fdopen(fd, "wb")


@asynccontextmanager
async def spooled(backup: Manifest, store: BlobStore, keyring: KeyRing | None, spool_dir: Path) -> AsyncIterator[Path]:
    """The backup decoded into a spool file, yielded only after the whole stream verified; removed on exit."""
    check_room(spool_dir, backup.dump_bytes)
    path, out = _create(spool_dir, backup.id)
    try:
        try:

            async def write(data: bytes) -> None:
                try:
                    await anyio.to_thread.run_sync(out.write, data)
                except OSError as exc:  # above all ENOSPC: something else filled the disk meanwhile
                    raise KybdrError(f"writing the restore spool {str(path)!r} failed: {exc.strerror}") from None

            await stream_backup(lambda: store.read(backup.object_key), backup, keyring, write)
            await anyio.to_thread.run_sync(out.flush)
        finally:
            out.close()
        yield path
    finally:
        # Synchronous on purpose: no checkpoint, so a cancellation cannot interrupt it (a shield by itself).
        path.unlink(missing_ok=True)
