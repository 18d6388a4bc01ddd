"""What a selective restore restores (kybdr_agent/backup/selective_plan.py): names as SQL reads them, the entries
that make a table whole, what is brought along or left out (and said), what is refused before anything is
created, the roles it needs, and the names a table added under a new name gives its indexes and sequences.

The tables of contents below are the ones pg_dump 15 writes for these objects (ids, types, names and
dependencies copied from real archives; the integration test restores real ones).
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.archive_toc import Archive, Header, Section, TocEntry
from kybdr_agent.backup.selection import Selection, SelectionError, parse_name, qualified, renamed, selective_request
from kybdr_agent.backup.selective_plan import SelectionPlan, plan_selection, selection_needs

HEADER = Header((1, 14, 0), 4, 8, "none", "2026-01-01 00:00:00", "src", "15.18", "15.18")


def _e(
    dump_id: int, desc: str, ns: str | None, tag: str, *deps: int, owner: str = "postgres", defn: str = ""
) -> TocEntry:
    section = Section.DATA if desc in ("TABLE DATA", "SEQUENCE SET", "BLOBS") else Section.PRE_DATA
    return TocEntry(dump_id, desc, tag, ns, owner, None, section, deps, desc in ("TABLE DATA", "BLOBS"), defn)


# The source of tests/integration/test_selective_restore.py, as pg_dump 15 lists it.
SHOP = Archive(
    HEADER,
    "UTF8",
    (
        _e(3380, "ENCODING", None, "ENCODING", defn="SET client_encoding = 'UTF8';\n"),
        _e(3381, "STDSTRINGS", None, "STDSTRINGS"),
        _e(3382, "SEARCHPATH", None, "SEARCHPATH"),
        _e(3383, "DATABASE", None, "src"),
        _e(6, "SCHEMA", None, "sales", owner="app_owner", defn="CREATE SCHEMA sales;\n"),
        _e(222, "FUNCTION", "public", "touch()"),
        _e(216, "TABLE", "public", "customers", defn="CREATE TABLE public.customers (id integer);\n"),
        _e(3384, "COMMENT", "public", "TABLE customers", 216),
        _e(3386, "ACL", "public", "TABLE customers", 216, defn="GRANT SELECT ON TABLE public.customers TO reader;\n"),
        _e(215, "SEQUENCE", "public", "customers_id_seq", 216, defn="CREATE SEQUENCE public.customers_id_seq;\n"),
        _e(3387, "SEQUENCE OWNED BY", "public", "customers_id_seq", 215),
        _e(218, "TABLE", "sales", "orders", 6, owner="app_owner"),
        _e(221, "VIEW", "sales", "big", 218, 6),
        _e(219, "SEQUENCE", "sales", "shared_seq", 6, defn="CREATE SEQUENCE sales.shared_seq;\n"),
        _e(220, "TABLE", "sales", "notes", 219, 6),
        _e(217, "SEQUENCE", "sales", "orders_id_seq", 218, 6, defn="ALTER TABLE sales.orders ALTER COLUMN id ADD …"),
        _e(3213, "DEFAULT", "public", "customers id", 216, 215, 216),
        _e(3376, "BLOB", None, "16429"),
        _e(3371, "TABLE DATA", "public", "customers", 216),
        _e(3375, "TABLE DATA", "sales", "notes", 220),
        _e(3373, "TABLE DATA", "sales", "orders", 218),
        _e(3388, "SEQUENCE SET", "public", "customers_id_seq", 215),
        _e(3389, "SEQUENCE SET", "sales", "orders_id_seq", 217),
        _e(3390, "SEQUENCE SET", "sales", "shared_seq", 219),
        _e(3377, "BLOBS", None, "BLOBS"),
        _e(3221, "CONSTRAINT", "public", "customers customers_pkey", 216),
        _e(3224, "CONSTRAINT", "sales", "orders orders_pkey", 218),
        _e(3217, "INDEX", "public", "customers_created_idx", 216),
        _e(3222, "INDEX", "sales", "orders_customer_idx", 218),
        _e(3226, "TRIGGER", "sales", "orders orders_touch", 218, 222),
        _e(3225, "FK CONSTRAINT", "sales", "orders orders_customer_fkey", 3221, 218, 216),
    ),
)

# A partitioned table, an inheritance child and a table in two schemas of the same name.
TREES = Archive(
    HEADER,
    "UTF8",
    (
        _e(1, "ENCODING", None, "ENCODING"),
        _e(217, "TABLE", "public", "parent"),
        _e(218, "TABLE", "public", "child", 217),
        _e(214, "TABLE", "public", "m"),
        _e(215, "TABLE", "public", "m_2024", 214),
        _e(3223, "TABLE ATTACH", "public", "m_2024", 215, 214),
        _e(3380, "TABLE DATA", "public", "m_2024", 215),
        _e(3226, "CONSTRAINT", "public", "m m_pkey", 214, 214),
        _e(3229, "CONSTRAINT", "public", "m_2024 m_2024_pkey", 215, 215, 3226, 215),
        _e(3234, "INDEX ATTACH", "public", "m_2024_pkey", 3226, 3229, 215, 3226, 215, 214),
        _e(300, "TABLE", "a", "twin"),
        _e(301, "TABLE", "b", "twin"),
        _e(302, "TABLE", "public", "Mixed"),
        _e(303, "TABLE", "public", 'We.ird"Name'),
    ),
)


def _ids(plan: SelectionPlan) -> set[int]:
    return {e.dump_id for e in plan.entries}


# --- names ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("orders", ("orders",)),
        ("Sales.Orders", ("sales", "orders")),
        ('"Sales".Orders', ("Sales", "orders")),
        ('sales."Order.Items"', ("sales", "Order.Items")),
        ('"a""b"', ('a"b',)),
        ("émigré.ÉTÉ", ("émigré", "ÉtÉ")),  # only ASCII folds, as in PostgreSQL
    ],
)
def test_names_read_as_sql_reads_them(text: str, parts: tuple[str, ...]) -> None:
    assert parse_name(text) == parts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a name"),
        ("a.b.c", "at most 2"),
        ('"open', "not closed"),
        ("a.", "a name after it"),
        (".a", "empty name"),
        ('""', "empty name"),
        ("my table", "quote a name"),
        ('"a"b', "expected a '.'"),
        ("x" * 64, "longer than PostgreSQL's 63 bytes"),
        ("nul\x00", "not a name"),
    ],
)
def test_bad_names_are_refused(text: str, message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        parse_name(text)


@settings(max_examples=200)
@given(
    schema=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), min_size=1, max_size=20),
    name=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), min_size=1, max_size=20),
)
def test_a_qualified_name_reads_back_as_itself(schema: str, name: str) -> None:
    assert parse_name(qualified(schema, name)) == (schema, name)


def test_a_selection_is_checked_when_made() -> None:
    with pytest.raises(SelectionError, match="at least one"):
        Selection()
    with pytest.raises(SelectionError, match="at most 1"):
        Selection(schemas=("a.b",))
    assert Selection(tables=("x", "X", "public.x")).table_names() == [(None, "x"), ("public", "x")]


# --- what a selection restores ------------------------------------------------------------------------------


def test_a_table_comes_whole() -> None:
    plan = plan_selection(SHOP, Selection(tables=("customers",)))
    # table, comment, grant, owned sequence and its OWNED BY, default, data, sequence value, key, index
    assert _ids(plan) == {3380, 3381, 3382, 216, 3384, 3386, 215, 3387, 3213, 3371, 3388, 3221, 3217}
    assert plan.tables == (("public", "customers"),)
    assert [e.dump_id for e in plan.entries] == sorted(_ids(plan), key=[e.dump_id for e in SHOP.entries].index)
    assert plan.notices == ("the backup's large objects are not part of a selective restore",)


def test_what_a_table_needs_comes_along_and_a_foreign_key_out_of_the_selection_stays_out() -> None:
    plan = plan_selection(SHOP, Selection(tables=("sales.orders",)))
    assert _ids(plan) - {3380, 3381, 3382} == {6, 222, 218, 217, 3373, 3389, 3224, 3222, 3226}
    assert plan.notices[0] == (
        "not restored: FK CONSTRAINT sales.orders orders_customer_fkey, which needs TABLE public.customers "
        "(not selected)"
    )
    assert plan.notices[1] == "restored too, because the selection needs them: SCHEMA sales, FUNCTION public.touch()"
    both = plan_selection(SHOP, Selection(tables=("sales.orders", "public.customers")))
    assert 3225 in _ids(both)
    assert not any("not restored" in n for n in both.notices)


def test_a_schema_and_the_sequence_its_table_shares() -> None:
    plan = plan_selection(SHOP, Selection(schemas=("sales",)))
    assert {218, 221, 219, 220, 217, 3375, 3373, 3389, 3390, 3224, 3222, 3226, 6, 222} <= _ids(plan)
    assert 3225 not in _ids(plan)
    assert plan.tables == (("sales", "orders"), ("sales", "notes"))
    # A sequence owned by a table not selected comes along for a default that uses it, without its OWNED BY.
    shared = plan_selection(
        Archive(
            HEADER, "UTF8", (*SHOP.entries, _e(400, "TABLE", "x", "uses", 215), _e(401, "TABLE DATA", "x", "uses", 400))
        ),
        Selection(tables=("x.uses",)),
    )
    assert {215, 3388} <= _ids(shared)
    assert 3387 not in _ids(shared)
    assert 216 not in _ids(shared)


def test_a_partitioned_table_brings_its_partitions() -> None:
    plan = plan_selection(TREES, Selection(tables=("m",)))
    assert _ids(plan) == {1, 214, 215, 3223, 3380, 3226, 3229, 3234}
    assert plan.tables == (("public", "m"), ("public", "m_2024"))


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (("child",), "TABLE public.child needs TABLE public.parent"),
        (("m_2024",), "TABLE public.m_2024 needs TABLE public.m"),
        (("twin",), r"'twin' is in several schemas \(a.twin, b.twin\)"),
        (("mixed",), r"no table mixed \(did you mean 'public\.\"Mixed\"'\? quote mixed case\)"),
        (("nope", "a.nope"), "no table nope; no table a.nope"),
    ],
)
def test_what_is_refused_before_anything_is_created(tables: tuple[str, ...], message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        plan_selection(TREES, Selection(tables=tables))


def test_a_view_is_not_a_table_and_a_missing_schema_is_named() -> None:
    with pytest.raises(SelectionError, match=r"VIEW sales\.big is a view, not a table"):
        plan_selection(SHOP, Selection(tables=("sales.big",)))
    with pytest.raises(SelectionError, match="no schema 'nope'"):
        plan_selection(SHOP, Selection(schemas=("nope",)))
    assert plan_selection(TREES, Selection(tables=('"We.ird""Name"',))).tables == (("public", 'We.ird"Name'),)


def test_the_list_file_is_one_line_per_entry_whatever_the_names() -> None:
    odd = Archive(HEADER, "UTF8", (_e(1, "ENCODING", None, "ENCODING"), _e(7, "TABLE", "public", "a\nb\r99; c")))
    text = plan_selection(odd, Selection(tables=('"a\nb\r99; c"',))).list_file()
    assert text.splitlines() == ["; kybdr-agent selective restore", "1; ENCODING ENCODING", "7; TABLE public.a?b?99; c"]


def test_the_roles_and_tablespaces_a_selection_needs() -> None:
    plan = plan_selection(SHOP, Selection(tables=("customers",)))
    needs = selection_needs(plan)
    assert needs.roles == {"postgres", "reader"}
    spaced = SelectionPlan(
        (TocEntry(1, "TABLE", "t", "public", "Ünïcode", "fast", Section.PRE_DATA, (), False, ""),), (), ()
    )
    assert (selection_needs(spaced).roles, selection_needs(spaced).tablespaces) == ({"Ünïcode"}, {"fast"})


# --- names for a table added under a new name ----------------------------------------------------------------


def test_renamed_parts() -> None:
    assert renamed("customers", "clients", "customers_pkey", ()) == "clients_pkey"
    assert renamed("customers", "clients", "by_name", ()) == "clients_by_name"
    assert renamed("customers", "clients", "customers_pkey", {"clients_pkey"}) == "clients_pkey_2"
    long = renamed("t", "é" * 32, "t_id_seq", ())
    assert long == "é" * 31  # 63 bytes would split the 32nd character: cut before it
    again = renamed("t", "é" * 32, "t_id_seq", {long})
    assert again == "é" * 30 + "_2"
    assert len(again.encode()) <= 63
    # A table brought back under its own name: its parts keep theirs unless taken.
    assert renamed("customers", "customers", "by_name", ()) == "by_name"
    assert renamed("customers", "customers", "customers_pkey", {"customers_pkey"}) == "customers_pkey_2"


def test_a_request_whose_switches_do_not_go_together_is_refused() -> None:
    assert selective_request() is None
    assert selective_request(["t"], into_existing=True, rename_to="t2") == Selection(tables=("t",))
    for kwargs, message in [
        ({"into_existing": True}, "go with one --table"),
        ({"tables": ["t"], "into_existing": True}, "needs --rename-to"),
        ({"tables": ["a", "b"], "into_existing": True, "rename_to": "c"}, "exactly one table"),
        ({"tables": ["t"], "schemas": ["s"], "into_existing": True, "rename_to": "c"}, "exactly one table"),
        ({"tables": ["t"], "rename_to": "c"}, "goes with --into-existing"),
        ({"tables": ["t"], "into_existing": True, "rename_to": "c" * 64}, "longer than"),
        ({"schemas": ["s"], "force": True}, "never replaces a database"),
        ({"tables": ["t"], "jobs": 2}, "streams"),
    ]:
        with pytest.raises(SelectionError, match=message):
            selective_request(**kwargs)  # type: ignore[arg-type]


def test_what_is_said_of_a_table_added_to_a_live_database() -> None:
    plan = plan_selection(SHOP, Selection(tables=("sales.orders",)))
    said = plan.notices_into_existing("live")
    assert said[1] == "the table needs these to exist in 'live': SCHEMA sales, FUNCTION public.touch()"
    assert not any("restored too" in n for n in said)


@settings(max_examples=100)
@given(
    tables=st.sets(st.sampled_from(["public.customers", "sales.orders", "sales.notes", "public.m", "a.twin"])),
    schemas=st.sets(st.sampled_from(["public", "sales", "a", "b"])),
)
def test_a_plan_never_holds_an_entry_without_what_it_depends_on(tables: set[str], schemas: set[str]) -> None:
    shifted = [
        dataclasses.replace(e, dump_id=e.dump_id + 10000, dependencies=tuple(d + 10000 for d in e.dependencies))
        for e in TREES.entries[1:]
    ]
    archive = Archive(HEADER, "UTF8", (*SHOP.entries, *shifted))
    by_id = {e.dump_id: e for e in archive.entries}
    try:
        plan = plan_selection(archive, Selection(tuple(sorted(tables)), tuple(sorted(schemas))))
    except SelectionError:
        return  # refused before anything: fine (an empty selection, a partition without its parent, …)
    chosen = _ids(plan)
    order = [e.dump_id for e in archive.entries]
    assert [e.dump_id for e in plan.entries] == sorted(chosen, key=order.index)
    for entry in plan.entries:
        for dep in (by_id[d] for d in entry.dependencies):
            plain_sequence = entry.desc == "SEQUENCE" and entry.defn.startswith("CREATE SEQUENCE")
            assert dep.dump_id in chosen or (plain_sequence and dep.desc == "TABLE"), (entry, dep)
    assert not {3376, 3377} & chosen  # large objects never
