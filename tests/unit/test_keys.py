"""Master keys, key files, data-key wrapping and the key ring (backup/keys.py), KMS key ids and configuration
(backup/kms.py, config), and rotation over a folder repository (backup/rotate.py)."""

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
from kybdr_agent.backup.kms import KMS_WRAP, KmsKey, arn_region, derive_key_id, key_id_part
from kybdr_agent.backup.manifest import BACKUP_ID_PATTERN, Encryption, Manifest, manifest_key_path
from kybdr_agent.backup.rotate import key_status, rotate
from kybdr_agent.backup.streamfmt import DATA_KEY_SIZE, KEY_ID_SIZE
from kybdr_agent.config import AgentSettings, load_settings
from kybdr_agent.errors import ConfigError
from kybdr_agent.secret_files import load_keyring
from kybdr_agent.storage.local import LocalStore
from tests.manifests import sample_manifest

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


# ------------------------------------------------------------------------------- the ring's async operations


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_new_data_key_from_a_key_file_is_recorded_for_the_manifest() -> None:
    key = MasterKey(MATERIAL)
    new = await KeyRing(key).new_data_key(BACKUP_ID)
    assert len(new.plaintext) == DATA_KEY_SIZE
    assert new.key_id == key.key_id
    assert new.encryption == Encryption(
        cipher="aes-256-gcm",
        key_id=key.key_id.hex(),
        wrap="aes-256-gcm",
        wrapped_data_key=new.encryption.wrapped_data_key,
    )
    assert key.unwrap(new.encryption.wrapped_data_key or "", BACKUP_ID) == new.plaintext
    assert new.plaintext.hex() not in repr(new)


@pytest.mark.anyio
async def test_the_ring_opens_by_the_manifests_key_and_rewraps_under_the_current_one() -> None:
    old, new = MasterKey(MATERIAL), MasterKey(bytes(32))
    made = await KeyRing(old).new_data_key(BACKUP_ID)
    ring = KeyRing(new, [old])
    assert not await ring.is_current(made.encryption)
    assert await ring.open(BACKUP_ID, made.encryption) == made.plaintext
    rewrapped = await ring.rewrap(BACKUP_ID, made.encryption)
    assert rewrapped.key_id == new.key_id.hex()
    assert await ring.is_current(rewrapped)
    assert await KeyRing(new).open(BACKUP_ID, rewrapped) == made.plaintext  # the old key is no longer needed
    with pytest.raises(KeyMaterialError):
        await ring.open(OTHER_ID, rewrapped)  # still bound to its backup


@pytest.mark.anyio
async def test_the_ring_says_which_key_a_backup_needs() -> None:
    made = await KeyRing(MasterKey(MATERIAL)).new_data_key(BACKUP_ID)
    ring = KeyRing(MasterKey(bytes(32)))
    with pytest.raises(KeyMaterialError, match="old_key_files"):
        await ring.open(BACKUP_ID, made.encryption)
    by_kms = made.encryption.model_copy(update={"wrap": KMS_WRAP})
    with pytest.raises(KeyMaterialError, match="kms_key_id"):
        await ring.open(BACKUP_ID, by_kms)
    with pytest.raises(KeyMaterialError, match="does not know"):
        await ring.open(BACKUP_ID, made.encryption.model_copy(update={"wrap": "rot13"}))
    with pytest.raises(KeyMaterialError, match="16 bytes"):
        await ring.open(BACKUP_ID, made.encryption.model_copy(update={"key_id": "abcd"}))


# ------------------------------------------------------------------------------------------ KMS key ids

MRK_HEX = "0123456789abcdef0123456789abcdef"
PRIMARY_ARN = f"arn:aws:kms:us-east-1:123456789012:key/mrk-{MRK_HEX}"
REPLICA_ARN = f"arn:aws:kms:us-west-2:123456789012:key/mrk-{MRK_HEX}"
KEY_UUID = "1234abcd-12ab-34cd-56ef-1234567890ab"


def test_a_multi_region_key_and_its_replica_have_one_key_id() -> None:
    primary, replica = KmsKey(PRIMARY_ARN, region=None), KmsKey(REPLICA_ARN, region=None)
    assert primary.known_key_id == replica.known_key_id == bytes.fromhex(MRK_HEX)
    assert derive_key_id(f"mrk-{MRK_HEX}") == bytes.fromhex(MRK_HEX)
    assert (primary.region, replica.region) == ("us-east-1", "us-west-2")  # each asks KMS in its own region


@pytest.mark.parametrize(
    ("ref", "part", "region"),
    [
        (PRIMARY_ARN, f"mrk-{MRK_HEX}", "us-east-1"),
        (f"arn:aws-us-gov:kms:us-gov-west-1:123456789012:key/{KEY_UUID}", KEY_UUID, "us-gov-west-1"),
        ("arn:aws:kms:eu-west-1:123456789012:alias/kybdr-backup", None, "eu-west-1"),
        ("alias/kybdr-backup", None, None),
        (KEY_UUID, KEY_UUID, None),
        (f"mrk-{MRK_HEX}", f"mrk-{MRK_HEX}", None),
    ],
)
def test_kms_references(ref: str, part: str | None, region: str | None) -> None:
    assert key_id_part(ref) == part
    assert arn_region(ref) == region
    known = KmsKey(ref, region="us-east-1").known_key_id
    assert known == (derive_key_id(part) if part else None)  # an alias is resolved on first use


