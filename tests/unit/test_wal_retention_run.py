"""WAL retention applied to a folder repository (``wal/retention_run.py``): the plan's deletes, record before
object, bounded per pass; orphans removed only when old; a dry run deletes nothing; an unreadable record or
history file deletes nothing and says so; one cluster's error does not stop another's pass."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.streamfmt import Compression
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.wal.archive import WalArchive
from kybdr_agent.wal.names import format_lsn
from kybdr_agent.wal.records import wal_object_key
from kybdr_agent.wal.retention_run import WalRetentionError, apply_wal_retention, apply_wal_retention_all
from tests.unit.test_physical_manifest import info, physical
from tests.unit.test_wal_archive import SIZE, SYSTEM_ID, archive, segment_bytes

pytestmark = pytest.mark.anyio
FUTURE = datetime.now(UTC) + timedelta(days=1)  # "now" for orphan ages: every object is old enough


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def bid(tag: str) -> str:
    """A backup id whose suffix is ``tag`` (hex)."""
    return f"20261201T000000Z-{tag:0>8}"


def name(segno: int, timeline: int = 1) -> str:
    return f"{timeline:08X}{0:08X}{segno:08X}"


def backup_at(backup_id: str, segno: int) -> Manifest:
    """A physical backup of SYSTEM_ID starting in segment ``segno`` (1 MiB segments), ending in it."""
    span = info(
        system_identifier=SYSTEM_ID,
        start_lsn=format_lsn(segno * SIZE + 40),
        stop_lsn=format_lsn(segno * SIZE + 4000),
        wal_segment_size=SIZE,
    )
    return physical(backup_id, sysid=SYSTEM_ID).model_copy(update={"physical": span})


def archive_of(root: Path, system_identifier: str) -> WalArchive:
    return WalArchive(
        LocalStore(root), system_identifier=system_identifier, segment_size=SIZE, keyring=None,
        compression=Compression.ZSTD, compression_level=None, frame_size=64 << 10,
    )  # fmt: skip


async def filled(root: Path, segnos: range, *, history: bool = True, system_id: str = SYSTEM_ID) -> WalArchive:
    wal = archive(root) if system_id == SYSTEM_ID else archive_of(root, system_id)
    for segno in segnos:
        await wal.push(name(segno), segment_bytes(segno, fill=b"x" * 10, system_id=system_id), source="stream")
    if history:
        await wal.push("00000002.history", b"1\t0/5000000\tno recovery target specified\n", source="stream")
    return wal


def names_in(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*") if p.is_file()}


async def test_deletes_what_the_oldest_kept_backup_does_not_need_record_and_object(tmp_path: Path) -> None:
    wal = await filled(tmp_path, range(1, 9))
    done = await apply_wal_retention(wal, [backup_at(bid("b1"), 4), backup_at(bid("b2"), 6)], dry_run=False, now=FUTURE)
    assert (done.deleted, done.kept, done.remaining, done.error) == (3, 6, 0, None)  # 5 segments + the history
    assert done.bytes_freed > 0
    left = names_in(tmp_path)
    for segno in range(1, 4):
        assert name(segno) not in left
        assert name(segno) + ".json" not in left
    for segno in range(4, 9):
        assert {name(segno), name(segno) + ".json"} <= left
    assert "00000002.history" in left
    assert done.reasons["delete: older than the oldest kept base backup"] == 3
    again = await apply_wal_retention(
        wal, [backup_at(bid("b1"), 4), backup_at(bid("b2"), 6)], dry_run=False, now=FUTURE
    )
    assert again.deleted == 0  # planning again over what was kept deletes nothing


async def test_a_dry_run_returns_the_plan_and_deletes_nothing(tmp_path: Path) -> None:
    wal = await filled(tmp_path, range(1, 6))
    before = names_in(tmp_path)
    done = await apply_wal_retention(wal, [backup_at(bid("b1"), 3)], dry_run=True, now=FUTURE)
    assert done.dry_run
    assert done.deleted == 0
    assert done.would_delete == [name(1), name(2)]
    assert done.would_delete_count == 2
    assert done.bytes_freed > 0
    assert names_in(tmp_path) == before


async def test_no_kept_backup_deletes_nothing(tmp_path: Path) -> None:
    wal = await filled(tmp_path, range(1, 4))
    done = await apply_wal_retention(wal, [], dry_run=False, now=FUTURE)
    assert done.deleted == 0
    assert done.kept == 4


async def test_deletes_are_bounded_per_pass_oldest_first(tmp_path: Path) -> None:
    wal = await filled(tmp_path, range(1, 8), history=False)
    first = await apply_wal_retention(wal, [backup_at(bid("b1"), 6)], dry_run=False, max_deletes=2, now=FUTURE)
    assert (first.deleted, first.remaining) == (2, 3)
    assert name(1) not in names_in(tmp_path)
    assert name(3) in names_in(tmp_path)
    second = await apply_wal_retention(wal, [backup_at(bid("b1"), 6)], dry_run=False, max_deletes=10, now=FUTURE)
    assert (second.deleted, second.remaining) == (3, 0)


async def test_orphans_go_only_when_old_and_still_without_a_record(tmp_path: Path) -> None:
    wal = await filled(tmp_path, range(5, 7), history=False)
    store = wal.store
    orphan = wal_object_key(SYSTEM_ID, wal._parse(name(2)))
    await store.put_bytes(orphan, b"sealed bytes of a push killed before its record")
    young = await apply_wal_retention(wal, [backup_at(bid("b1"), 5)], dry_run=False)  # now: the orphan is seconds old
    assert young.orphans_deleted == 0
    assert name(2) in names_in(tmp_path)
    old = await apply_wal_retention(wal, [backup_at(bid("b1"), 5)], dry_run=False, now=FUTURE)
    assert old.orphans_deleted == 1
    assert name(2) not in names_in(tmp_path)
    assert {name(5), name(6)} <= names_in(tmp_path)  # archived files are never orphans


@pytest.mark.parametrize("damage", ["record", "history"])
async def test_an_unreadable_record_or_history_deletes_nothing(tmp_path: Path, damage: str) -> None:
    wal = await filled(tmp_path, range(1, 6))
    if damage == "record":
        target = next(tmp_path.rglob(name(4) + ".json"))
        target.write_text("{not json")
    else:
        target = next(tmp_path.rglob("00000002.history"))  # the object: its content no longer verifies
        data = bytearray(target.read_bytes())
        data[-1] ^= 1
        target.write_bytes(bytes(data))
    before = names_in(tmp_path)
    with pytest.raises(WalRetentionError, match="could not be read in full, so nothing was deleted"):
        await apply_wal_retention(wal, [backup_at(bid("b1"), 3)], dry_run=False, now=FUTURE)
    assert names_in(tmp_path) == before


async def test_every_cluster_is_passed_and_an_error_stays_in_its_entry(tmp_path: Path) -> None:
    other = "7714541760408896999"
    await filled(tmp_path / "good", range(1, 5), history=False)
    await filled(tmp_path / "bad", range(1, 5), history=False, system_id=other)
    next((tmp_path / "bad").rglob(name(2) + ".json")).write_text("[]")
    roots = {SYSTEM_ID: tmp_path / "good", other: tmp_path / "bad"}

    def archive_for(system_identifier: str, size: int) -> WalArchive:
        assert size == SIZE
        return archive_of(roots[system_identifier], system_identifier)

    manifests = [backup_at(bid("b1"), 3), backup_at(bid("b0"), 1)]
    span = info(system_identifier=other, wal_segment_size=SIZE)
    manifests.append(physical(bid("b9"), sysid=other).model_copy(update={"physical": span}))
    results: dict[str, dict[str, Any]] = await apply_wal_retention_all(
        manifests, {bid("b1"), bid("b9")}, archive_for, dry_run=False, now=FUTURE
    )
    assert results[SYSTEM_ID]["deleted"] == 2
    assert results[SYSTEM_ID]["kept_backups"] == [bid("b1")]
    assert results[other]["error"] is not None
    assert "nothing was deleted" in results[other]["error"]
    assert name(1) in names_in(tmp_path / "bad")


async def test_a_backup_of_another_cluster_is_refused(tmp_path: Path) -> None:
    wal = await filled(tmp_path, range(1, 3))
    other = physical(bid("ee"), sysid="7714541760408896999")
    with pytest.raises(ValueError, match="not a base backup of cluster"):
        await apply_wal_retention(wal, [other], dry_run=True)


async def test_an_unreadable_manifest_stops_every_clusters_deletes(tmp_path: Path) -> None:
    await filled(tmp_path, range(1, 5), history=False)
    results = await apply_wal_retention_all(
        [backup_at(bid("b1"), 3)], {bid("b1")}, lambda *_: archive(tmp_path), dry_run=False, now=FUTURE,
        unreadable_manifests=["backups/%40cluster-1/x/manifest.json"],
    )  # fmt: skip
    assert "could not be read" in results[SYSTEM_ID]["error"]
    assert name(1) in names_in(tmp_path)
