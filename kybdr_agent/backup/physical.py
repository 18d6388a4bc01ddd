"""Physical base backups: pg_basebackup's tar of the whole cluster → compress → seal → the repository, then —
once the WAL that makes it consistent is archived — the manifest.

``pg_basebackup -D - -Ft -X none`` writes the cluster's one tar to stdout (with the backup manifest injected
as its last member); it runs through the same pump as pg_dump (``pump.stream_child``: bounded buffers, CPU
work in a worker thread, the store's multipart rules, the upload aborted on any failure). ``-X none``: the
WAL comes from the archive (``wal/``), not from inside the tar, so a backup never holds its own copy of WAL
the archive already keeps, and restore reads all WAL one way. The tar is read as it streams past
(``basetar.py``), so the manifest records the start and stop LSN, timeline and system identifier of exactly
what was stored.

**A base backup without its WAL is not a backup.** PostgreSQL's backup stop switches to a new WAL segment
itself (``do_pg_backup_stop`` → ``RequestXLogSwitch`` on a primary), so the segment holding the stop LSN is
complete when pg_basebackup exits; in ``archive_command`` mode pg_basebackup even waits for the server's
archiver. The agent then waits, bounded (``WAL_WAIT_SECONDS``), until every segment from the start to the stop
LSN has its record in the archive (``WalArchive.stat``), and only then writes the manifest. No archiving, or
archiving that does not keep up, fails the backup and removes what it stored: the same rule as a failed
pg_dump. Refused up front, with what to change: WAL archiving not enabled in the agent (``[wal] enabled``), a
role without REPLICATION, ``wal_level = minimal``, no WAL senders, a standby (its backup-stop does not switch
WAL, so its stop segment may not be archived for hours), and extra tablespaces (``-D -`` can write only one
tar; pg_basebackup would refuse too, after its checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import anyio

from kybdr_agent import __version__
from kybdr_agent.backup import compress, manifest
from kybdr_agent.backup.basetar import BaseTarError, BaseTarFacts, BaseTarReader
from kybdr_agent.backup.lease import hold_lease
from kybdr_agent.backup.manifest import Manifest, PhysicalInfo
from kybdr_agent.backup.pgdump import buffered_stdout
from kybdr_agent.backup.physical_manifest import consistency_segments
from kybdr_agent.backup.pipeline import BackupOptions, check_stored, delete_quietly, seal_plan
from kybdr_agent.backup.pump import Encoder, stream_child
from kybdr_agent.backup.streamfmt import Compression, StreamSealer
from kybdr_agent.errors import IntegrityError, KybdrError
from kybdr_agent.postgres.connection import Connection, database_errors, tool_version
from kybdr_agent.storage.base import BlobStore, UploadResult
from kybdr_agent.telemetry import get_logger
from kybdr_agent.telemetry.tracing import stage
from kybdr_agent.wal.archive import WalArchive
from kybdr_agent.wal.facts import system_facts
from kybdr_agent.wal.names import Segment, format_lsn

# How long a finished base backup waits for its WAL to reach the archive. Stream mode ships a completed segment
# within a second or two (pg_receivewal, then the shipper's next poll); a minute covers a busy upload queue.
WAL_WAIT_SECONDS: Final = 60.0
WAL_POLL_SECONDS: Final = 0.25
# The job's "database": one physical backup at a time, whichever cluster the DSN reaches.
PHYSICAL_JOB_DATABASE: Final = "@cluster"
log = get_logger("kybdr_agent.physical")

ArchiveFor = Callable[[str, int], WalArchive]
"""The WAL archive of a cluster: (system identifier, segment size) → ``WalArchive`` on the backup's store."""


class PhysicalBackupRefused(KybdrError):
    """The cluster or the agent is not set up for a physical backup that could be restored; nothing was stored."""


@dataclass(frozen=True)
class ClusterFacts:
    system_identifier: str
    timeline: int
    segment_size: int
    server_version: str
    server_version_num: int
    size_bytes: int | None


_CHECK_SQL: Final = """
select
    current_user as role,
    (select rolreplication or rolsuper from pg_roles where rolname = current_user) as may_replicate,
    current_setting('wal_level') as wal_level,
    current_setting('max_wal_senders')::int as max_wal_senders,
    pg_is_in_recovery() as in_recovery,
    array(select spcname::text from pg_tablespace where spcname not in ('pg_default', 'pg_global')
          order by spcname) as tablespaces,
    current_setting('server_version') as server_version,
    current_setting('server_version_num')::int as server_version_num,
    (select sum(pg_database_size(oid)) from pg_database
      where datallowconn and has_database_privilege(oid, 'CONNECT'))::bigint as size_bytes
"""


