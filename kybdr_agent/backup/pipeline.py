"""A logical backup: a snapshot, pg_dump through the data path (``pump.py``: compress → seal frames → SHA-256 →
repository), the server's globals beside it, then the manifest.

A backup exists if and only if its manifest does: the manifest is written after the data object is
complete and verified, and any failure before that — pg_dump's exit status, a store error, cancellation —
leaves the upload aborted and no manifest.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import anyio

from kybdr_agent import __version__
from kybdr_agent.asyncutil import task_group
from kybdr_agent.backup import compress, facts, manifest
from kybdr_agent.backup.globals import dump_globals, globals_header
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.lease import hold_lease
from kybdr_agent.backup.pgdump import buffered_stdout
from kybdr_agent.backup.pump import BackupProgress, Encoder, stream_child
from kybdr_agent.backup.streamfmt import Cipher, Compression, StreamHeader, StreamSealer
from kybdr_agent.errors import KybdrError
from kybdr_agent.postgres.connection import (
    CLOSE_DEADLINE,
    DATABASE_ERRORS,
    Connection,
    database_errors,
    pg_message,
    tool_version,
)
from kybdr_agent.storage.base import BlobStore, UploadResult
from kybdr_agent.telemetry import get_logger
from kybdr_agent.telemetry.tracing import stage

log = get_logger("kybdr_agent.pipeline")
NONCE_PREFIX_BYTES: Final = 7
_NO_KEY_ID: Final = bytes(16)


@dataclass(frozen=True)
class BackupOptions:
    compression: Compression = Compression.ZSTD
    compression_level: int | None = None
    compression_threads: int = 0
    keyring: KeyRing | None = None
    frame_size: int = 1 << 20
    labels: tuple[str, ...] = ()
    description: str | None = None
    count_max_table_bytes: int = facts.DEFAULT_MAX_TABLE_BYTES
    count_max_total_bytes: int = facts.DEFAULT_MAX_TOTAL_BYTES
    progress: BackupProgress | None = None
    # The manifest's replication record at creation: ``{"cross_region": {"status": "not requested"}}`` for
    # a backup whose request turned the configured copy off, so a backfill pass leaves it alone.
    replication: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()


async def run_backup(
    database: str,
    *,
    connection: Connection,
    store: BlobStore,
    options: BackupOptions,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    backup_id: str | None = None,
) -> manifest.Manifest:
    started_at = now()
    started = time.monotonic()
    backup_id = backup_id or manifest.new_backup_id(started_at)
    data_key_path = manifest.data_key_path(database, backup_id)

    header, data_key, encryption = await seal_plan(options, backup_id)
    encoder = Encoder(
        compressor=compress.compressor(options.compression, options.compression_level, options.compression_threads),
        sealer=StreamSealer(header, data_key),
    )
    result = UploadResult()

    async with connection.connect(database) as conn:
        with database_errors(f"reading facts about database {database!r}"):
            server_version = str(await conn.fetchval("show server_version"))
            db_size = int(await conn.fetchval("select pg_database_size(current_database())"))
        server_major = conn.get_server_version().major
        pg_dump = connection.binary("pg_dump", server_major)
        pg_dump_version = await tool_version(pg_dump)
        # Export a snapshot and hold it while pg_dump runs: the dump and any facts we record about it
        # describe exactly the same moment. The transaction is begun and ended by hand, not by asyncpg's
        # context manager, whose exit on a dead connection would replace pg_dump's own verdict.
        with database_errors(f"exporting a snapshot of {database!r}"):
            await conn.execute("begin isolation level repeatable read read only")
            snapshot = str(await conn.fetchval("select pg_export_snapshot()"))
        argv = buffered_stdout([pg_dump, "--format=custom", "--compress=0", "--no-password", f"--snapshot={snapshot}"])
        counts: dict[str, int] = {}

        async def count_rows() -> None:
            # Counting is evidence for drills, not part of the backup: if the session dies (a terminated
            # backend, a restarted server) the dump goes on and the tables counted so far are recorded.
            try:
                await facts.row_counts(
                    conn,
                    max_table_bytes=options.count_max_table_bytes,
                    max_total_bytes=options.count_max_total_bytes,
                    into=counts,
                )
            except DATABASE_ERRORS as exc:
                log.warning(
                    "backup.row_counts_incomplete",
                    database=database,
                    tables_counted=len(counts),
                    error=pg_message(exc),
                    note="the dump is unaffected; restore drills compare the tables that were counted",
                )

        async with (
            store.open_upload(data_key_path, size_hint=db_size, result=result) as sink,
            task_group() as tg,
        ):
            if options.count_max_total_bytes > 0:
                tg.start_soon(count_rows)
            # pg_dump goes to the server that exported the snapshot, whichever of several hosts that was.
            await stream_child(argv, connection.child_env(database, conn), encoder, sink, options.progress)
        # The server's roles and tablespaces, as a second object sealed like the data (``globals.py``). If
        # that fails, the data object already stored goes too: no manifest, nothing left.
        globals_key = manifest.globals_key_path(database, backup_id)
        globals_stream = globals_header(header)
        try:
            with stage("globals"):
                globals_object = await dump_globals(
                    conn,
                    connection=connection,
                    database=database,
                    server_major=server_major,
                    store=store,
                    key=globals_key,
                    header=globals_stream,
                    encoder=Encoder(
                        compressor=compress.compressor(options.compression, options.compression_level, 0),
                        sealer=StreamSealer(globals_stream, data_key),
                    ),
                    encrypted=data_key is not None,
                )
        except BaseException:
            await delete_quietly(store, [data_key_path])
            raise
        # pg_dump exited 0 and every byte is stored: the dump is complete and consistent, because pg_dump
        # imported the snapshot into its own transaction when it started. Ending ours is a courtesy that a
        # dead session may refuse.
        with anyio.move_on_after(CLOSE_DEADLINE), contextlib.suppress(*DATABASE_ERRORS):
            await conn.execute("rollback")

    finished_at = now()
    return manifest.Manifest(
        id=backup_id,
        database=database,
        agent_version=__version__,
        server_version=server_version,
        pg_dump_version=pg_dump_version,
        started_at=started_at,
        finished_at=finished_at,
        duration_seconds=round(time.monotonic() - started, 3),
        dump_bytes=encoder.dump_bytes,
        compressed_bytes=encoder.compressed_bytes,
        stored_bytes=result.size,
        sha256=encoder.stored_hash.hexdigest(),
        compression=options.compression.name.lower(),
        compression_level=options.compression_level if options.compression is not Compression.NONE else None,
        frame_size=header.frame_size,
        frames=encoder.sealer.frames_sealed,
        stream_header=header.encode().hex(),
        encryption=encryption,
        storage=store.kind,
        object_key=data_key_path,
        parts=result.parts,
        checksum_algorithm=result.checksum_algorithm,
        database_size_bytes=db_size,
        snapshot=snapshot,
        row_counts=counts,
        labels=list(options.labels),
        description=options.description,
        globals=globals_object,
        replication={name: dict(fields) for name, fields in options.replication},
    )


async def seal_plan(options: BackupOptions, backup_id: str) -> tuple[StreamHeader, bytes | None, manifest.Encryption]:
    prefix = os.urandom(NONCE_PREFIX_BYTES)
    if options.keyring is None:
        header = StreamHeader(options.compression, Cipher.NONE, options.frame_size, _NO_KEY_ID, prefix)
        return header, None, manifest.Encryption(cipher="none")
    # A fresh data key for this backup from the ring's current key: drawn here and wrapped by a key file, or
    # made and wrapped by AWS KMS (GenerateDataKey, bound to the backup id). The header names that key.
    new = await options.keyring.new_data_key(backup_id)
    header = StreamHeader(options.compression, Cipher.AES_256_GCM, options.frame_size, new.key_id, prefix)
    return header, new.plaintext, new.encryption


async def check_stored(store: BlobStore, made: manifest.Manifest) -> None:
    info = await store.stat(made.object_key)
    if info is None or info.size != made.stored_bytes:
        raise KybdrError(
            f"the stored object {made.object_key} has {info.size if info else 'no'} bytes, expected "
            f"{made.stored_bytes}; the backup was not recorded"
        )


async def delete_quietly(store: BlobStore, keys: list[str]) -> None:
    """Best-effort removal of what a failed backup wrote; the sweep retries whatever this cannot delete."""
    with anyio.move_on_after(60, shield=True):
        for key in keys:
            try:
                await store.delete(key)
            except Exception as exc:  # noqa: BLE001 - keep the original error; the sweep retries
                log.warning(
                    "backup.cleanup_failed",
                    key=key,
                    error=str(exc),
                    note="the next sweep (the agent's next housekeeping tick, or the next kybdr-agent command) "
                    "removes it",
                )


async def backup_and_record(
    database: str,
    *,
    connection: Connection,
    store: BlobStore,
    options: BackupOptions,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> manifest.Manifest:
    """A backup made visible: data first, then the manifest — the one write that makes it exist.

    The whole of it runs under a lease (``lease.py``), written before the upload starts and removed after
    the manifest is written or the leftovers are deleted, so a sweep can tell this backup from the
    remains of a dead one without waiting.
    """
    started_at = now()
    backup_id = manifest.new_backup_id(started_at)
    async with hold_lease(store, database, backup_id, now=now):
        try:
            made = await run_backup(
                database, connection=connection, store=store, options=options, now=now, backup_id=backup_id
            )
        except BaseException:
            # A completing request whose answer was lost can leave the data object stored although the
            # upload "failed" (S3 answers the retries NoSuchUpload, moto 500): it is this backup's own key,
            # under its lease, so remove it now rather than leave it to the next sweep.
            await delete_quietly(
                store, [manifest.data_key_path(database, backup_id), manifest.globals_key_path(database, backup_id)]
            )
            raise
        try:
            with stage("manifest", backup_id=made.id, stored_bytes=made.stored_bytes):
                await check_stored(store, made)
                await store.put_bytes(manifest.manifest_key_path(database, made.id), made.to_json())
        except BaseException:
            # No manifest means no backup: do not leave its data behind to look like one.
            globals_keys = [made.globals.object_key] if made.globals is not None else []
            await delete_quietly(store, [manifest.manifest_key_path(database, made.id), made.object_key, *globals_keys])
            raise
    return made
