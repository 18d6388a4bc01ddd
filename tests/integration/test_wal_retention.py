"""WAL retention applied to an archive of real WAL (``wal/retention_run.py``): a PostgreSQL 15 cluster with 1 MiB
segments writes and switches; its completed segments from ``pg_wal`` go into a folder repository through
``WalArchive.push``, with a timeline history file; two physical base backups start at LSNs the server reported
between the writes.

What it proves:

* the WAL before the oldest kept backup's start segment is deleted, record and object; everything from that
  segment on stays, and still verifies; the history file stays; a second pass deletes nothing;
* a dry run reports exactly what the real pass then deletes, and deletes nothing itself;
* one unreadable record: nothing is deleted at all, and the error says so;
* the same on S3 (moto over HTTP), where an object without a record, old enough, is removed as an orphan.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import anyio
import pytest

from kybdr_agent.backup.manifest import Manifest, PhysicalInfo, cluster_database, data_key_path
from kybdr_agent.backup.streamfmt import Compression
from kybdr_agent.postgres.cluster import Cluster, start_cluster
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.wal.archive import WalArchive
from kybdr_agent.wal.names import Segment, parse_lsn
from kybdr_agent.wal.retention_run import WalRetentionError, apply_wal_retention, apply_wal_retention_all
from tests.manifests import sample_manifest
from tests.support import MotoServer

SEGMENT_SIZE: Final = 1 << 20
HISTORY: Final = "00000002.history"
LATER: Final = datetime.now(UTC) + timedelta(days=1)  # orphan ages are measured against it


@dataclass
class Source:
    system_identifier: str
    segments: dict[str, bytes]  # completed segments, by name
    starts: list[str]  # LSNs (text) where the two backups start, oldest first


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    with start_cluster(wal_segsize_mb=1) as cluster:
        yield _write_wal(cluster)


def _write_wal(cluster: Cluster) -> Source:
    system_identifier = cluster.psql("postgres", "select system_identifier from pg_control_system()").strip()
    cluster.psql("postgres", "create table t (id int)")
    starts = []
    for round_ in range(6):
        cluster.psql("postgres", f"insert into t select g from generate_series(1, {1000 * (round_ + 1)}) g")
        if round_ in (2, 4):
            starts.append(cluster.psql("postgres", "select pg_current_wal_insert_lsn()").strip())
        cluster.psql("postgres", "select pg_switch_wal()")
    current = Segment.containing(
        parse_lsn(cluster.psql("postgres", "select pg_current_wal_insert_lsn()").strip()), 1, SEGMENT_SIZE
    )
    segments = {}
    for path in sorted((cluster.data_dir / "pg_wal").iterdir()):
        if len(path.name) == 24 and path.name.startswith("00000001") and int(path.name[16:], 16) < current.segno:
            segments[path.name] = path.read_bytes()  # completed: a recycled future name would be refused by push
    assert len(segments) >= 6
    return Source(system_identifier, segments, starts)


def _archive(root: Path, source: Source) -> WalArchive:
    return WalArchive(
        LocalStore(root), system_identifier=source.system_identifier, segment_size=SEGMENT_SIZE, keyring=None,
        compression=Compression.ZSTD, compression_level=None, frame_size=256 << 10,
    )  # fmt: skip


def _backup(source: Source, index: int) -> Manifest:
    """A physical manifest of the source starting where the server said (its stop a few bytes later)."""
    start = parse_lsn(source.starts[index])
    backup_id = f"20261201T00000{index}Z-0000000{index}"
    database = cluster_database(source.system_identifier)
    fields = sample_manifest(backup_id).model_dump()
    fields.update(
        database=database,
        kind="physical",
        object_key=data_key_path(database, backup_id),
        physical=PhysicalInfo(
            system_identifier=source.system_identifier, timeline=1, start_lsn=source.starts[index],
            stop_lsn=f"{(start + 200) >> 32:X}/{(start + 200) & 0xFFFFFFFF:X}", wal_segment_size=SEGMENT_SIZE,
            stop_time=datetime(2026, 12, 1, tzinfo=UTC), server_version_num=150000, tar_bytes=fields["dump_bytes"],
        ),
    )  # fmt: skip
    return Manifest.model_validate(fields)


async def _fill(wal: WalArchive, source: Source) -> None:
    for name, data in source.segments.items():
        await wal.push(name, data, source="archive_command")
    await wal.push(HISTORY, b"1\t0/FF000000\tno recovery target specified\n", source="archive_command")


def _files(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*") if p.is_file()}


def test_the_wal_before_the_oldest_kept_backup_goes_and_the_rest_stays(source: Source, tmp_path: Path) -> None:
    wal = _archive(tmp_path, source)
    old, new = _backup(source, 0), _backup(source, 1)
    first = Segment.containing(parse_lsn(source.starts[0]), 1, SEGMENT_SIZE)
    older = sorted(n for n in source.segments if int(n[16:], 16) < first.segno)
    newer = sorted(n for n in source.segments if int(n[16:], 16) >= first.segno)
    assert older
    assert len(newer) >= 3

    async def main() -> None:
        await _fill(wal, source)
        dry = await apply_wal_retention_all([old, new], {old.id, new.id}, lambda *_: wal, dry_run=True, now=LATER)
        assert dry[source.system_identifier]["would_delete"] == older
        assert _files(tmp_path) >= set(older)
        done = await apply_wal_retention(wal, [old, new], dry_run=False, now=LATER)
        assert done.deleted == len(older)
        assert done.kept == len(newer) + 1
        assert done.bytes_freed > 0
        left = _files(tmp_path)
        assert not {n for n in older} & left
        assert not {n + ".json" for n in older} & left
        assert {*newer, *(n + ".json" for n in newer), HISTORY, HISTORY + ".json"} <= left
        records = await wal.records()
        assert sorted(r.file_name for r in records) == sorted([*newer, HISTORY])
        for record in records:  # what stays still verifies, down to the first page
            if record.file_name in newer[:2]:
                await wal.fetch(record, tmp_path / f"check-{record.file_name}")
                assert (tmp_path / f"check-{record.file_name}").read_bytes() == source.segments[record.file_name]
        again = await apply_wal_retention(wal, [old, new], dry_run=False, now=LATER)
        assert again.deleted == 0
        # The old backup dropped by backup retention: its WAL up to the new one's start goes next.
        later = await apply_wal_retention_all([old, new], {new.id}, lambda *_: wal, dry_run=False, now=LATER)
        start_new = Segment.containing(parse_lsn(source.starts[1]), 1, SEGMENT_SIZE).segno
        assert later[source.system_identifier]["deleted"] == start_new - first.segno

    anyio.run(main)


def test_an_unreadable_record_deletes_nothing(source: Source, tmp_path: Path) -> None:
    wal = _archive(tmp_path, source)

    async def main() -> None:
        await _fill(wal, source)
        last = sorted(source.segments)[-1]
        next(tmp_path.rglob(last + ".json")).write_bytes(b'{"format": 1, "truncated')
        before = _files(tmp_path)
        with pytest.raises(WalRetentionError, match=f"nothing was deleted.*{last}"):
            await apply_wal_retention(wal, [_backup(source, 1)], dry_run=False, now=LATER)
        assert _files(tmp_path) == before

    anyio.run(main)


def test_on_s3_the_same_deletes_and_an_old_orphan_goes(source: Source, moto_server: MotoServer, bucket: str) -> None:
    """moto over HTTP: listing, LastModified (the orphan's age) and deletes as S3 answers them."""
    from kybdr_agent.storage.s3 import S3Options, S3Store

    first = Segment.containing(parse_lsn(source.starts[0]), 1, SEGMENT_SIZE)
    older = sorted(n for n in source.segments if int(n[16:], 16) < first.segno)
    prefix = f"wal/{source.system_identifier}/00000001/"

    async def main() -> None:
        options = S3Options(
            bucket=bucket, prefix="kybdr", region="us-east-1", endpoint_url=moto_server.endpoint,
            addressing_style="path",
        )  # fmt: skip
        store = await S3Store.open(options)
        try:
            wal = WalArchive(
                store, system_identifier=source.system_identifier, segment_size=SEGMENT_SIZE, keyring=None,
                compression=Compression.ZSTD, compression_level=None, frame_size=256 << 10,
            )  # fmt: skip
            await _fill(wal, source)
            orphan = prefix + "000000010000000000000FFF"  # an object whose push died before its record
            await store.put_bytes(orphan, b"sealed")
            done = await apply_wal_retention(wal, [_backup(source, 0)], dry_run=False, now=LATER)
            assert done.deleted == len(older)
            assert done.orphans_deleted == 1
            keys = {info.key async for info in store.list_objects(prefix)}
            assert not {prefix + n for n in older} & keys
            assert not {prefix + n + ".json" for n in older} & keys
            assert orphan not in keys
            assert {prefix + n for n in source.segments if n not in older} <= keys
        finally:
            await store.aclose()

    anyio.run(main)


def test_wired_cleanup_applies_wal_retention_per_cluster(source: Source, tmp_path: Path) -> None:
    """WIRED: ``BackupService.cleanup`` (what ``kybdr-agent cleanup`` and the daemon run) applies WAL retention
    after the backups' own, and ``--dry-run`` only reports it."""
    from kybdr_agent.backup.manifest import manifest_key_path
    from kybdr_agent.config import load_settings
    from tests.support import folder_service, write_config

    repo = tmp_path / "repo"
    wal = _archive(repo, source)
    config = write_config(
        tmp_path / "agent.toml",
        f'[backup]\nencryption = false\n\n[database]\ndsn = "host=/nonexistent user=postgres"\n\n[repository]\nurl = "file://{repo}"\n',
    )
    service = folder_service(load_settings(config))
    backups = [_backup(source, 0), _backup(source, 1)]
    first = Segment.containing(parse_lsn(source.starts[0]), 1, SEGMENT_SIZE)
    older = sorted(n for n in source.segments if int(n[16:], 16) < first.segno)

    async def main() -> None:
        await _fill(wal, source)
        for m in backups:
            await wal.store.put_bytes(manifest_key_path(m.database, m.id), m.to_json())
            await wal.store.put_bytes(m.object_key, b"x" * m.stored_bytes)
        dry = await service.cleanup(dry_run=True)
        assert dry["wal"][source.system_identifier]["would_delete"] == older
        assert set(older) <= _files(repo)
        done = await service.cleanup(dry_run=False)
        assert sorted(done["kept"]) == sorted(m.id for m in backups)
        assert done["wal"][source.system_identifier]["deleted"] == len(older)
        assert not set(older) & _files(repo)

    anyio.run(main)
