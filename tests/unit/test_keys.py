"""Master keys, key files and data-key wrapping (kybdr_agent/backup/keys.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.keys import (
    MASTER_KEY_SIZE,
    KeyMaterialError,
    KeyRing,
    MasterKey,
    generate_master_key_file,
    load_master_key,
    new_data_key,
    parse_key_material,
)
from kybdr_agent.backup.manifest import BACKUP_ID_PATTERN
from kybdr_agent.backup.streamfmt import DATA_KEY_SIZE, KEY_ID_SIZE

BACKUP_ID = "20261124T215226Z-3f9a1c2b"
OTHER_ID = "20261124T215226Z-3f9a1c2c"
MATERIAL = bytes(range(32))

keys32 = st.binary(min_size=32, max_size=32)
backup_ids = st.from_regex(BACKUP_ID_PATTERN, fullmatch=True)
ASCII_WHITESPACE = b" \t\n\r\x0b\x0c"


# -------------------------------------------------------------------------------------- wrap / unwrap


@given(keys32, keys32, backup_ids)
@settings(max_examples=100, deadline=None)
def test_wrap_unwrap_round_trip(master: bytes, data_key: bytes, backup_id: str) -> None:
    key = MasterKey(master)
    wrapped = key.wrap(data_key, backup_id)
    assert base64.b64decode(wrapped, validate=True)
    assert data_key.hex() not in wrapped
    assert key.unwrap(wrapped, backup_id) == data_key


def test_wrap_is_randomised() -> None:
    key = MasterKey(MATERIAL)
    data_key = new_data_key()
    assert key.wrap(data_key, BACKUP_ID) != key.wrap(data_key, BACKUP_ID)


@given(keys32, keys32, keys32)
@settings(max_examples=50, deadline=None)
def test_unwrap_with_wrong_master_key_fails(master: bytes, other: bytes, data_key: bytes) -> None:
    assume(master != other)
    wrapped = MasterKey(master).wrap(data_key, BACKUP_ID)
    with pytest.raises(KeyMaterialError, match="does not unwrap"):
        MasterKey(other).unwrap(wrapped, BACKUP_ID)


@given(backup_ids, backup_ids)
@settings(max_examples=50, deadline=None)
def test_unwrap_with_wrong_backup_id_fails(backup_id: str, other_id: str) -> None:
    assume(backup_id != other_id)
    key = MasterKey(MATERIAL)
    wrapped = key.wrap(new_data_key(), backup_id)
    with pytest.raises(KeyMaterialError):
        key.unwrap(wrapped, other_id)


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_unwrap_detects_any_bit_flip(data: st.DataObject) -> None:
    key = MasterKey(MATERIAL)
    raw = bytearray(base64.b64decode(key.wrap(new_data_key(), BACKUP_ID)))
    index = data.draw(st.integers(0, len(raw) - 1), label="byte")
    raw[index] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    with pytest.raises(KeyMaterialError):
        key.unwrap(base64.b64encode(raw).decode(), BACKUP_ID)


@pytest.mark.parametrize("wrapped", ["not base64!", "QUJD\n", "QUJ", "Q==="])
def test_unwrap_rejects_bad_base64(wrapped: str) -> None:
    with pytest.raises(KeyMaterialError, match="base64"):
        MasterKey(MATERIAL).unwrap(wrapped, BACKUP_ID)


@pytest.mark.parametrize("raw_length", [12, 20, 27])
def test_unwrap_rejects_a_wrapped_key_too_short_for_a_tag(raw_length: int) -> None:
    wrapped = base64.b64encode(bytes(raw_length)).decode()
    with pytest.raises(KeyMaterialError):
        MasterKey(MATERIAL).unwrap(wrapped, BACKUP_ID)


@pytest.mark.parametrize("wrapped", ["", "AAAA", base64.b64encode(bytes(7)).decode()])
def test_unwrap_rejects_a_tiny_wrapped_key(wrapped: str) -> None:
    with pytest.raises(KeyMaterialError):
        MasterKey(MATERIAL).unwrap(wrapped, BACKUP_ID)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_unwrap_rejects_a_data_key_of_the_wrong_length(length: int) -> None:
    key = MasterKey(MATERIAL)
    wrapped = key.wrap(b"k" * length, BACKUP_ID)
    with pytest.raises(KeyMaterialError, match="wrong length"):
        key.unwrap(wrapped, BACKUP_ID)


# ------------------------------------------------------------------------------------------- master key


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_master_key_must_be_32_bytes(length: int) -> None:
    with pytest.raises(KeyMaterialError, match="32 bytes"):
        MasterKey(b"k" * length)


def test_master_key_repr_hides_material() -> None:
    key = MasterKey(b"\xab" * 32)
    assert "ab" * 4 not in repr(key)
    assert "171" not in repr(key)
    assert "material" not in repr(key)


@given(keys32)
def test_key_id_is_derived_from_the_key(material: bytes) -> None:
    key = MasterKey(material)
    assert len(key.key_id) == KEY_ID_SIZE
    assert key.key_id == hmac.new(material, b"kybdr key id v1", hashlib.sha256).digest()[:KEY_ID_SIZE]
    assert key.key_id == MasterKey(material).key_id


def test_different_keys_have_different_ids() -> None:
    assert MasterKey(MATERIAL).key_id != MasterKey(bytes(32)).key_id


def test_new_data_keys_are_fresh_and_sized() -> None:
    keys = {new_data_key() for _ in range(20)}
    assert len(keys) == 20
    assert all(len(k) == DATA_KEY_SIZE for k in keys)


# ------------------------------------------------------------------------------------ parse_key_material


@given(keys32)
def test_parse_raw_32_bytes(material: bytes) -> None:
    assert parse_key_material(material) == material


@given(keys32, st.sampled_from([b"", b"\n", b"\r\n", b"  \n"]), st.booleans())
def test_parse_hex(material: bytes, trailer: bytes, upper: bool) -> None:
    text = material.hex().upper() if upper else material.hex()
    assert parse_key_material(text.encode() + trailer) == material
    assert parse_key_material(b"\n " + text.encode() + trailer) == material


@given(keys32, st.sampled_from([b"", b"\n", b"\r\n", b" \t\n"]), st.booleans())
def test_parse_base64(material: bytes, trailer: bytes, leading: bool) -> None:
    text = base64.b64encode(material)
    assert parse_key_material((b"  " if leading else b"") + text + trailer) == material


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\n",
        b"k" * 31,
        b"k" * 33,
        b"ab" * 31,  # 62 hex digits: 31 bytes
        b"ab" * 33,  # 66 hex digits
        b"zz" * 32,  # 64 characters, not hex
        "é".encode() * 32,  # 64 bytes, not ASCII
        base64.b64encode(bytes(31)),
        base64.b64encode(bytes(33)),
        base64.b64encode(bytes(range(48))),  # 64 base64 characters that are not hex
        b"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n"
        b"-----END PRIVATE KEY-----\n",
    ],
)
def test_parse_rejects_other_material(raw: bytes) -> None:
    with pytest.raises(KeyMaterialError, match="32 bytes"):
        parse_key_material(raw)


@given(st.binary(max_size=100))
@settings(max_examples=300)
def test_parse_gives_32_bytes_or_key_material_error(raw: bytes) -> None:
    # Internal ASCII whitespace is covered by test_parse_rejects_hex_with_internal_whitespace.
    assume(not any(c in raw.strip() for c in ASCII_WHITESPACE))
    try:
        material = parse_key_material(raw)
    except KeyMaterialError:
        return
    assert len(material) == MASTER_KEY_SIZE


def test_parse_rejects_hex_with_internal_whitespace() -> None:
    raw = b"00" * 30 + b"  " + b"00"
    try:
        material = parse_key_material(raw)
    except KeyMaterialError:
        return
    assert len(material) == MASTER_KEY_SIZE


def test_parse_error_does_not_echo_the_material() -> None:
    raw = b"my-secret-passphrase-not-a-key"
    with pytest.raises(KeyMaterialError) as info:
        parse_key_material(raw)
    assert b"my-secret" not in str(info.value).encode()
    assert str(len(raw)) in str(info.value)


# -------------------------------------------------------------------------------------------- key files


def write_key(path: Path, content: bytes, mode: int) -> Path:
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440, 0o700])
@pytest.mark.parametrize(
    "encode", [lambda m: m, lambda m: m.hex().encode() + b"\n", lambda m: base64.b64encode(m) + b"\n"]
)
def test_load_master_key_accepts_private_files(tmp_path: Path, mode: int, encode: Callable[[bytes], bytes]) -> None:
    path = write_key(tmp_path / "master.key", encode(MATERIAL), mode)
    assert load_master_key(path) == MasterKey(MATERIAL)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o620, 0o610, 0o601, 0o602, 0o666, 0o777, 0o650])
def test_load_master_key_refuses_files_others_can_reach(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path / "master.key", MATERIAL.hex().encode(), mode)
    with pytest.raises(KeyMaterialError, match="chmod 600") as info:
        load_master_key(path)
    assert f"{mode:04o}" in str(info.value)
    assert MATERIAL.hex() not in str(info.value)


def test_load_master_key_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KeyMaterialError, match="cannot read key file") as info:
        load_master_key(path)
    assert str(path) in str(info.value)


def test_load_master_key_bad_content(tmp_path: Path) -> None:
    path = write_key(tmp_path / "master.key", b"too short\n", 0o600)
    with pytest.raises(KeyMaterialError, match="32 bytes"):
        load_master_key(path)


def test_generate_master_key_file(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    key = generate_master_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert path.read_text().strip() == key.material.hex()
    assert load_master_key(path) == key


def test_generate_master_key_file_never_overwrites(tmp_path: Path) -> None:
    path = write_key(tmp_path / "existing.key", MATERIAL.hex().encode(), 0o600)
    with pytest.raises(FileExistsError):
        generate_master_key_file(path)
    assert load_master_key(path) == MasterKey(MATERIAL)


# ---------------------------------------------------------------------------------------------- key ring


def test_key_ring_finds_current_and_older_keys() -> None:
    current, old1, old2 = MasterKey(MATERIAL), MasterKey(bytes(32)), MasterKey(b"\xff" * 32)
    ring = KeyRing(current, (old1, old2))
    assert ring.find(current.key_id) is current
    assert ring.find(old1.key_id) is old1
    assert ring.find(old2.key_id) is old2


def test_key_ring_unknown_id() -> None:
    ring = KeyRing(MasterKey(MATERIAL))
    unknown = MasterKey(bytes(32)).key_id
    with pytest.raises(KeyMaterialError, match="old_key_files") as info:
        ring.find(unknown)
    assert unknown.hex() in str(info.value)


@pytest.mark.parametrize("bad", [b"", b"\x00" * 15, b"\x00" * 17])
def test_key_ring_rejects_malformed_ids(bad: bytes) -> None:
    with pytest.raises(KeyMaterialError):
        KeyRing(MasterKey(MATERIAL)).find(bad)


def test_rotation_keeps_old_backups_openable() -> None:
    old, new = MasterKey(MATERIAL), MasterKey(bytes(32))
    data_key = new_data_key()
    wrapped = old.wrap(data_key, BACKUP_ID)
    ring = KeyRing(new, (old,))
    assert ring.find(old.key_id).unwrap(wrapped, BACKUP_ID) == data_key
    with pytest.raises(KeyMaterialError):
        ring.current.unwrap(wrapped, BACKUP_ID)