def refusal(row: Any) -> str | None:
    """Why this server cannot give a restorable base backup, from ``_CHECK_SQL``'s row; None when it can."""
    role = row["role"]
    if not row["may_replicate"]:
        return (
            f"the role {role!r} lacks the REPLICATION attribute pg_basebackup needs: ALTER ROLE {role} REPLICATION "
            "(and give it a 'replication' line in pg_hba.conf)"
        )
    if row["wal_level"] == "minimal":
        return "wal_level is minimal: set wal_level = replica and restart the server"
    if row["max_wal_senders"] < 1:
        return "max_wal_senders is 0: pg_basebackup needs a WAL sender (set max_wal_senders and restart)"
    if row["in_recovery"]:
        return "the server is a standby: take physical backups from the primary"
    if row["tablespaces"]:
        return (
            f"the cluster has tablespaces besides pg_default ({', '.join(row['tablespaces'])}); physical backups "
            "of clusters with extra tablespaces are not supported yet"
        )
    return None


async def cluster_facts(conn: Any) -> ClusterFacts:
    """What the backup needs of the server, after the checks that would make it fail or unrestorable."""
    with database_errors("checking the server for a physical backup"):
        row = await conn.fetchrow(_CHECK_SQL)
    why = refusal(row)
    if why is not None:
        raise PhysicalBackupRefused(f"no physical backup taken: {why}")
    system_identifier, timeline, segment_size = await system_facts(conn)
    size = row["size_bytes"]
    return ClusterFacts(
        system_identifier=system_identifier,
        timeline=timeline,
        segment_size=segment_size,
        server_version=str(row["server_version"]),
        server_version_num=int(row["server_version_num"]),
        size_bytes=int(size) if size is not None else None,
    )


@dataclass
class _TarEncoder(Encoder):
    """The pump's encoder, reading the tar's headers (``basetar``) in the same worker-thread hop."""

    tar: BaseTarReader = field(default_factory=BaseTarReader)

    def update(self, chunk: bytes) -> bytes:
        self.tar.feed(chunk)
        return super().update(chunk)


def _checked_tar(encoder: _TarEncoder, facts: ClusterFacts) -> BaseTarFacts:
    try:
        tar = encoder.tar.finish()
    except BaseTarError as exc:
        raise IntegrityError(f"pg_basebackup's output is not a usable base backup: {exc}") from None
    if tar.system_identifier != facts.system_identifier:
        raise KybdrError(
            f"pg_basebackup reached cluster {tar.system_identifier}, not the agent's session's "
            f"{facts.system_identifier} (several hosts in the DSN?); the backup was not recorded"
        )
    start = Segment.containing(tar.start_lsn, tar.timeline, facts.segment_size)
    if start.name != tar.label.start_segment:
        raise IntegrityError(
            f"backup_label names segment {tar.label.start_segment} for LSN {format_lsn(tar.start_lsn)}, "
            f"not {start.name} as {facts.segment_size}-byte segments would"
        )
    if tar.tablespace_map:
        raise PhysicalBackupRefused("a tablespace was created during the backup; physical backups need one tablespace")
    return tar


async def wait_for_wal(archive: WalArchive, info: PhysicalInfo, within: float) -> None:
    """Until every segment the backup needs to become consistent has its record in the archive."""
    missing = consistency_segments(info)
    with anyio.move_on_after(within):
        while missing:
            if await archive.stat(missing[0].name, missing[0].timeline) is None:
                await anyio.sleep(WAL_POLL_SECONDS)
            else:
                missing.pop(0)
    if missing:
        first, last = consistency_segments(info)[0], consistency_segments(info)[-1]
        raise PhysicalBackupRefused(
            f"the WAL this base backup needs to become consistent ({first.name} to {last.name}) was not archived "
            f"within {within:.0f} s: {missing[0].name} is not in {archive.describe()}. A base backup without its "
            "WAL cannot be restored, so it was not recorded: check that WAL archiving is running and keeping up "
            "(kybdr-agent status, GET /v1/wal/status)"
        )