def test_kms_key_ids_are_16_bytes_and_distinct() -> None:
    ids = [
        derive_key_id(KEY_UUID),
        derive_key_id(f"mrk-{MRK_HEX}"),
        derive_key_id("mrk-cc1cea09-7a57-471c-a3e5-0ba45f2ad360"),  # moto's form of a multi-Region key id
        derive_key_id("something-else"),
    ]
    assert all(len(i) == KEY_ID_SIZE for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids[0] == bytes.fromhex(KEY_UUID.replace("-", ""))


# -------------------------------------------------------------------------------- configuring the ring


def _settings(tmp_path: Path, encryption: str, repository: str = "") -> AgentSettings:
    path = tmp_path / "agent.toml"
    path.write_text(f'[repository]\nurl = "file:///srv/repo"\n{repository}\n[encryption]\n{encryption}\n')
    return load_settings(path)


def _config_error(tmp_path: Path, encryption: str, repository: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, encryption, repository)
    return str(info.value)


def test_kms_provider_needs_no_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    old = write_key(tmp_path / "old.key", MATERIAL.hex().encode(), 0o600)
    settings = _settings(tmp_path, f'key_provider = "kms"\nkms_key_id = "{REPLICA_ARN}"\nold_key_files = ["{old}"]')
    assert settings.kms_region() == "us-west-2"
    ring = load_keyring(settings)
    assert ring is not None
    assert isinstance(ring.current, KmsKey)
    assert ring.current.region == "us-west-2"
    assert ring.older == (MasterKey(MATERIAL),)


def test_file_provider_keeps_a_kms_key_as_an_older_key(tmp_path: Path) -> None:
    current = write_key(tmp_path / "new.key", bytes(32).hex().encode(), 0o600)
    settings = _settings(tmp_path, f'key_file = "{current}"\nkms_key_id = "{PRIMARY_ARN}"')
    ring = load_keyring(settings)
    assert ring is not None
    assert ring.current == MasterKey(bytes(32))
    assert [type(k) for k in ring.older] == [KmsKey]


@pytest.mark.parametrize(
    ("encryption", "repository", "message"),
    [
        ('key_provider = "kms"', "", 'key_provider = "kms" needs kms_key_id'),
        (
            f'key_provider = "kms"\nkms_key_id = "{PRIMARY_ARN}"\nkey_file = "/k"',
            "",
            "move it to old_key_files",
        ),
        (f'kms_key_id = "{PRIMARY_ARN}"', "", 'set encryption.key_provider = "kms"'),
        (
            f'key_provider = "kms"\nkms_key_id = "{PRIMARY_ARN}"\nkms_region = "eu-west-1"',
            "",
            "differs from the region of kms_key_id's ARN (us-east-1)",
        ),
        ('key_provider = "kms"\nkms_key_id = "alias/kybdr"', "", "needs a region"),
        ('key_provider = "cloud"', "", "key_provider"),
    ],
)
def test_kms_configuration_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encryption: str, repository: str, message: str
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert message in _config_error(tmp_path, encryption, repository)


def test_an_alias_takes_the_repositorys_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    settings = _settings(tmp_path, 'key_provider = "kms"\nkms_key_id = "alias/kybdr"', 'region = "eu-central-1"')
    assert settings.kms_region() == "eu-central-1"


# ------------------------------------------------------------------------------------------- rotation


def _manifest(backup_id: str, encryption: Encryption, database: str = "app") -> Manifest:
    return sample_manifest(backup_id, database=database, encryption=encryption)


async def _put(store: LocalStore, m: Manifest) -> None:
    await store.put_bytes(manifest_key_path(m.database, m.id), m.to_json())


async def _read(store: LocalStore, m: Manifest) -> bytes:
    return await store.get_bytes(manifest_key_path(m.database, m.id), max_size=1 << 20)


@pytest.mark.anyio
async def test_rotation_rewraps_what_it_can_skips_what_is_done_and_never_strands_a_backup(tmp_path: Path) -> None:
    old, new, stranger = MasterKey(MATERIAL), MasterKey(bytes(32)), MasterKey(b"\xee" * 32)
    store = LocalStore(tmp_path / "repo")
    ids = [f"20261124T21522{i}Z-3f9a1c2b" for i in range(5)]
    keys = {}
    made = []
    for backup_id, key in zip(ids, [old, old, new, stranger], strict=False):
        data_key = await KeyRing(key).new_data_key(backup_id)
        keys[backup_id] = data_key.plaintext
        made.append(_manifest(backup_id, data_key.encryption))
    made.append(_manifest(ids[4], Encryption(cipher="none")))
    for m in made:
        await _put(store, m)
    stranded = await _read(store, made[3])
    ring = KeyRing(new, [old])

    before = await key_status(store, ring)
    assert [(use.key.current, use.backups) for use in before.keys] == [(True, 1), (False, 2)]
    assert [u.backup_id for u in before.unopened] == [ids[3]]
    assert before.unencrypted == 1
    assert not before.ok

    planned = await rotate(store, ring, dry_run=True)
    assert planned.rewrapped == [ids[0], ids[1], ids[3]]
    assert await _read(store, made[0]) == made[0].to_json()  # a dry run writes nothing

    report = await rotate(store, ring)
    assert report.rewrapped == ids[:2]
    assert (report.already_current, report.unencrypted) == (1, 1)
    assert [backup_id for backup_id, _ in report.failed] == [ids[3]]
    assert "old_key_files" in report.failed[0][1]
    assert await _read(store, made[3]) == stranded  # untouched: still opens with the key it needs
    for m in made[:3]:
        rotated = Manifest.from_json(await _read(store, m))
        assert rotated.model_copy(update={"encryption": m.encryption}) == m  # only the wrap changed
        assert await KeyRing(new).open(m.id, rotated.encryption) == keys[m.id]

    again = await rotate(store, ring)
    assert (again.rewrapped, again.already_current) == ([], 3)
    after = await key_status(store, KeyRing(new), verify=True)
    assert [use.backups for use in after.keys] == [3]
    assert [u.backup_id for u in after.unopened] == [ids[3]]
