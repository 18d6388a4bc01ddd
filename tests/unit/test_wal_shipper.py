"""The shipper (``wal/shipper.py``) on a real folder store and a real spool directory: oldest first, deleted only
once archived, retried (never dropped) while the store fails, a refused file set aside without blocking the
rest, and pg_receivewal's ``.partial`` shipped on its cadence and never deleted."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kybdr_agent.backup.streamfmt import Compression
from kybdr_agent.errors import StoreError
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.wal.archive import WalArchive
from kybdr_agent.wal.names import PartialSegment, Segment, TimelineHistoryFile, parse_wal_file_name
from kybdr_agent.wal.records import CommitTimes
from kybdr_agent.wal.shipper import REJECTED, Shipper, scan_spool, wal_order
from kybdr_agent.wal.status import WalSpoolChecked
from tests.unit.test_wal_archive import SIZE, SYSTEM_ID, segment_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FlakyStore(LocalStore):
    """A folder store whose first ``failures`` object writes fail, as an unreachable repository's would."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures
        self.keys: list[str] = []

    async def put_bytes(self, key: str, data: bytes) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("the repository is unreachable (test)")
        self.keys.append(key)
        await super().put_bytes(key, data)


def make_shipper(
    store: LocalStore, spool: Path, *, source: Any = "archive_command", partial_age: float = 60.0, **kw: Any
) -> Shipper:
    archive = WalArchive(
        store,
        system_identifier=SYSTEM_ID,
        segment_size=SIZE,
        keyring=None,
        compression=Compression.ZSTD,
        compression_level=1,
        frame_size=64 << 10,
    )
    return Shipper(
        spool,
        archive,
        source=source,
        upload_concurrency=2,
        max_partial_age=partial_age,
        max_spool_bytes=4 * SIZE,
        clock=lambda: datetime.now(UTC),
        **kw,
    )


async def until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


async def test_ships_oldest_first_and_deletes_only_when_archived(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    for segno in (5, 3, 4):
        (spool / Segment(1, segno, SIZE).name).write_bytes(segment_bytes(segno, fill=bytes([segno]) * 50))
    (spool / "00000002.history").write_bytes(b"1\t0/5000000\tno recovery target specified\n")
    (spool / "not-wal.txt").write_bytes(b"left alone")
    store = FlakyStore(tmp_path / "repo", failures=0)
    reports: list[WalSpoolChecked] = []
    shipper = make_shipper(store, spool, on_report=reports.append)
    async with anyio.create_task_group() as tg:
        await tg.start(shipper.run)
        await until(lambda: shipper.state.files_shipped == 4)
        tg.cancel_scope.cancel()
    objects = [key.rsplit("/", 1)[1] for key in store.keys if not key.endswith(".json")]
    # History first, then oldest first; two uploads run at once, so the history file and segment 3 start
    # together (either may finish first) and 5 starts only after one of them is stored.
    assert objects.index("00000002.history") < 2
    assert objects.index("000000010000000000000003") < objects.index("000000010000000000000005")
    assert sorted(p.name for p in spool.iterdir()) == ["not-wal.txt"]
    assert len(await shipper.archive.records()) == 4
    assert reports
    assert reports[0].files == 4


async def test_a_failing_store_is_retried_and_nothing_is_lost(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    name = Segment(1, 7, SIZE).name
    (spool / name).write_bytes(segment_bytes(7))
    store = FlakyStore(tmp_path / "repo", failures=2)
    shipper = make_shipper(store, spool)
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        await tg.start(shipper.run)
        await until(lambda: shipper.state.last_error is not None)
        assert (spool / name).exists()  # still there while the store fails
        await until(lambda: shipper.state.files_shipped == 1)
        tg.cancel_scope.cancel()
    assert time.monotonic() - started >= 0.5  # the first retry waits BACKOFF_FIRST
    assert not (spool / name).exists()
    assert await shipper.archive.stat(name, 1) is not None


async def test_a_refused_file_is_set_aside_and_the_rest_ships(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / Segment(1, 8, SIZE).name).write_bytes(segment_bytes(3))  # the content of another segment
    (spool / Segment(1, 9, SIZE).name).write_bytes(segment_bytes(9))
    shipper = make_shipper(LocalStore(tmp_path / "repo"), spool)
    async with anyio.create_task_group() as tg:
        await tg.start(shipper.run)
        await until(lambda: shipper.state.files_shipped == 1 and shipper.state.rejected == 1)
        tg.cancel_scope.cancel()
    kept = list((spool / REJECTED).iterdir())
    assert [p.name.split(".")[0] for p in kept] == [Segment(1, 8, SIZE).name]
    assert "first page is at" in (shipper.state.last_error or "")


async def test_a_live_partial_ships_on_its_cadence_and_stays(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    partial = spool / PartialSegment(Segment(1, 10, SIZE)).name
    partial.write_bytes(segment_bytes(10, fill=b"a" * 100))
    commits = CommitTimes(count=1, first=datetime(2026, 1, 1, tzinfo=UTC), last=datetime(2026, 1, 1, tzinfo=UTC))
    seen: list[str] = []

    async def reader(name: str, data: bytes) -> CommitTimes:
        seen.append(name)
        return commits

    shipper = make_shipper(LocalStore(tmp_path / "repo"), spool, source="stream", partial_age=0.3, commit_reader=reader)
    async with anyio.create_task_group() as tg:
        await tg.start(shipper.run)
        await until(lambda: shipper.state.partials_shipped == 1)
        await anyio.sleep(0.8)  # unchanged: not shipped again
        assert shipper.state.partials_shipped == 1
        partial.write_bytes(segment_bytes(10, fill=b"a" * 200))
        await until(lambda: shipper.state.partials_shipped == 2)
        tg.cancel_scope.cancel()
    assert partial.exists()
    record = await shipper.archive.stat(partial.name, 1)
    assert record is not None
    assert record.partial
    assert record.commits == commits
    assert record.source == "stream"
    assert seen == [partial.name, partial.name]


@given(st.lists(st.sampled_from(["history", "segment", "partial", "backup"]), min_size=1, max_size=30), st.data())
def test_wal_order_puts_histories_first_then_wal_position(kinds: list[str], data: st.DataObject) -> None:
    names = []
    for kind in kinds:
        segno = data.draw(st.integers(0, 50))
        timeline = data.draw(st.integers(1, 4))
        segment = Segment(timeline, segno, SIZE)
        names.append(
            {
                "history": TimelineHistoryFile(timeline).name,
                "segment": segment.name,
                "partial": segment.partial_name,
                "backup": f"{segment.name}.00000028.backup",
            }[kind]
        )
    ordered = sorted((parse_wal_file_name(n, SIZE) for n in names), key=wal_order)
    kinds_in_order = [isinstance(f, TimelineHistoryFile) for f in ordered]
    assert kinds_in_order == sorted(kinds_in_order, reverse=True)  # every history file before any segment
    positions = [f.segno if isinstance(f, Segment) else getattr(f, "segment", None) for f in ordered]
    segnos = [p if isinstance(p, int) else p.segno for p in positions if p is not None]
    assert segnos == sorted(segnos)


def test_scan_ignores_temporaries_and_counts_incoming(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / ".incoming").mkdir(parents=True)
    (spool / ".incoming" / "000000010000000000000003.tmp").write_bytes(b"x" * 10)
    (spool / "000000010000000000000003").write_bytes(b"y" * 20)
    (spool / ".hidden").write_bytes(b"z")
    scan = scan_spool(spool, SIZE)
    assert [f.name for f in scan.files] == ["000000010000000000000003"]
    assert scan.total_bytes == 31
    assert scan.unknown == []
