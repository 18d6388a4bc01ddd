"""The per-file record of the WAL archive and its keys (``wal/records.py``): round trips, and every way a record
can fail to hold together is refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.manifest import Encryption
from kybdr_agent.backup.streamfmt import HEADER_SIZE, TAG_SIZE, Cipher, Compression, StreamHeader
from kybdr_agent.wal.names import (
    BackupHistoryFile,
    PartialSegment,
    Segment,
    TimelineHistoryFile,
    WalError,
    WalFile,
)
from kybdr_agent.wal.records import (
    CommitTimes,
    WalRecord,
    WalRecordError,
    parse_wal_key,
    wal_object_key,
    wal_record_key,
)
from kybdr_agent.wal.window import ArchivedSegment, CommitSpan

SIZE = 16 << 20
SYSTEM_ID = "7714541760408896752"  # pg_controldata of the cluster the fixed examples come from
KEY_ID = bytes(range(16))
ARCHIVED_AT = datetime(2026, 12, 2, 3, 22, 12, tzinfo=UTC)


def header(cipher: Cipher = Cipher.AES_256_GCM) -> str:
    key_id = KEY_ID if cipher == Cipher.AES_256_GCM else bytes(16)
    return StreamHeader(Compression.ZSTD, cipher, 1 << 20, key_id, b"\x07" * 7).encode().hex()


SEGMENT = Segment(1, 3, SIZE)


def fields(file: WalFile = SEGMENT, **overrides: Any) -> dict[str, Any]:
    partial = isinstance(file, PartialSegment)
    size = {Segment: SIZE, PartialSegment: SIZE, TimelineHistoryFile: 35, BackupHistoryFile: 338}[type(file)]
    values: dict[str, Any] = {
        "system_identifier": SYSTEM_ID,
        "name": file.name.removesuffix(".partial"),
        "partial": partial,
        "timeline": file.timeline,
        "wal_segment_size": SIZE,
        "size": size,
        "plaintext_sha256": "a" * 64,
        "stored_bytes": HEADER_SIZE + 2 * TAG_SIZE + 1_500_000,
        "sha256": "b" * 64,
        "frames": 2,
        "stream_header": header(),
        "encryption": Encryption(cipher="aes-256-gcm", key_id=KEY_ID.hex(), wrap="local", wrapped_data_key="d2s="),
        "object_key": wal_object_key(SYSTEM_ID, file),
        "source": "stream",
        "archived_at": ARCHIVED_AT,
        "agent_version": "0.9.0",
        "commits": None,
    }
    values.update(overrides)
    return values


FILES: list[WalFile] = [
    Segment(1, 3, SIZE),
    PartialSegment(Segment(1, 4, SIZE)),
    TimelineHistoryFile(2),
    BackupHistoryFile(Segment(1, 2, SIZE), 0x28),
]


@pytest.mark.parametrize("file", FILES, ids=lambda f: f.name)
def test_records_of_every_kind_round_trip(file: WalFile) -> None:
    record = WalRecord(**fields(file))
    assert record.wal_file() == file
    assert record.file_name == file.name
    again = WalRecord.from_json(record.to_json())
    assert again == record
    assert json.loads(record.to_json())["object_key"] == f"wal/{SYSTEM_ID}/{file.timeline:08X}/{file.name}"


def test_an_unencrypted_record() -> None:
    record = WalRecord(**fields(stream_header=header(Cipher.NONE), encryption=Encryption(cipher="none")))
    assert WalRecord.from_json(record.to_json()) == record


def test_a_segment_record_feeds_the_window() -> None:
    first, last = datetime(2026, 12, 2, 3, 22, 11, 663756, tzinfo=UTC), datetime(2026, 12, 2, 3, 23, 36, tzinfo=UTC)
    partial = PartialSegment(Segment(1, 4, SIZE))
    record = WalRecord(**fields(partial, commits=CommitTimes(count=9, first=first, last=last)))
    assert record.archived_segment() == ArchivedSegment(Segment(1, 4, SIZE), True, CommitSpan(9, first, last))
    assert WalRecord(**fields(commits=CommitTimes(count=0))).archived_segment().commits == CommitSpan(0)
    with pytest.raises(WalRecordError, match="not a segment"):
        WalRecord(**fields(TimelineHistoryFile(2))).archived_segment()


def _broken(**overrides: Any) -> dict[str, Any]:
    return fields(**overrides)


BROKEN: dict[str, dict[str, Any]] = {
    "unknown field": _broken(extra="x"),
    "format 2": _broken(format=2),
    "lower-case name": _broken(name="00000001000000000000000a", object_key="wal/x"),
    "name of another timeline": _broken(timeline=2),
    "object key of another file": _broken(object_key=wal_object_key(SYSTEM_ID, Segment(1, 4, SIZE))),
    "object key of another cluster": _broken(object_key=wal_object_key("42", Segment(1, 3, SIZE))),
    "short full segment": _broken(size=SIZE - 1),
    "empty partial": _broken(
        name=Segment(1, 4, SIZE).name,
        partial=True,
        size=0,
        object_key=wal_object_key(SYSTEM_ID, PartialSegment(Segment(1, 4, SIZE))),
    ),
    "partial history": _broken(name="00000002.history", partial=True, timeline=2, size=35, object_key="wal/x"),
    "huge history": fields(TimelineHistoryFile(2), size=(1 << 20) + 1),
    "segment size not a power of two": _broken(wal_segment_size=3 << 20),
    "upper-case sha256": _broken(sha256="B" * 64),
    "short plaintext sha256": _broken(plaintext_sha256="a" * 63),
    "header not hex": _broken(stream_header="zz"),
    "header of another stream format": _broken(stream_header="00" * HEADER_SIZE),
    "header with trailing bytes": _broken(stream_header=header() + "00"),
    "cipher mismatch": _broken(stream_header=header(Cipher.NONE)),
    "key id mismatch": _broken(
        encryption=Encryption(cipher="aes-256-gcm", key_id="ff" * 16, wrap="local", wrapped_data_key="d2s=")
    ),
    "encrypted without a wrapped key": _broken(encryption=Encryption(cipher="aes-256-gcm", key_id=KEY_ID.hex())),
    "unencrypted with a key": _broken(
        stream_header=header(Cipher.NONE), encryption=Encryption(cipher="none", key_id=KEY_ID.hex())
    ),
    "stored bytes too small": _broken(stored_bytes=HEADER_SIZE + TAG_SIZE),
    "stored bytes too large": _broken(stored_bytes=HEADER_SIZE + 2 * TAG_SIZE + 2 * (1 << 20) + 1),
    "no frames": _broken(frames=0),
    "naive archived_at": _broken(archived_at=datetime(2026, 12, 2, 3, 22, 12)),
    "unknown source": _broken(source="rsync"),
    "system identifier with a sign": _broken(system_identifier="+7714541760408896752"),
    "system identifier too large": _broken(system_identifier=str(1 << 64)),
    "commits on a history file": fields(TimelineHistoryFile(2), commits=CommitTimes(count=0)),
    "commit count without times": _broken(commits={"count": 2}),
    "commits ending before they start": _broken(
        commits={"count": 2, "first": "2026-12-02T03:00:00Z", "last": "2026-12-02T02:00:00Z"}
    ),
}


@pytest.mark.parametrize("values", BROKEN.values(), ids=BROKEN.keys())
def test_records_that_do_not_hold_together_are_refused(values: dict[str, Any]) -> None:
    raw = json.dumps(values, default=lambda v: v.isoformat() if isinstance(v, datetime) else v.model_dump()).encode()
    with pytest.raises(WalRecordError, match="WAL record is not valid") as caught:
        WalRecord.from_json(raw)
    assert isinstance(caught.value, WalError)


def test_garbage_is_refused() -> None:
    for raw in (b"", b"[]", b"{", b"null", b"\xff\xfe"):
        with pytest.raises(WalRecordError):
            WalRecord.from_json(raw)


def test_keys() -> None:
    segment = Segment(2, 3, SIZE)
    assert wal_object_key(SYSTEM_ID, segment) == f"wal/{SYSTEM_ID}/00000002/{segment.name}"
    assert wal_record_key(SYSTEM_ID, segment) == f"wal/{SYSTEM_ID}/00000002/{segment.name}.json"
    for file in FILES:
        assert parse_wal_key(wal_object_key(SYSTEM_ID, file), SIZE) == (SYSTEM_ID, file, False)
        assert parse_wal_key(wal_record_key(SYSTEM_ID, file), SIZE) == (SYSTEM_ID, file, True)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "wal",
        f"wal/{SYSTEM_ID}/00000001",
        f"wal/{SYSTEM_ID}/00000001/000000010000000000000003/x",
        f"backups/{SYSTEM_ID}/00000001/000000010000000000000003",
        f"wal/{SYSTEM_ID}/00000002/000000010000000000000003",  # folder of another timeline
        f"wal/{SYSTEM_ID}/2/000000020000000000000003",
        f"wal/{SYSTEM_ID}/00000001/000000010000000000000003.json.json",
        f"wal/{SYSTEM_ID}/00000001/../000000010000000000000003",
        f"wal/0{SYSTEM_ID}/00000001/000000010000000000000003",
        "wal/abc/00000001/000000010000000000000003",
        f"/wal/{SYSTEM_ID}/00000001/000000010000000000000003",
    ],
)
def test_hostile_keys_are_refused(key: str) -> None:
    with pytest.raises(WalError):
        parse_wal_key(key, SIZE)


@settings(max_examples=150)
@given(
    timeline=st.integers(1, 0xFFFFFFFF),
    segno=st.integers(0, (1 << 40) - 1),
    kind=st.sampled_from(["segment", "partial", "history", "backup"]),
    offset=st.integers(0, SIZE - 1),
    system_id=st.integers(1, (1 << 64) - 1).map(str),
)
def test_any_valid_record_round_trips(timeline: int, segno: int, kind: str, offset: int, system_id: str) -> None:
    segment = Segment(timeline, segno, SIZE)
    files: dict[str, WalFile] = {
        "segment": segment,
        "partial": PartialSegment(segment),
        "history": TimelineHistoryFile(timeline),
        "backup": BackupHistoryFile(segment, offset),
    }
    file = files[kind]
    record = WalRecord(**fields(file, system_identifier=system_id, object_key=wal_object_key(system_id, file)))
    assert WalRecord.from_json(record.to_json()) == record
    assert parse_wal_key(record.object_key, SIZE) == (system_id, file, False)
