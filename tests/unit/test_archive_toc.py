"""Reading pg_dump's custom archive as a stream (kybdr_agent/backup/archive_toc.py, archive_data.py) and the
contents document built from it (contents_doc.py).

Real archives first: small databases on the session cluster dumped by the real pg_dump — piped (no offsets in
the TOC, as the agent's backups are), to a file (offsets set) and gzip-compressed — checked against
``pg_restore --list`` and against the database itself (each table's COPY bytes and row count). Then the
versions this pg_dump does not write (1.15, 1.16), built byte by byte after PostgreSQL's ReadHead/ReadToc,
and what must be refused. Then properties: however the stream is cut the answer is the same, and an archive
cut short anywhere is an error, never a listing.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.archive_toc import (
    Archive,
    ArchiveError,
    ArchiveParser,
    ArchiveTruncated,
    TocCapture,
    UnsupportedArchive,
    parse,
)
from kybdr_agent.backup.contents_doc import render_text, summarize
from kybdr_agent.postgres.cluster import PG_BIN, Cluster
from tests.support import unique_db

SOURCE_SQL = r'''
create schema "Odd Schema";
create table public.plain (id serial primary key, note text);
insert into public.plain (note) select case when g % 3 = 0 then E'two\nlines\tand a tab \\ and \\.' else 'n' || g end
from generate_series(1, 500) g;
insert into public.plain (note) values (null), (''), ('\.');
create table public.empty (x int);
create table "Odd Schema"."Quoted ""Name""" (v bytea);
insert into "Odd Schema"."Quoted ""Name""" select sha256(g::text::bytea) from generate_series(1, 40) g;
create index on public.plain (note);
create view public.v as select id from public.plain;
create function public.f() returns int language sql as 'select 1';
comment on table public.plain is 'a comment';
select lo_from_bytea(0, 'first large object');
select lo_from_bytea(0, decode(repeat('ab', 40000), 'hex'));
'''
TABLES = {("public", "plain"), ("public", "empty"), ("Odd Schema", 'Quoted "Name"')}


@dataclass(frozen=True)
class Dumps:
    db: str
    piped: bytes
    seekable: bytes
    gzip: bytes
    latin1: bytes


def _pg_dump(cluster: Cluster, database: str, *args: str) -> bytes:
    return subprocess.run(
        [str(PG_BIN / "pg_dump"), "--format=custom", *args, "-d", database],
        env={**os.environ, **cluster.env()},
        capture_output=True,
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def dumps(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dumps]:
    db, latin = unique_db("toc"), unique_db("toc_latin")
    pg.psql(
        "postgres",
        f'create database "{db}"; create database "{latin}" encoding \'LATIN1\' template template0 '
        "lc_collate 'C' lc_ctype 'C'",
    )
    pg.psql(db, SOURCE_SQL)
    pg.psql(latin, "set client_encoding = 'UTF8'; create table café (naïve text); insert into café values ('déjà vu')")
    file = tmp_path_factory.mktemp("toc") / "seekable.dump"
    _pg_dump(pg, db, "--compress=0", f"--file={file}")
    yield Dumps(
        db,
        _pg_dump(pg, db, "--compress=0"),
        file.read_bytes(),
        _pg_dump(pg, db, "--compress=1"),
        _pg_dump(pg, latin, "--compress=0"),
    )
    pg.psql("postgres", f'drop database "{db}"; drop database "{latin}"')


_LISTED = re.compile(r"^(\d+); \d+ \d+ (.*)$")


def _pg_restore_list(data: bytes, tmp_path: Path) -> dict[int, str]:
    path = tmp_path / "archive.dump"
    path.write_bytes(data)
    out = subprocess.run([str(PG_BIN / "pg_restore"), "--list", str(path)], capture_output=True, text=True, check=True)
    return {int(m[1]): m[2] for line in out.stdout.splitlines() if (m := _LISTED.match(line))}


@pytest.mark.parametrize("kind", ["piped", "seekable", "gzip"])
def test_entries_are_what_pg_restore_lists(dumps: Dumps, kind: str, tmp_path: Path) -> None:
    data = getattr(dumps, kind)
    archive = parse([data])
    listed = _pg_restore_list(data, tmp_path)
    ours = {
        e.dump_id: f"{e.desc} {e.namespace or '-'} {e.tag} {e.owner or ''}"
        for e in archive.entries
        if e.desc not in ("ENCODING", "STDSTRINGS", "SEARCHPATH", "DATABASE")  # pg_restore --list leaves these out
    }
    assert ours == listed
    assert archive.header.version[:2] == (1, 14)
    assert archive.header.database == dumps.db
    assert archive.header.pg_dump_version.startswith("15.")
    assert archive.header.compression == ("gzip" if kind == "gzip" else "none")
    plain = next(e for e in archive.entries if e.desc == "TABLE" and e.tag == "plain")
    index = next(e for e in archive.entries if e.desc == "INDEX")
    assert plain.dump_id in index.dependencies
    assert "CREATE TABLE public.plain" in plain.defn


def test_data_sizes_and_rows_are_the_databases(pg: Cluster, dumps: Dumps) -> None:
    for data in (dumps.piped, dumps.seekable):
        archive = parse([data])
        tables = {(e.namespace, e.tag): archive.data[e.dump_id] for e in archive.entries if e.desc == "TABLE DATA"}
        assert set(tables) == TABLES
        for (schema, name), stats in tables.items():
            assert schema is not None
            ident = '"' + schema.replace('"', '""') + '"."' + name.replace('"', '""') + '"'
            copy = subprocess.run(
                [str(PG_BIN / "psql"), "-X", "-d", dumps.db, "-c", f"copy {ident} to stdout"],
                env={**os.environ, **pg.env()},
                capture_output=True,
                check=True,
            ).stdout
            assert stats.bytes == len(copy)
            assert stats.rows == int(pg.psql(dumps.db, f"select count(*) from {ident}"))
        (blobs,) = (archive.data[e.dump_id] for e in archive.entries if e.desc == "BLOBS")
        assert (blobs.large_objects, blobs.bytes) == (2, len("first large object") + 40000)


def test_the_contents_document(dumps: Dumps) -> None:
    doc = summarize(parse([dumps.piped]), "b-1").as_dict()
    tables = {(s["name"], t["name"]): t for s in doc["schemas"] for t in s["tables"]}
    assert set(tables) == TABLES
    assert tables[("public", "plain")]["rows"] == 503
    assert tables[("public", "empty")] == {"name": "empty", "owner": "postgres", "data_bytes": 0, "rows": 0}
    public = next(s for s in doc["schemas"] if s["name"] == "public")
    assert public["objects"] == {"constraint": 1, "function": 1, "index": 1, "sequence": 1, "view": 1}
    assert doc["large_objects"]["count"] == 2
    assert doc["totals"]["tables"] == 3
    assert doc["totals"]["rows"] == 543
    assert doc["size_unit"] == "bytes"
    assert any(
        "plain" in line and "503 rows" in line for line in render_text(summarize(parse([dumps.piped]), "b").as_dict())
    )
    packed = summarize(parse([dumps.gzip]), "b-2").as_dict()
    assert packed["size_unit"] == "compressed bytes"
    assert packed["totals"]["rows"] is None
    assert all(t["rows"] is None for s in packed["schemas"] for t in s["tables"])


def test_names_are_decoded_from_the_archives_encoding(dumps: Dumps) -> None:
    archive = parse([dumps.latin1])
    assert archive.encoding == "LATIN1"
    (table,) = (e for e in archive.entries if e.desc == "TABLE")
    assert table.tag == "café"
    assert "naïve" in table.defn


# --- archives this pg_dump does not write, built after ReadHead/ReadToc ----------------------------------------


def _int(value: int, size: int = 4) -> bytes:
    return bytes([1 if value < 0 else 0]) + abs(value).to_bytes(size, "little")


def _str(text: str | None) -> bytes:
    if text is None:
        return _int(-1)
    raw = text.encode()
    return _int(len(raw)) + raw


def _entry(version: tuple[int, int], dump_id: int, desc: str, tag: str, *deps: int, data: bool = False) -> bytes:
    out = _int(dump_id) + _int(1 if data else 0) + _str("1259") + _str("16384") + _str(tag) + _str(desc)
    out += _int(3 if data else 2) + _str(f"-- {desc} {tag}") + _str("") + _str("")
    out += _str("public" if desc != "BLOBS" else "") + _str("") + _str("heap")
    if version >= (1, 16):
        out += _int(ord("r"))
    out += _str("postgres") + _str("false") + b"".join(_str(str(d)) for d in deps) + _str(None)
    return out + bytes([1 if data else 3]) + bytes(8)


def synthetic(version: tuple[int, int], *, fmt: int = 1, tail: bytes = b"") -> bytes:
    head = b"PGDMP" + bytes([*version, 0, 4, 8, fmt])
    head += bytes([0]) if version >= (1, 15) else _int(0)
    head += b"".join(_int(v) for v in (5, 4, 3, 2, 1, 125, 0)) + _str("db") + _str("17.2") + _str("17.2")
    toc = _int(3) + _entry(version, 1, "TABLE", "t") + _entry(version, 2, "TABLE DATA", "t", 1, data=True)
    toc += _entry(version, 3, "BLOBS", "BLOBS", data=True)
    rows = bytes([1]) + _int(2) + _int(4) + b"1\ta\n" + _int(4) + b"2\tb\n" + _int(5) + b"\\.\n\n\n" + _int(0)
    blobs = bytes([3]) + _int(3) + _int(16400) + _int(3) + b"abc" + _int(0) + _int(16401) + _int(0) + _int(0)
    return head + toc + rows + blobs + tail


@pytest.mark.parametrize("version", [(1, 14), (1, 15), (1, 16)])
def test_versions_one_fourteen_to_one_sixteen_are_read(version: tuple[int, int]) -> None:
    archive = parse([synthetic(version)])
    assert [e.desc for e in archive.entries] == ["TABLE", "TABLE DATA", "BLOBS"]
    assert archive.header.created == "2025-02-02 03:04:05"
    assert archive.header.pg_dump_version == "17.2"
    assert (archive.data[2].rows, archive.data[2].bytes) == (2, 8)
    assert (archive.data[3].large_objects, archive.data[3].bytes) == (2, 3)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (synthetic((1, 13)), UnsupportedArchive, "archive version 1.13"),
        (synthetic((1, 17)), UnsupportedArchive, "archive version 1.17"),
        (synthetic((1, 14), fmt=3), UnsupportedArchive, "not the custom format"),
        (b"-- PostgreSQL database dump\n", ArchiveError, "no PGDMP signature"),
        (synthetic((1, 16), tail=b"\x00"), ArchiveError, "bytes follow the archive's last data block"),
        (synthetic((1, 16), tail=bytes([1]) + _int(2) + _int(0)), ArchiveError, "bytes follow"),
    ],
)
def test_what_is_refused(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        parse([data])


def test_corrupt_blocks_are_refused() -> None:
    good = synthetic((1, 16))
    at = good.index(bytes([1]) + _int(2) + _int(4))
    for bad, message in [
        (good[:at] + bytes([1]) + _int(1) + good[at + 6 :], "which the table of contents gives none"),
        (good[:at] + bytes([3]) + good[at + 1 :], "data block type 3 for TABLE DATA public.t"),
        (good[: at + 6] + _int(-4) + good[at + 11 :], "length -4"),
    ]:
        with pytest.raises(ArchiveError, match=message):
            parse([bad])


def test_a_table_of_contents_past_the_limit_is_refused(dumps: Dumps) -> None:
    with pytest.raises(ArchiveError, match="larger than 0 MiB"):
        parse([dumps.piped], toc_limit=1024)


# --- properties ---------------------------------------------------------------------------------------------


def _cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def _answer(archive: Archive) -> tuple[object, ...]:
    return archive.header, archive.encoding, archive.entries, archive.data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(points=st.lists(st.integers(min_value=0), max_size=40), small=st.booleans())
def test_the_answer_does_not_depend_on_how_the_stream_is_cut(dumps: Dumps, points: list[int], small: bool) -> None:
    data = dumps.piped
    if small:  # many tiny pieces around the TOC's end and the first blocks, where state crosses boundaries
        points = points + list(range(len(data) // 2, len(data) // 2 + 200, 7))
    whole = _answer(parse([data]))
    assert _answer(parse(_cut(data, points))) == whole
    synth = synthetic((1, 16))
    assert _answer(parse(_cut(synth, points))) == _answer(parse([synth]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(end=st.integers(min_value=0), points=st.lists(st.integers(min_value=0), max_size=8))
def test_a_truncated_archive_is_an_error_never_a_listing(dumps: Dumps, end: int, points: list[int]) -> None:
    for data in (dumps.piped, synthetic((1, 15))):
        prefix = data[: end % len(data)]
        parser = ArchiveParser()
        for chunk in _cut(prefix, points):
            parser.feed(chunk)
        with pytest.raises(ArchiveTruncated, match="the archive ends"):
            parser.finish()


def test_every_byte_boundary_of_a_small_archive() -> None:
    data = synthetic((1, 16))
    whole = _answer(parse([data]))
    assert _answer(parse([data[i : i + 1] for i in range(len(data))])) == whole
    for end in range(len(data)):
        with pytest.raises(ArchiveTruncated):
            parse([data[:end]])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(points=st.lists(st.integers(min_value=0), max_size=30))
def test_the_captured_head_is_the_archive_up_to_its_data_however_it_is_cut(dumps: Dumps, points: list[int]) -> None:
    """What a parallel restore spools for its post-data step: the header and TOC, byte for byte, nothing more."""
    data = dumps.piped
    capture = TocCapture()
    for chunk in _cut(data, points):
        capture.feed(chunk)
    head = capture.head
    assert data.startswith(head)
    parser = ArchiveParser()
    parser.feed(head)
    assert parser.toc is not None
    assert parser.toc_size == len(head)
    assert parser.toc.entries == parse([data]).entries
    short = TocCapture()
    short.feed(head[:-1])
    with pytest.raises(ArchiveTruncated):
        _ = short.head
