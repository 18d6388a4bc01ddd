"""PURE. Which entries of a backup's archive a selective restore (``--table``, ``--schema``) restores, and the
``pg_restore --use-list`` file that says so.

Why not ``pg_restore -t``: it restores the table and its data only — no indexes, constraints, triggers,
owned sequences, defaults, grants or comments, not even its schema — so the table comes back crippled. The
archive's table of contents knows better: every entry lists the entries it depends on. A selection is the
tables (or every object of the schemas) asked for, plus

* what belongs to them — data, indexes, constraints, triggers, rules, policies, defaults, comments, grants,
  their owned and identity sequences with their values, a partitioned table's partitions — taken when every
  dependency it has is selected (or can be brought along, below). A foreign key to a table that is not
  selected cannot be: it is left out and said in ``notices``;
* what they cannot be created without — their schemas, the functions their triggers call, the types,
  domains, sequences and extensions they use — brought along even from other schemas, and said.

A table that needs another *table* (a partition of, or a child inheriting from, one not selected; a view
over one) is refused before anything is created, naming what to add. Large objects belong to no table and
are not restored by a selection.

An unqualified table name (``selection``) is looked up in every schema of the backup and must be unique
there — no ``public`` default: the backup says where it is, or that it is ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from kybdr_agent.backup.archive_toc import Archive, TocEntry, describe
from kybdr_agent.backup.globals_plan import SchemaNeeds
from kybdr_agent.backup.globals_sql import StatementReader
from kybdr_agent.backup.selection import Selection, SelectionError, qualified

RELATIONS: Final = frozenset({"TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE"})
# Objects a selected entry may need that are not relations: brought along with the selection.
SUPPORT: Final = frozenset(
    {
        "SCHEMA",
        "EXTENSION",
        "TYPE",
        "SHELL TYPE",
        "DOMAIN",
        "FUNCTION",
        "PROCEDURE",
        "AGGREGATE",
        "SEQUENCE",
        "COLLATION",
        "CONVERSION",
        "OPERATOR",
        "OPERATOR CLASS",
        "OPERATOR FAMILY",
        "CAST",
        "TEXT SEARCH PARSER",
        "TEXT SEARCH TEMPLATE",
        "TEXT SEARCH DICTIONARY",
        "TEXT SEARCH CONFIGURATION",
        "PROCEDURAL LANGUAGE",
        "FOREIGN DATA WRAPPER",
        "SERVER",
        "ACCESS METHOD",
        "TRANSFORM",
    }
)
# Entries that are part of other objects: selected when everything they depend on is.
BELONGING: Final = frozenset(
    {
        "TABLE DATA",
        "SEQUENCE SET",
        "SEQUENCE OWNED BY",
        "DEFAULT",
        "CONSTRAINT",
        "CHECK CONSTRAINT",
        "FK CONSTRAINT",
        "INDEX",
        "INDEX ATTACH",
        "TABLE ATTACH",
        "TRIGGER",
        "RULE",
        "POLICY",
        "ROW SECURITY",
        "STATISTICS",
        "COMMENT",
        "ACL",
        "SECURITY LABEL",
        "MATERIALIZED VIEW DATA",
        "PUBLICATION TABLE",
        "PUBLICATION TABLES IN SCHEMA",
    }
)
SESSION: Final = frozenset({"ENCODING", "STDSTRINGS", "SEARCHPATH"})  # pg_restore's settings, always in


class _Graph:
    def __init__(self, entries: tuple[TocEntry, ...]) -> None:
        self.by_id = {e.dump_id: e for e in entries}

    def deps(self, entry: TocEntry) -> list[TocEntry]:
        found = [self.by_id[d] for d in entry.dependencies if d in self.by_id]
        if entry.desc == "SEQUENCE OWNED BY":  # it names the owning table, which only the sequence's deps show
            found += [d for s in list(found) for d in self.deps(s) if d.desc in RELATIONS]
        return found


@dataclass(frozen=True)
class SelectionPlan:
    entries: tuple[TocEntry, ...]  # in archive order
    tables: tuple[tuple[str, str], ...]  # (schema, table) of every table restored
    left_out: tuple[str, ...] = ()  # "not restored: …" for each part of a selected table that cannot be
    brought: tuple[str, ...] = ()  # what the selection needs from outside it: schemas, functions, types…
    large_objects: bool = False  # the backup has some (a selection never restores them)

    @property
    def notices(self) -> tuple[str, ...]:
        """What a restore of the plan into a new database says before it starts."""
        brought = [f"restored too, because the selection needs them: {', '.join(self.brought)}"] if self.brought else []
        return (*self.left_out, *brought, *self._lo_notice())

    def _lo_notice(self) -> list[str]:
        return ["the backup's large objects are not part of a selective restore"] if self.large_objects else []

    def notices_into_existing(self, target: str) -> tuple[str, ...]:
        """The same for a table added to ``target``: what it needs must already be there (only the table is
        copied into it), so that is what is said of it."""
        needs = [f"the table needs these to exist in {target!r}: {', '.join(self.brought)}"] if self.brought else []
        return (*self.left_out, *needs, *self._lo_notice())

    def list_file(self) -> str:
        """The ``pg_restore --use-list`` text: the entries' ids in archive order (pg_restore restores in list
        order, and reading a pipe it can only go forward). After the ``;`` is a comment, kept to one line."""
        lines = ["; kybdr-agent selective restore"]
        for e in self.entries:
            note = "".join(c if c.isprintable() else "?" for c in describe(e))
            lines.append(f"{e.dump_id}; {note}")
        return "\n".join(lines) + "\n"


def _resolve_tables(entries: tuple[TocEntry, ...], wanted: list[tuple[str | None, str]]) -> list[TocEntry]:
    tables = [e for e in entries if e.desc == "TABLE" and e.namespace is not None]
    found: list[TocEntry] = []
    problems: list[str] = []
    for schema, name in wanted:
        hits = [t for t in tables if t.tag == name and (schema is None or t.namespace == schema)]
        if len(hits) == 1:
            found.append(hits[0])
        elif hits:
            names = ", ".join(qualified(t.namespace, t.tag) for t in hits)
            problems.append(f"{name!r} is in several schemas ({names}): name one as schema.table")
        else:
            other = [
                e for e in entries if e.desc in RELATIONS and e.tag == name and e.namespace == (schema or e.namespace)
            ]
            like = [
                t
                for t in tables
                if t.tag.lower() == name.lower() and (schema is None or (t.namespace or "").lower() == schema.lower())
            ]
            hint = (
                f" ({describe(other[0])} is a {other[0].desc.lower()}, not a table)"
                if other
                else f" (did you mean {', '.join(repr(qualified(t.namespace, t.tag)) for t in like)}? quote mixed case)"
                if like
                else ""
            )
            problems.append(f"no table {qualified(schema, name)}{hint}")
    if problems:
        raise SelectionError("the backup holds " + "; ".join(problems) + "; nothing was restored")
    return list(dict.fromkeys(found))


def plan_selection(archive: Archive, selection: Selection) -> SelectionPlan:
    """The entries restoring ``selection`` whole; ``SelectionError`` for a name the backup does not hold or a
    table that needs one not selected."""
    entries = archive.entries
    graph = _Graph(entries)
    by_id, deps = graph.by_id, graph.deps
    tables = _resolve_tables(entries, selection.table_names())
    chosen: set[int] = {t.dump_id for t in tables}
    missing_schemas = []
    for schema in selection.schema_names():
        members = [e for e in entries if (e.desc == "SCHEMA" and e.tag == schema) or e.namespace == schema]
        if not members:
            missing_schemas.append(schema)
        chosen.update(e.dump_id for e in members if e.desc not in BELONGING)
    if missing_schemas:
        raise SelectionError(
            f"the backup holds no schema {', '.join(map(repr, missing_schemas))}; nothing was restored"
        )
    asked = set(chosen)

    changed = True
    while changed:
        changed = False
        stack = list(chosen)
        while stack:  # what the chosen cannot be created without
            for dep in deps(by_id[stack.pop()]):
                if dep.dump_id not in chosen and dep.desc in SUPPORT:
                    chosen.add(dep.dump_id)
                    stack.append(dep.dump_id)
        for entry in entries:
            if entry.dump_id in chosen:
                continue
            need = deps(entry)
            if entry.desc == "TABLE ATTACH":
                parents = [d for d in need if d.desc == "TABLE" and d.tag != entry.tag]
                take = bool(parents) and all(p.dump_id in chosen for p in parents)
                extra = [d.dump_id for d in need if d.desc == "TABLE"]
            elif entry.desc == "SEQUENCE":  # an owned or identity sequence of a chosen table
                take = any(d.dump_id in chosen and d.desc in RELATIONS for d in need)
                extra = []
            else:
                take = (
                    entry.desc in BELONGING
                    and any(d.dump_id in chosen for d in need)
                    and all(d.dump_id in chosen or d.desc in SUPPORT for d in need)
                )
                extra = []
            if take:
                chosen.add(entry.dump_id)
                chosen.update(extra)
                changed = True

    _check_relations([by_id[i] for i in chosen], chosen, graph)
    picked = tuple(e for e in entries if e.dump_id in chosen or e.desc in SESSION)
    return SelectionPlan(
        picked,
        _tables(picked),
        left_out=tuple(_left_out(archive, chosen, graph)),
        brought=tuple(_brought(archive, chosen, asked, graph)),
        large_objects=any(e.desc == "BLOBS" for e in archive.entries),
    )


def _check_relations(chosen_entries: list[TocEntry], chosen: set[int], graph: _Graph) -> None:
    problems = []
    for entry in chosen_entries:
        # A plain sequence is created without its owner table (only its OWNED BY, left out, names it).
        if entry.desc == "SEQUENCE" and entry.defn.lstrip().upper().startswith("CREATE SEQUENCE"):
            continue
        lacking = [d for d in graph.deps(entry) if d.desc in RELATIONS and d.dump_id not in chosen]
        for dep in lacking:
            problems.append(f"{describe(entry)} needs {describe(dep)}")
    if problems:
        raise SelectionError(
            "the selection cannot be restored on its own: "
            + "; ".join(sorted(set(problems)))
            + "; add what it needs with --table (or its --schema); nothing was restored"
        )


def _tables(picked: tuple[TocEntry, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((e.namespace, e.tag) for e in picked if e.desc == "TABLE" and e.namespace is not None)


def _left_out(archive: Archive, chosen: set[int], graph: _Graph) -> list[str]:
    out = []
    for entry in archive.entries:
        if entry.dump_id in chosen or entry.desc not in BELONGING:
            continue
        need = graph.deps(entry)
        own = [
            d
            for d in need
            if d.desc in RELATIONS and d.namespace == entry.namespace and entry.tag.startswith(d.tag + " ")
        ]
        if not own or own[0].dump_id not in chosen:
            continue  # not about a selected table (a foreign key of another table pointing at one, say)
        lacking = sorted({describe(d) for d in need if d.dump_id not in chosen and d.desc in RELATIONS})
        if lacking:
            out.append(f"not restored: {describe(entry)}, which needs {', '.join(lacking)} (not selected)")
    return out


def _brought(archive: Archive, chosen: set[int], asked: set[int], graph: _Graph) -> list[str]:
    added = chosen - asked
    return [
        describe(e)
        for e in archive.entries
        if e.dump_id in added
        and e.desc in SUPPORT
        and not any(d.dump_id in chosen and d.desc in RELATIONS for d in graph.deps(e))  # not an owned sequence
    ]


def selection_needs(plan: SelectionPlan) -> SchemaNeeds:
    """The roles and tablespaces restoring ``plan`` needs: its entries' owners and tablespaces, and every
    role their statements name (grantees in ACLs, policy roles, …), read like a schema script."""
    needs = SchemaNeeds()
    reader = StatementReader()

    def add(text: str) -> None:
        # SchemaNeeds reads scripts as latin-1 text and decodes names by their client_encoding.
        for stmt in reader.feed(text.encode("utf-8").decode("latin-1")):
            needs.add(stmt)

    add("SET client_encoding = 'UTF8';\n")
    for entry in plan.entries:
        if entry.owner:
            needs.roles.add(entry.owner)
        if entry.tablespace:
            needs.tablespaces.add(entry.tablespace)
        if entry.defn and entry.desc not in SESSION:
            add(entry.defn + "\n;\n")
    for stmt in reader.finish():
        needs.add(stmt)
    return needs
