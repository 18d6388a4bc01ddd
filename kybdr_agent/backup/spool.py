"""The restore spool: the archive's table of contents on local disk, for ``pg_restore -j N --section=post-data``.

A parallel restore streams the pre-data and data sections through one pg_restore (``restore.py``), then
builds the post-data section — indexes, constraints, triggers — with N workers. Workers need a seekable
archive, but post-data entries carry no data: the archive's head (header and table of contents,
``archive_toc.TocCapture``; kilobytes, at most ``TOC_LIMIT``) is all they read, so that is all that is
spooled. The head names the schema (definitions, not rows); the directory is created 0700 and the file
0600 with ``O_EXCL`` (never an existing file or a symlink's target), room is checked before anything is
created, and the file is deleted whatever happens.

Why not the whole archive, as ``pg_restore -j`` from a file would read it: the backup is a piped dump
with no data offsets in its TOC, so each worker scans past every block before the one it wants; spooling
it first also costs a full decode and a dump-sized write before any restore starts. Measured on dataset B
in ``docs/benchmarks.md``: the whole-archive spool was slower than streaming.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Final

from kybdr_agent.backup.archive_toc import TOC_LIMIT
from kybdr_agent.errors import KybdrError

SPOOL_MARGIN: Final = 16 << 20  # beyond the file itself: the filesystem's own needs, other writers
SPOOL_ROOM: Final = TOC_LIMIT + SPOOL_MARGIN  # checked before a restore starts, when the TOC's size is unknown
_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def check_room(spool_dir: Path, need: int = SPOOL_ROOM) -> None:
    """Refuse, before anything is created, a spool directory that cannot take ``need`` bytes.

    The directory may not exist yet (it is created on use), but its parent must."""
    existing = spool_dir if spool_dir.exists() else spool_dir.parent
    if not existing.is_dir():
        raise KybdrError(
            f"restore.spool_dir {str(spool_dir)!r} cannot be used: {str(existing)!r} is not an existing "
            "directory; a parallel restore (--jobs > 1) spools the archive's table of contents there"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KybdrError(f"restore.spool_dir {str(spool_dir)!r} cannot be used: {str(existing)!r} is not writable")
    try:
        free = shutil.disk_usage(existing).free
    except OSError as exc:
        raise KybdrError(f"restore.spool_dir {str(spool_dir)!r}: cannot read its free space: {exc}") from None
    if free < need:
        raise KybdrError(
            f"restore.spool_dir {str(spool_dir)!r} has {_mib(free)} free; a parallel restore needs {_mib(need)} "
            "for the archive's table of contents: free space, point restore.spool_dir elsewhere, or restore "
            "without --jobs"
        )


def _create(spool_dir: Path, backup_id: str) -> tuple[Path, BinaryIO]:
    try:
        spool_dir.mkdir(mode=0o700, exist_ok=True)
        if not spool_dir.is_dir() or spool_dir.is_symlink():
            raise KybdrError(f"restore.spool_dir {str(spool_dir)!r} is not a directory")
        path = spool_dir / f"restore-{backup_id}-{secrets.token_hex(4)}.toc"
        fd = os.open(path, _FLAGS, 0o600)
    except OSError as exc:
        raise KybdrError(f"cannot create the restore spool in {str(spool_dir)!r}: {exc.strerror}") from None
    return path, os.fdopen(fd, "wb")


@contextmanager
def spooled_head(spool_dir: Path, backup_id: str, head: bytes) -> Iterator[Path]:
    """``head`` (the archive's header and TOC) in a spool file for the block; removed on exit."""
    check_room(spool_dir, len(head) + SPOOL_MARGIN)
    path, out = _create(spool_dir, backup_id)
    try:
        try:
            out.write(head)
            out.flush()
        except OSError as exc:
            raise KybdrError(f"writing the restore spool {str(path)!r} failed: {exc.strerror}") from None
        finally:
            out.close()
        yield path
    finally:
        path.unlink(missing_ok=True)
