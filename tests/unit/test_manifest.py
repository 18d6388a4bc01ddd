"""The backup manifest and backup ids (kybdr_agent/backup/manifest.py): ids are sortable and safe, database
names become single safe key components, and manifests round-trip through JSON while refusing tampering."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.manifest import (
    BACKUP_ID_PATTERN,
    BACKUPS_PREFIX,
    DATA_NAME,
    MANIFEST_NAME,
    Encryption,
    InvalidBackupId,
    Manifest,
    PartRun,
    backup_prefix,
    check_backup_id,
    data_key_path,
    database_key,
    manifest_key_path,
    new_backup_id,
)

VALID_ID = "20261124T215226Z-3f9a1c2b"

offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda minutes: timezone(timedelta(minutes=minutes)))
# Aware moments far enough from datetime's limits that converting to UTC cannot overflow.
moments = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(9998, 12, 30),
    timezones=offsets,
)
valid_ids = st.from_regex(BACKUP_ID_PATTERN, fullmatch=True)


# ------------------------------------------------------------------------------------------ backup ids


@given(moments)
@settings(max_examples=200)
def test_new_backup_id_matches_the_pattern(now: datetime) -> None:
    backup_id = new_backup_id(now)
    assert BACKUP_ID_PATTERN.fullmatch(backup_id)
    assert check_backup_id(backup_id) == backup_id
    assert backup_id.startswith(now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ-"))


@given(moments, moments)
@settings(max_examples=200)
def test_new_backup_ids_sort_by_time(a: datetime, b: datetime) -> None:
    first, second = sorted((a, b))
    if first.astimezone(UTC).replace(microsecond=0) == second.astimezone(UTC).replace(microsecond=0):
        return  # same second: the random suffix decides, no order is promised
    assert new_backup_id(first) < new_backup_id(second)


def test_new_backup_id_uses_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert new_backup_id(datetime(2026, 11, 24, 23, 52, 26, tzinfo=plus_two)).startswith("20261124T215226Z-")


def test_new_backup_ids_in_one_second_differ() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert len({new_backup_id(now) for _ in range(50)}) == 50


def test_new_backup_id_for_a_year_below_1000_is_valid() -> None:
    check_backup_id(new_backup_id(datetime(999, 1, 1, tzinfo=UTC)))


@given(valid_ids)
@settings(max_examples=100)
def test_check_backup_id_accepts_the_pattern(backup_id: str) -> None:
    assert check_backup_id(backup_id) == backup_id


@pytest.mark.parametrize(
    "value",
    [
        "",
        "..",
        ".",
        "/",
        "../20261124T215226Z-3f9a1c2b",
        "20261124T215226Z-3f9a1c2b/../../etc",
        "20261124T215226Z-3f9a1c2b/",
        "/20261124T215226Z-3f9a1c2b",
        "20261124T215226Z-3f9a1c2b\n",
        "\n20261124T215226Z-3f9a1c2b",
        " 20261124T215226Z-3f9a1c2b",
        "20261124T215226Z-3F9A1C2B",  # upper-case hex
        "20261124T215226Z-3f9a1c2",  # short suffix
        "20261124T215226Z-3f9a1c2b0",  # long suffix
        "20261124t215226z-3f9a1c2b",
        "2026-11-24T21:52:26Z-3f9a1c2b",
        "20261124T215226Z_3f9a1c2b",
        "２０２６１１２４T215226Z-3f9a1c2b",  # full-width digits
        "20261124T215226Z-3f9a1c2g",
        "20261124T215226Z-3f9a1c2b\x00",
        "backups/db/20261124T215226Z-3f9a1c2b",
    ],
)
def test_check_backup_id_rejects_junk(value: str) -> None:
    with pytest.raises(InvalidBackupId):
        check_backup_id(value)


_ID_SHAPE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}", flags=re.ASCII)


@given(st.one_of(st.text(max_size=40), valid_ids.map(lambda v: v[:5] + "/" + v[5:]), valid_ids.map(lambda v: v + "x")))
@settings(max_examples=300)
def test_check_backup_id_on_arbitrary_text(value: str) -> None:
    if _ID_SHAPE.fullmatch(value):
        assert check_backup_id(value) == value
    else:
        with pytest.raises(InvalidBackupId):
            check_backup_id(value)


@given(valid_ids)
def test_accepted_ids_are_inert_in_paths(backup_id: str) -> None:
    assert not set(backup_id) & set("/\\. \t\r\n\x00%")


def test_invalid_backup_id_is_a_value_error_naming_the_form() -> None:
    with pytest.raises(ValueError, match="20261124T215226Z-3f9a1c2b"):
        check_backup_id("nope")


# ---------------------------------------------------------------------------------------- database keys


@given(st.text(min_size=1))
@settings(max_examples=400)
def test_database_key_is_one_safe_component_and_round_trips(name: str) -> None:
    key = database_key(name)
    assert key
    assert "/" not in key
    assert key not in (".", "..")
    assert "." not in key
    assert key.split("/") == [key]
    assert re.fullmatch(r"[A-Za-z0-9_~%-]+", key), key
    assert unquote(key) == name


@given(st.text(min_size=1), st.text(min_size=1))
@settings(max_examples=200)
def test_database_key_is_injective(a: str, b: str) -> None:
    if a != b:
        assert database_key(a) != database_key(b)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("app", "app"),
        ("my_db-2", "my_db-2"),
        (".", "%2E"),
        ("..", "%2E%2E"),
        ("a/b", "a%2Fb"),
        ("../etc", "%2E%2E%2Fetc"),
        ("100%", "100%25"),
        ("db name", "db%20name"),
        ("bäckup", "b%C3%A4ckup"),
        ("a\\b", "a%5Cb"),
    ],
)
def test_database_key_examples(name: str, key: str) -> None:
    assert database_key(name) == key
    assert unquote(key) == name


def test_database_key_rejects_empty_name() -> None:
    with pytest.raises(ValueError, match="empty"):
        database_key("")


@given(st.text(min_size=1), valid_ids)
@settings(max_examples=100)
def test_object_paths_have_fixed_shape(database: str, backup_id: str) -> None:
    prefix = backup_prefix(database, backup_id)
    assert prefix.split("/") == [BACKUPS_PREFIX, database_key(database), backup_id]
    assert data_key_path(database, backup_id) == f"{prefix}/{DATA_NAME}"
    assert manifest_key_path(database, backup_id) == f"{prefix}/{MANIFEST_NAME}"


@pytest.mark.parametrize("fn", [backup_prefix, data_key_path, manifest_key_path])
def test_object_paths_reject_bad_ids(fn: Any) -> None:
    with pytest.raises(InvalidBackupId):
        fn("app", "../../x")


# --------------------------------------------------------------------------------------------- manifest


def manifest_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": VALID_ID,
        "database": "app",
        "agent_version": "0.1.0",
        "server_version": "17.2",
        "pg_dump_version": "17.2",
        "started_at": datetime(2026, 11, 24, 21, 52, 26, 123456, tzinfo=UTC),
        "finished_at": datetime(2026, 11, 24, 21, 55, 1, tzinfo=UTC),
        "duration_seconds": 154.876543,
        "dump_bytes": 10_000_000,
        "compressed_bytes": 2_500_000,
        "stored_bytes": 2_500_512,
        "sha256": "a" * 64,
        "dump_sha256": "b" * 64,
        "compression": "zstd",
        "compression_level": 3,
        "frame_size": 1 << 20,
        "frames": 3,
        "stream_header": "00" * 39,
        "encryption": Encryption(cipher="aes-256-gcm", key_id="11" * 16, wrap="aes-256-gcm", wrapped_data_key="QUJD"),
        "storage": "s3",
        "object_key": f"backups/app/{VALID_ID}/data",
        "parts": [PartRun(size=16 << 20, count=2), PartRun(size=32 << 20, count=1)],
    }
    fields.update(overrides)
    # The manifest schema is still moving; keep only the fields this version declares.
    return {name: value for name, value in fields.items() if name in Manifest.model_fields}


def test_manifest_json_round_trip() -> None:
    manifest = Manifest(**manifest_fields())
    raw = manifest.to_json()
    assert raw.endswith(b"\n")
    assert Manifest.from_json(raw) == manifest
    assert manifest.part_count == 3


@given(
    database=st.text(min_size=1, max_size=30),
    labels=st.lists(st.text(max_size=10), max_size=4),
    description=st.none() | st.text(max_size=40),
    row_counts=st.dictionaries(st.text(max_size=10), st.integers(0, 2**62), max_size=4),
    duration=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    started=moments,
    parts=st.lists(st.builds(PartRun, size=st.integers(1, 2**40), count=st.integers(1, 10_000)), max_size=4),
    cipher=st.sampled_from(["aes-256-gcm", "none"]),
)
@settings(max_examples=100, deadline=None)
def test_manifest_json_round_trip_property(
    database: str,
    labels: list[str],
    description: str | None,
    row_counts: dict[str, int],
    duration: float,
    started: datetime,
    parts: list[PartRun],
    cipher: str,
) -> None:
    manifest = Manifest(
        **manifest_fields(
            database=database,
            labels=labels,
            description=description,
            row_counts=row_counts,
            duration_seconds=duration,
            started_at=started,
            finished_at=started + timedelta(seconds=duration),
            parts=parts,
            encryption=Encryption(cipher=cipher),  # type: ignore[arg-type]
        )
    )
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.started_at == started
    assert again.part_count == sum(p.count for p in parts)


def _raw(**changes: Any) -> bytes:
    doc = json.loads(Manifest(**manifest_fields()).to_json())
    for dotted, value in changes.items():
        target = doc
        *path, last = dotted.split("__")
        for step in path:
            target = target[step]
        target[last] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"unexpected": 1},
        {"encryption__extra": "x"},
        {"status": "partial"},
        {"compression": "lz4"},
        {"storage": "ftp"},
        {"dump_bytes": "lots"},
        {"encryption__cipher": "rot13"},
    ],
)
def test_from_json_rejects_bad_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="manifest is not valid"):
        Manifest.from_json(_raw(**changes))


def test_from_json_rejects_extra_field_in_a_part_run() -> None:
    doc = json.loads(_raw())
    doc["parts"][0]["etag"] = "x"
    with pytest.raises(ValueError, match="manifest is not valid"):
        Manifest.from_json(json.dumps(doc).encode())


def test_from_json_rejects_missing_field() -> None:
    doc = json.loads(_raw())
    del doc["sha256"]
    with pytest.raises(ValueError, match="manifest is not valid"):
        Manifest.from_json(json.dumps(doc).encode())


@pytest.mark.parametrize("bad_id", ["../../etc", "", VALID_ID + "/x", "20261124T215226Z-3F9A1C2B"])
def test_from_json_rejects_bad_ids(bad_id: str) -> None:
    with pytest.raises(InvalidBackupId):
        Manifest.from_json(_raw(id=bad_id))


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe"])
def test_from_json_rejects_non_json(raw: bytes) -> None:
    with pytest.raises(ValueError, match="manifest is not valid"):
        Manifest.from_json(raw)


def test_manifest_is_frozen() -> None:
    manifest = Manifest(**manifest_fields())
    with pytest.raises(ValueError, match="frozen"):
        manifest.id = "x"  # type: ignore[misc]
