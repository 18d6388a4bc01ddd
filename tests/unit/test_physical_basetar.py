"""The base backup tar reader (kybdr_agent/backup/basetar.py): the facts of a whole tar in any chunking, and a
refusal for anything cut short, damaged, or not what PostgreSQL's pg_basebackup writes.

The tars are built with Python's tarfile in ustar format (PostgreSQL's own, src/port/tar.c); the manifest
carries a real Manifest-Checksum, computed as pg_verifybackup checks it. The integration test reads real ones.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.basetar import (
    MANIFEST_TAIL_BYTES,
    BaseTarError,
    BaseTarReader,
    _number,
    parse_backup_label,
    parse_wal_ranges,
)

SYSID = 7714579446767659151
LABEL = (
    b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    b"CHECKPOINT LOCATION: 0/2000060\n"
    b"BACKUP METHOD: streamed\n"
    b"BACKUP FROM: primary\n"
    b"START TIME: 2026-12-02 05:48:19 UTC\n"
    b"LABEL: kybdr-agent 20261202T054819Z-0123abcd\n"
    b"START TIMELINE: 1\n"
)
RANGE = b'{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }'


def manifest(ranges: bytes = RANGE, files: int = 3, *, checksum: str | None = None) -> bytes:
    listed = ",\n".join(
        f'{{ "Path": "base/1/{n}", "Size": 8192, "Last-Modified": "2026-12-02 05:48:19 GMT", '
        f'"Checksum-Algorithm": "CRC32C", "Checksum": "{n:08x}" }}'
        for n in range(files)
    )
    body = (
        b'{ "PostgreSQL-Backup-Manifest-Version": 1,\n"Files": [\n'
        + listed.encode()
        + b'\n],\n"WAL-Ranges": [\n'
        + ranges
        + b"\n],\n"
    )
    digest = checksum or hashlib.sha256(body).hexdigest()
    return body + f'"Manifest-Checksum": "{digest}"}}\n'.encode()


def pg_control(sysid: int = SYSID) -> bytes:
    return sysid.to_bytes(8, "little") + (1300).to_bytes(4, "little") + bytes(8192 - 12)


def base_tar(members: dict[str, bytes] | None = None, *, drop: tuple[str, ...] = ()) -> bytes:
    files = {
        "backup_label": LABEL,
        "PG_VERSION": b"15\n",
        "base/1/1259": os.urandom(3 * 8192 + 100),
        "global/pg_control": pg_control(),
        **(members or {}),
    }
    if "backup_manifest" not in files:
        files["backup_manifest"] = manifest()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for directory in ("base", "base/1", "global"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o700
            tar.addfile(info)
        for name, data in files.items():
            if name in drop:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def read(data: bytes, chunk: int = 65536) -> BaseTarReader:
    reader = BaseTarReader()
    for start in range(0, len(data), chunk):
        reader.feed(data[start : start + chunk])
    return reader


TAR = base_tar()


@given(st.lists(st.integers(1, 40_000), min_size=1, max_size=40))
@settings(max_examples=60, deadline=None)
def test_facts_are_the_same_in_any_chunking(cuts: list[int]) -> None:
    reader = BaseTarReader()
    position = 0
    for size in cuts:
        reader.feed(memoryview(TAR)[position : position + size])
        position += size
    reader.feed(TAR[position:])
    facts = reader.finish()
    assert facts.system_identifier == str(SYSID)
    assert facts.pg_control_version == 1300
    assert facts.timeline == 1
    assert facts.start_lsn == 0x2000028
    assert facts.stop_lsn == 0x2000100
    assert facts.label.start_segment == "000000010000000000000002"
    assert facts.label.backup_from == "primary"
    assert facts.pg_version == "15"
    assert facts.members == 8  # 3 directories, 5 files
    assert facts.tar_bytes == len(TAR)
    assert not facts.tablespace_map


@given(st.integers(0, len(TAR) - 1024))
@settings(max_examples=60, deadline=None)
def test_a_tar_cut_short_anywhere_is_refused(cut: int) -> None:
    with pytest.raises(BaseTarError):
        read(TAR[:cut]).finish()


def test_a_manifest_longer_than_the_kept_tail_still_verifies() -> None:
    big = manifest(files=MANIFEST_TAIL_BYTES // 50)
    assert len(big) > 2 * MANIFEST_TAIL_BYTES
    assert read(base_tar({"backup_manifest": big}), chunk=7919).finish().stop_lsn == 0x2000100


@pytest.mark.parametrize(
    ("members", "drop", "message"),
    [
        ({}, ("backup_label",), "no backup_label"),
        ({}, ("backup_manifest",), "no backup_manifest"),
        ({}, ("global/pg_control",), "no global/pg_control"),
        ({"backup_manifest": manifest(checksum="0" * 64)}, (), "does not match its own Manifest-Checksum"),
        ({"backup_manifest": manifest()[:-20]}, (), "does not end with its Manifest-Checksum"),
        (
            {"backup_manifest": manifest(RANGE.replace(b"0/2000028", b"0/2000030"))},
            (),
            "does not start where backup_label says",
        ),
        (
            {
                "backup_manifest": manifest(
                    RANGE + b',\n{ "Timeline": 2, "Start-LSN": "0/2000100", "End-LSN": "0/3000100" }'
                )
            },
            (),
            "changed timeline during the backup",
        ),
        ({"backup_label": LABEL.replace(b"START TIMELINE: 1\n", b"")}, (), "lacks START TIMELINE"),
        ({"backup_label": LABEL + b"START TIMELINE: 1\n"}, (), "twice"),
        ({"backup_label": b"x" * 70_000}, (), "far more than PostgreSQL writes"),
    ],
)
def test_what_is_not_a_base_backup_is_refused(members: dict[str, bytes], drop: tuple[str, ...], message: str) -> None:
    with pytest.raises(BaseTarError, match=message):
        read(base_tar(members, drop=drop)).finish()


def test_a_second_backup_label_is_refused() -> None:
    second = io.BytesIO()
    with tarfile.open(fileobj=second, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("backup_label")
        info.size = len(LABEL)
        tar.addfile(info, io.BytesIO(LABEL))
    doubled = second.getvalue().rstrip(b"\0")
    doubled += bytes(-len(doubled) % 512)
    with pytest.raises(BaseTarError, match="'backup_label' twice"):
        read(doubled + TAR).finish()


def test_a_damaged_header_is_refused() -> None:
    damaged = bytearray(TAR)
    damaged[512 * 2 + 10] ^= 0x01  # a byte of the third header's name
    with pytest.raises(BaseTarError, match="bad checksum"):
        read(bytes(damaged)).finish()


def test_bytes_after_the_end_are_refused() -> None:
    with pytest.raises(BaseTarError, match="after its end-of-archive"):
        read(TAR + b"\x01" + bytes(511)).finish()


def test_a_stream_that_is_not_a_tar_is_refused() -> None:
    with pytest.raises(BaseTarError):
        read(os.urandom(4096)).finish()


def test_tar_numbers_octal_and_base_256() -> None:
    assert _number(b"00000001750\0", "size") == 1000
    assert _number(b"1750 \0      ", "size") == 1000
    big = 10 << 30  # 10 GiB: past the octal field, written base-256 as tar.c does
    assert _number(bytes([0x80]) + big.to_bytes(11, "big"), "size") == big
    with pytest.raises(BaseTarError):
        _number(b"12x4\0", "size")


def test_backup_label_and_ranges_parse() -> None:
    label = parse_backup_label(LABEL)
    assert (label.start_lsn, label.checkpoint_lsn, label.start_timeline) == (0x2000028, 0x2000060, 1)
    assert label.label == "kybdr-agent 20261202T054819Z-0123abcd"
    with pytest.raises(BaseTarError, match="START WAL LOCATION"):
        parse_backup_label(LABEL.replace(b"0/2000028 (file", b"0/2000028 (fil"))
    (only,) = parse_wal_ranges(manifest())
    assert (only.timeline, only.start_lsn, only.end_lsn) == (1, 0x2000028, 0x2000100)
    with pytest.raises(BaseTarError, match="no WAL-Ranges"):
        parse_wal_ranges(b"{}")