async def physical_backup_and_record(
    *,
    connection: Connection,
    maintenance_database: str,
    store: BlobStore,
    options: BackupOptions,
    archive_for: ArchiveFor,
    wal_enabled: bool,
    wal_wait: float = WAL_WAIT_SECONDS,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Manifest:
    """A physical backup made visible, as ``pipeline.backup_and_record`` makes a logical one: under a lease,
    data first, the manifest last, and on any failure nothing left."""
    if not wal_enabled:
        raise PhysicalBackupRefused(
            "no physical backup taken: a base backup is restorable only with the WAL archived from its start, "
            "and this agent does not archive WAL; set [wal] enabled = true and start the agent (kybdr-agent run)"
        )
    async with connection.connect(maintenance_database) as conn:
        facts = await cluster_facts(conn)
        database = manifest.cluster_database(facts.system_identifier)
        started_at = now()
        backup_id = manifest.new_backup_id(started_at)
        data_key = manifest.data_key_path(database, backup_id)
        async with hold_lease(store, database, backup_id, now=now):
            try:
                made = await _run(conn, facts, connection, maintenance_database, store, options, backup_id, started_at)
                with stage("wal", backup_id=backup_id):
                    assert made.physical is not None
                    archive = archive_for(facts.system_identifier, facts.segment_size)
                    await wait_for_wal(archive, made.physical, wal_wait)
            except BaseException:
                await delete_quietly(store, [data_key])
                raise
            finished = now()
            made = made.model_copy(
                update={
                    "finished_at": finished,
                    "duration_seconds": round((finished - started_at).total_seconds(), 3),
                }
            )
            try:
                with stage("manifest", backup_id=made.id, stored_bytes=made.stored_bytes):
                    await check_stored(store, made)
                    await store.put_bytes(manifest.manifest_key_path(database, made.id), made.to_json())
            except BaseException:
                await delete_quietly(store, [manifest.manifest_key_path(database, made.id), data_key])
                raise
    log.info(
        "backup.physical_completed",
        backup_id=made.id,
        cluster=facts.system_identifier,
        start_lsn=made.physical.start_lsn if made.physical else None,
        stop_lsn=made.physical.stop_lsn if made.physical else None,
    )
    return made


async def _run(
    conn: Any,
    facts: ClusterFacts,
    connection: Connection,
    maintenance_database: str,
    store: BlobStore,
    options: BackupOptions,
    backup_id: str,
    started_at: datetime,
) -> Manifest:
    """The data object stored and checked; the manifest to write once the WAL is archived (its finishing time
    and duration are set then)."""
    database = manifest.cluster_database(facts.system_identifier)
    data_key = manifest.data_key_path(database, backup_id)
    header, key, encryption = await seal_plan(options, backup_id)
    encoder = _TarEncoder(
        compressor=compress.compressor(options.compression, options.compression_level, options.compression_threads),
        sealer=StreamSealer(header, key),
    )
    major = facts.server_version_num // 10000
    pg_basebackup = connection.binary("pg_basebackup", major)
    version = await tool_version(pg_basebackup)
    # -X none: the WAL comes from the archive. --checkpoint=fast: the backup starts now, not at the next
    # checkpoint. The label names the backup in backup_label and pg_stat_progress_basebackup. pg_basebackup
    # writes the tar to stdout through stdio, so a larger stdio buffer means fewer, larger pipe writes.
    argv = buffered_stdout(
        [
            pg_basebackup,
            "-D",
            "-",
            "-Ft",
            "-X",
            "none",
            "--checkpoint=fast",
            "--no-password",
            "-v",
            f"--label=kybdr-agent {backup_id}",
        ]
    )
    result = UploadResult()
    async with store.open_upload(data_key, size_hint=facts.size_bytes, result=result) as sink:
        # To the server the agent's session reached, whichever of several hosts that was.
        env = connection.child_env(maintenance_database, conn)
        try:
            await stream_child(argv, env, encoder, sink, options.progress, tool="pg_basebackup")
        except BaseTarError as exc:
            raise IntegrityError(f"pg_basebackup's output is not a usable base backup: {exc}") from None
        tar = _checked_tar(encoder, facts)  # inside the upload: a tar that fails its checks is never stored
    with database_errors("reading the server's clock after the backup"):
        stop_time = await conn.fetchval("select clock_timestamp()")
    info = PhysicalInfo(
        system_identifier=tar.system_identifier,
        timeline=tar.timeline,
        start_lsn=format_lsn(tar.start_lsn),
        stop_lsn=format_lsn(tar.stop_lsn),
        wal_segment_size=facts.segment_size,
        stop_time=stop_time,
        server_version_num=facts.server_version_num,
        tar_bytes=tar.tar_bytes,
    )
    return Manifest(
        id=backup_id,
        database=database,
        agent_version=__version__,
        server_version=facts.server_version,
        pg_dump_version=version,
        started_at=started_at,
        finished_at=started_at,
        duration_seconds=0.0,
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
        object_key=data_key,
        parts=result.parts,
        checksum_algorithm=result.checksum_algorithm,
        database_size_bytes=facts.size_bytes,
        labels=list(options.labels),
        description=options.description,
        replication={name: dict(fields) for name, fields in options.replication},
        kind="physical",
        physical=info,
    )
