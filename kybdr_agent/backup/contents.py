"""What a backup holds, read from the backup itself: its archive streamed through the verifying decoder into
``archive_toc``'s parser — nothing on disk, no database needed.

``backup_contents`` reads the whole stream: table sizes come from the data blocks, and the stream's own
checks (every frame authenticated, sizes and SHA-256s equal to the manifest's) run to the end, so a corrupt
or truncated backup is an error, not a listing. Parsing is the cost: about 1 µs per COPY row (pg_dump -Z0
writes one chunk per row), 170 MB/s of CPU on the 100 MB mixed dump, where decoding alone runs at 340 MB/s —
some 17 ms per 3 MB decoded chunk, too long to hold the event loop, so each chunk is parsed in a worker
thread, as ``decode`` does its own work (which also lets zstd and AES, which release the GIL, overlap it).

``read_toc`` reads only as far as the table of contents — the first frames of a backup — for a selective
restore to plan with before anything is created. Those frames are authenticated like all others; the rest
of the stream is verified by the restore that follows, which reads it all.
"""

from __future__ import annotations

import contextlib

import anyio

from kybdr_agent.backup.archive_toc import Archive, ArchiveError, ArchiveParser, UnsupportedArchive
from kybdr_agent.backup.contents_doc import Contents, summarize
from kybdr_agent.backup.decode import stream_backup
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.errors import IntegrityError, KybdrError
from kybdr_agent.storage.base import BlobStore


class _TocRead(Exception):
    """Control flow: the table of contents is complete; the rest of the stream is not needed."""


def _unreadable(backup: Manifest, exc: ArchiveError) -> KybdrError:
    if isinstance(exc, UnsupportedArchive):
        return KybdrError(f"backup {backup.id}'s archive cannot be read by this kybdr-agent: {exc}")
    return IntegrityError(f"backup {backup.id}'s archive is not a complete pg_dump archive: {exc}")


async def backup_contents(backup: Manifest, store: BlobStore, keyring: KeyRing | None) -> Contents:
    """The schemas, tables (owner, data size, rows) and other objects of ``backup``, read from its archive."""
    parser = ArchiveParser()

    async def sink(data: bytes) -> None:
        await anyio.to_thread.run_sync(parser.feed, data)

    try:
        await stream_backup(lambda: store.read(backup.object_key), backup, keyring, sink)
        archive = parser.finish()
    except ArchiveError as exc:
        raise _unreadable(backup, exc) from None
    return summarize(archive, backup.id)


async def read_toc(backup: Manifest, store: BlobStore, keyring: KeyRing | None) -> Archive:
    """``backup``'s archive header and table of contents (no data statistics), from the first frames."""
    parser = ArchiveParser()

    async def sink(data: bytes) -> None:
        await anyio.to_thread.run_sync(parser.feed, data)  # a TOC of many thousand entries is not instant
        if parser.toc is not None:
            raise _TocRead

    try:
        with contextlib.suppress(_TocRead):
            await stream_backup(lambda: store.read(backup.object_key), backup, keyring, sink)
        if parser.toc is None:
            parser.finish()  # the whole stream verified and ended inside the TOC: raises
        assert parser.toc is not None
    except ArchiveError as exc:
        raise _unreadable(backup, exc) from None
    return parser.toc
