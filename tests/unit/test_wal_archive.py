"""The WAL archive (``wal/archive.py``) against a real folder store: push is idempotent and never overwrites a
different file, a partial is only replaced by a copy that extends it, fetch verifies every layer and never
leaves a half-written file, and wrapped data keys are bound to their file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.keys import KeyRing, MasterKey
from kybdr_agent.backup.streamfmt import Compression
from kybdr_agent.errors import KeyUnavailable
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.wal.archive import WalArchive, WalConflict, WalIntegrityError, WalRejected
from kybdr_agent.wal.names import Segment
from kybdr_agent.wal.records import CommitTimes, WalRecord, wal_record_key
from kybdr_agent.wal.sealing import extends, record_binding

SIZE = 1 << 20
SYSTEM_ID = "7714541760408896752"
pytestmark = pytest.mark.anyio


def segment_bytes(segno: int, *, timeline: int = 1, fill: bytes = b"", system_id: str = SYSTEM_ID) -> bytes:
    """A segment whose first page is a valid long header for its name; ``fill`` follows it, then zeros."""
    head = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, timeline, segno * SIZE, 0, int(system_id), SIZE, 8192)
    body = head + fill
    return body + bytes(SIZE - len(body))


def archive(root: Path, *, keyring: KeyRing | None = None, compression: Compression = Compression.ZSTD) -> WalArchive:
    return WalArchive(
        LocalStore(root),
        system_identifier=SYSTEM_ID,
        segment_size=SIZE,
        keyring=keyring,
        compression=compression,
        compression_level=None,
        frame_size=64 << 10,
    )


def ring() -> KeyRing:
    return KeyRing(MasterKey(bytes(range(32))))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_round_trip_encrypted(tmp_path: Path) -> None:
    wal = archive(tmp_path / "repo", keyring=ring())
    data = segment_bytes(3, fill=b"commit" * 5000)
    commits = CommitTimes(count=0)
    record = await wal.push("000000010000000000000003", data, source="stream", commits=commits)
    assert record.encryption.cipher == "aes-256-gcm"
    assert record.size == SIZE
    assert record.frames >= 1
    assert record.stored_bytes < SIZE // 4
    assert record_binding(record) == record.object_key
    assert await wal.stat("000000010000000000000003", 1) == record
    assert await wal.records() == [record]
    dest = tmp_path / "out"
    await wal.fetch(record, dest)
    assert dest.read_bytes() == data
    assert dest.stat().st_mode & 0o777 == 0o600


async def test_push_is_idempotent_and_never_overwrites(tmp_path: Path) -> None:
    wal = archive(tmp_path / "repo")
    data = segment_bytes(3, fill=b"a" * 100)
    first = await wal.push("000000010000000000000003", data, source="archive_command")
    assert await wal.push("000000010000000000000003", data, source="archive_command") == first
    with pytest.raises(WalConflict, match="already archived"):
        await wal.push("000000010000000000000003", segment_bytes(3, fill=b"b" * 100), source="archive_command")
    assert await wal.stat("000000010000000000000003", 1) == first
    # history files are never replaced either
    history = b"1\t0/3000000\tno recovery target specified\n"
    await wal.push("00000002.history", history, source="archive_command")
    with pytest.raises(WalConflict):
        await wal.push("00000002.history", history + b"x", source="archive_command")


async def test_a_partial_is_replaced_only_by_a_copy_that_extends_it(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    wal = archive(root)
    name = "000000010000000000000004.partial"
    early = segment_bytes(4, fill=b"x" * 1000)
    later = segment_bytes(4, fill=b"x" * 5000)
    one = await wal.push(name, early, source="stream")
    assert one.partial
    assert one.name == "000000010000000000000004"
    two = await wal.push(name, later, source="stream")
    assert two.plaintext_sha256 != one.plaintext_sha256
    with pytest.raises(WalConflict, match="does not extend"):
        await wal.push(name, segment_bytes(4, fill=b"y" * 6000), source="stream")
    # a fresh process (no memory of what it pushed) compares with the archived copy
    fresh = archive(root)
    with pytest.raises(WalConflict):
        await fresh.push(name, segment_bytes(4, fill=b"y" * 6000), source="stream")
    three = await fresh.push(name, segment_bytes(4, fill=b"x" * 9000), source="stream")
    dest = tmp_path / "p"
    await fresh.fetch(three, dest)
    assert dest.read_bytes() == segment_bytes(4, fill=b"x" * 9000)


async def test_files_not_matching_their_name_are_rejected(tmp_path: Path) -> None:
    wal = archive(tmp_path / "repo")
    with pytest.raises(WalRejected, match="first page is at"):
        await wal.push("000000010000000000000005", segment_bytes(3), source="stream")
    with pytest.raises(WalRejected, match="system identifier"):
        await wal.push("000000010000000000000003", segment_bytes(3, system_id="42"), source="stream")
    with pytest.raises(WalRejected, match="bytes"):
        await wal.push("000000010000000000000003", segment_bytes(3)[:-1], source="stream")
    with pytest.raises(WalRejected, match="not a WAL file name"):
        await wal.push("../../etc/passwd", b"x", source="stream")
    with pytest.raises(WalRejected, match="timeline 2"):
        await wal.stat("000000010000000000000003", 2)
    assert await wal.records() == []


async def test_corruption_is_detected_and_dest_untouched(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    wal = archive(root, keyring=ring())
    record = await wal.push("000000010000000000000003", segment_bytes(3, fill=b"q" * 100), source="stream")
    path = root / record.object_key
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    dest = tmp_path / "out"
    with pytest.raises(WalIntegrityError, match="000000010000000000000003"):
        await wal.fetch(record, dest)
    assert not dest.exists()
    assert list(tmp_path.glob(".out*")) == []
    path.unlink()
    with pytest.raises(WalIntegrityError, match="its object does not"):
        await wal.fetch(record, dest)


async def test_a_record_of_another_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    wal = archive(root)
    three = await wal.push("000000010000000000000003", segment_bytes(3), source="stream")
    four = await wal.push("000000010000000000000004", segment_bytes(4), source="stream")
    # a record copied under another file's key
    target = root / wal_record_key(SYSTEM_ID, Segment(1, 4, SIZE))
    target.write_bytes(three.to_json())
    with pytest.raises(WalIntegrityError, match="describes 000000010000000000000003"):
        await wal.records()
    # an object swapped for another file's: the hashes no longer agree
    target.write_bytes(four.to_json())
    (root / four.object_key).write_bytes((root / three.object_key).read_bytes())
    with pytest.raises(WalIntegrityError, match="000000010000000000000004 does not verify"):
        await wal.fetch(four, tmp_path / "x")


async def test_a_wrapped_key_moved_to_another_file_does_not_open(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    wal = archive(root, keyring=ring())
    three = await wal.push("000000010000000000000003", segment_bytes(3), source="stream")
    four = await wal.push("000000010000000000000004", segment_bytes(4), source="stream")
    moved = WalRecord.model_validate({**json.loads(four.to_json()), "encryption": three.encryption.model_dump()})
    with pytest.raises(KeyUnavailable, match="does not unwrap"):
        await archive(root, keyring=ring()).fetch(moved, tmp_path / "x")
    with pytest.raises(KeyUnavailable, match="encrypted"):
        await archive(root).fetch(three, tmp_path / "x")


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(old=st.binary(max_size=64), tail=st.binary(max_size=64), zeros=st.integers(0, 8))
def test_extends(old: bytes, tail: bytes, zeros: int) -> None:
    padded = old + bytes(zeros)
    assert extends(padded, old + tail)  # whatever follows the kept content
    kept = old.rstrip(b"\0")
    if kept:
        changed = bytes([kept[0] ^ 1]) + kept[1:]
        assert not extends(padded, changed + tail)
