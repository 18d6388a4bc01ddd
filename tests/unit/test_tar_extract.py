"""The streamed tar extraction of a physical restore against well-formed and hostile archives.

Archives are made with the standard library's ``tarfile`` (ustar, as PostgreSQL writes) or edited by hand where
tarfile refuses to produce the attack; every hostile one must fail with ``UnsafeArchive`` and leave nothing
outside the target directory.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.wal.tar_extract import BLOCK, TarExtractor, UnsafeArchive, sync_tree


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _file(name: str, data: bytes, mode: int = 0o600) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _dir(name: str, mode: int = 0o700) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, b""


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def _extract(root: Path, data: bytes, chunk: int = 1000) -> TarExtractor:
    extractor = TarExtractor(root)
    try:
        for start in range(0, len(data), chunk):
            extractor.feed(data[start : start + chunk])
        extractor.finish()
    finally:
        extractor.close()
    return extractor


@pytest.fixture
def root(tmp_path: Path) -> Path:
    target = tmp_path / "pgdata"
    target.mkdir(mode=0o700)
    return target


def _outside_untouched(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgdata"]


SAMPLE = [
    _file("PG_VERSION", b"15\n"),
    _file("backup_label", b"START WAL LOCATION: 0/2000028\n"),
    _dir("base"),
    _dir("base/1"),
    _file("base/1/1259", os.urandom(3 * BLOCK)),  # ends on a block boundary: no padding
    _file("base/1/1249", os.urandom(5000)),
    _file("base/1/empty", b""),
    _dir("pg_wal"),
    _dir("pg_tblspc"),
    _dir("./pg_wal/archive_status/"),  # as pg_basebackup -X none adds it
    _file("global/pg_control", os.urandom(8192), mode=0o644),  # parent not listed first: created
    _link("current_logfiles_link", "base/1/1259"),
]


@settings(max_examples=25, deadline=None)
@given(chunk=st.integers(min_value=1, max_value=4 * BLOCK + 7))
def test_a_base_backup_comes_back_byte_for_byte_in_any_chunking(
    tmp_path_factory: pytest.TempPathFactory, chunk: int
) -> None:
    root = tmp_path_factory.mktemp("x") / "pgdata"
    root.mkdir(mode=0o700)
    extractor = _extract(root, _tar(SAMPLE), chunk)
    for info, data in SAMPLE:
        path = root / info.name
        if info.isreg():
            assert path.read_bytes() == data
        elif info.isdir():
            assert path.is_dir()
            assert not path.is_symlink()
    assert os.readlink(root / "current_logfiles_link") == "base/1/1259"
    assert extractor.stats.files == 6
    assert extractor.stats.symlinks == 1
    assert extractor.stats.bytes == sum(len(d) for i, d in SAMPLE if i.isreg())


def test_modes_keep_at_most_group_read(root: Path) -> None:
    _extract(root, _tar([_file("a", b"x", mode=0o4777), _dir("d", mode=0o777), _file("g", b"y", mode=0o640)]))
    assert stat.S_IMODE((root / "a").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "g").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "d").stat().st_mode) == 0o750


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../escape", "base/../../escape", "a/./b", "a//b", ".", "./", "././x", "./../x", "x\nname"],
)
def test_names_that_could_leave_the_directory_are_refused(tmp_path: Path, root: Path, name: str) -> None:
    data = _tar([_file("ok", b"1")])
    header = bytearray(data[:BLOCK])  # rewrite the name by hand: tarfile would normalise some of these
    raw = name.encode()
    header[0:100] = raw + b"\0" * (100 - len(raw))
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    with pytest.raises(UnsafeArchive):
        _extract(root, bytes(header) + data[BLOCK:])
    _outside_untouched(tmp_path)
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(
    ("link", "target", "says"),
    [
        ("evil", "/etc", "outside"),
        ("evil", "../..", "outside"),
        ("base/evil", "../../x", "outside"),
        ("pg_tblspc/16384", "/srv/tablespace", "tablespace"),
        ("pg_tblspc/16385", "../base", "tablespace"),
    ],
)
def test_links_out_of_the_directory_and_tablespaces_are_refused(
    tmp_path: Path, root: Path, link: str, target: str, says: str
) -> None:
    with pytest.raises(UnsafeArchive, match=says):
        _extract(root, _tar([_dir("base"), _dir("pg_tblspc"), _link(link, target)]))
    _outside_untouched(tmp_path)


def test_an_entry_never_goes_through_a_link_made_by_an_earlier_one(tmp_path: Path, root: Path) -> None:
    # Inside the directory, so allowed as a link; writing through it is not.
    entries = [_dir("real"), _link("alias", "real"), _file("alias/file", b"x")]
    with pytest.raises(UnsafeArchive, match="not a directory"):
        _extract(root, _tar(entries))
    assert not (root / "real" / "file").exists()


def test_nothing_outside_is_reached_through_a_preexisting_link(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "base")
    with pytest.raises(UnsafeArchive):
        _extract(root, _tar([_file("base/1/1259", b"x")]))
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        (_link("hard", "PG_VERSION", tarfile.LNKTYPE), "hard link"),
        (_link("fifo", "", tarfile.FIFOTYPE), "FIFO"),
        (_link("dev", "", tarfile.CHRTYPE), "character device"),
    ],
)
def test_entries_a_base_backup_never_holds_are_refused(
    root: Path, entry: tuple[tarfile.TarInfo, bytes], says: str
) -> None:
    with pytest.raises(UnsafeArchive, match=says):
        _extract(root, _tar([_file("PG_VERSION", b"15\n"), entry]))


def test_pax_headers_are_refused(root: Path) -> None:
    with pytest.raises(UnsafeArchive, match="pax"):
        _extract(root, _tar([_file("a" * 150, b"x")], fmt=tarfile.PAX_FORMAT))


def test_a_name_twice_is_refused_and_never_overwritten(root: Path) -> None:
    with pytest.raises(UnsafeArchive, match="twice"):
        _extract(root, _tar([_file("PG_VERSION", b"15\n"), _file("PG_VERSION", b"99\n")]))
    assert (root / "PG_VERSION").read_bytes() == b"15\n"
    with pytest.raises(UnsafeArchive, match="twice"):
        _extract(root, _tar([_dir("d"), _file("d", b"x")]))


def test_a_truncated_archive_is_refused(root: Path) -> None:
    data = _tar([_file("base/big", os.urandom(3000))])
    with pytest.raises(UnsafeArchive, match="truncated"):
        _extract(root, data[: BLOCK + 1000])  # mid-file


def test_an_archive_without_its_end_marker_is_refused(root: Path) -> None:
    data = _tar([_file("PG_VERSION", b"15\n")])
    end = 2 * BLOCK  # header + one data block
    with pytest.raises(UnsafeArchive, match="end-of-archive"):
        _extract(root, data[:end])


def test_trailing_zeros_pass_and_trailing_data_is_refused(tmp_path: Path) -> None:
    data = _tar([_file("PG_VERSION", b"15\n")])
    ok = tmp_path / "ok"
    ok.mkdir()
    _extract(ok, data + bytes(4 * BLOCK))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(UnsafeArchive, match="after its end"):
        _extract(bad, data + b"junk")


def test_a_damaged_header_fails_its_checksum(root: Path) -> None:
    data = bytearray(_tar([_file("PG_VERSION", b"15\n")]))
    data[10] ^= 0x01
    with pytest.raises(UnsafeArchive, match="checksum"):
        _extract(root, bytes(data))


def test_something_else_than_a_tar_is_refused(root: Path) -> None:
    with pytest.raises(UnsafeArchive):
        _extract(root, os.urandom(4 * BLOCK))
    v7 = bytearray(_tar([_file("PG_VERSION", b"15\n")]))
    v7[257:265] = bytes(8)  # an old v7 header: no magic
    v7[148:156] = b" " * 8
    v7[148:156] = f"{sum(v7[:BLOCK]):06o}\0 ".encode()
    with pytest.raises(UnsafeArchive, match="ustar"):
        _extract(root, bytes(v7))


def test_sync_tree_walks_files_directories_and_skips_links(root: Path) -> None:
    _extract(root, _tar(SAMPLE))
    sync_tree(root)  # no error on files, directories and a dangling-safe link
