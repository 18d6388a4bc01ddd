"""PURE. What a backup holds, as a document: per schema its tables (owner, data size, rows) and how many
objects of every other kind it has, the large objects, and totals — built from a parsed archive.

Sizes are the bytes of each table's COPY data in the archive (pg_dump's text format, so close to what the
data weighs as text, not what it occupies on disk). Rows are counted, because they cost nothing: pg_dump's
COPY data is one line per row (newlines inside values are escaped), so a row is a ``\\n``. An archive
pg_dump compressed itself (not the agent's backups, which dump ``-Z0`` and compress the stream) has only
compressed sizes and no row counts, and the document says so (``size_unit``, ``rows`` null).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from kybdr_agent.backup.archive_toc import Archive

# Entries that are part of another object (its data, comment, grants, default, attachment) or of the
# archive itself, not objects of their own; tables and schemas are listed, not counted.
NOT_COUNTED: Final = frozenset(
    {
        "TABLE",
        "SCHEMA",
        "TABLE DATA",
        "COMMENT",
        "ACL",
        "SECURITY LABEL",
        "SEQUENCE SET",
        "SEQUENCE OWNED BY",
        "DEFAULT",
        "TABLE ATTACH",
        "INDEX ATTACH",
        "MATERIALIZED VIEW DATA",
        "ENCODING",
        "STDSTRINGS",
        "SEARCHPATH",
        "DATABASE",
        "DATABASE PROPERTIES",
        "BLOB",
        "BLOBS",
        "BLOB METADATA",
    }
)


def kind_key(desc: str) -> str:
    """``FK CONSTRAINT`` → ``fk_constraint``: a TOC entry type as a document key."""
    return desc.lower().replace(" ", "_")


@dataclass(frozen=True)
class TableContents:
    name: str
    owner: str | None
    data_bytes: int
    rows: int | None


@dataclass(frozen=True)
class SchemaContents:
    name: str
    owner: str | None
    tables: tuple[TableContents, ...]
    objects: dict[str, int]

    @property
    def data_bytes(self) -> int:
        return sum(t.data_bytes for t in self.tables)


@dataclass(frozen=True)
class Contents:
    backup_id: str
    database: str
    archive_version: str
    pg_dump_version: str
    server_version: str
    compression: str
    schemas: tuple[SchemaContents, ...]
    large_objects: int = 0
    large_object_bytes: int = 0
    other_objects: dict[str, int] = field(default_factory=dict)  # objects in no schema: extensions, …

    @property
    def size_unit(self) -> str:
        return "bytes" if self.compression == "none" else "compressed bytes"

    def as_dict(self) -> dict[str, Any]:
        tables = [t for s in self.schemas for t in s.tables]
        counted = self.compression == "none"
        objects: Counter[str] = Counter(self.other_objects)
        for schema in self.schemas:
            objects.update(schema.objects)
        return {
            "backup_id": self.backup_id,
            "database": self.database,
            "archive": {
                "format": "pg_dump custom",
                "version": self.archive_version,
                "pg_dump_version": self.pg_dump_version,
                "server_version": self.server_version,
                "compression": self.compression,
            },
            "size_unit": self.size_unit,
            "schemas": [
                {
                    "name": s.name,
                    "owner": s.owner,
                    "tables": [
                        {"name": t.name, "owner": t.owner, "data_bytes": t.data_bytes, "rows": t.rows} for t in s.tables
                    ],
                    "objects": dict(sorted(s.objects.items())),
                    "data_bytes": s.data_bytes,
                }
                for s in self.schemas
            ],
            "other_objects": dict(sorted(self.other_objects.items())),
            "large_objects": {"count": self.large_objects, "data_bytes": self.large_object_bytes},
            "totals": {
                "schemas": len(self.schemas),
                "tables": len(tables),
                "data_bytes": sum(t.data_bytes for t in tables) + self.large_object_bytes,
                "rows": sum(t.rows or 0 for t in tables) if counted else None,
                "objects": dict(sorted(objects.items())),
            },
        }


def summarize(archive: Archive, backup_id: str) -> Contents:
    """The document for ``archive`` (which must have been read to its end: sizes come from its data)."""
    counted = not archive.header.compressed
    data = {(e.namespace, e.tag): archive.data.get(e.dump_id) for e in archive.entries if e.desc == "TABLE DATA"}
    owners = {e.tag: e.owner for e in archive.entries if e.desc == "SCHEMA"}
    names = set(owners)
    tables: dict[str, list[TableContents]] = {}
    objects: dict[str, Counter[str]] = {}
    other: Counter[str] = Counter()
    lo_count = lo_bytes = 0
    for entry in archive.entries:
        if entry.desc == "BLOBS" and (stats := archive.data.get(entry.dump_id)) is not None:
            lo_count += stats.large_objects
            lo_bytes += stats.bytes
        if entry.desc == "TABLE" and entry.namespace is not None:
            stats = data.get((entry.namespace, entry.tag))
            size, rows = (stats.bytes, stats.rows) if stats is not None else (0, 0)
            names.add(entry.namespace)
            tables.setdefault(entry.namespace, []).append(
                TableContents(entry.tag, entry.owner, size, rows if counted else None)
            )
        elif entry.desc not in NOT_COUNTED:
            if entry.namespace is None:
                other[kind_key(entry.desc)] += 1
            else:
                names.add(entry.namespace)
                objects.setdefault(entry.namespace, Counter())[kind_key(entry.desc)] += 1
    schemas = tuple(
        SchemaContents(
            name,
            owners.get(name),
            tuple(sorted(tables.get(name, []), key=lambda t: t.name)),
            dict(objects.get(name, {})),
        )
        for name in sorted(names)
    )
    header = archive.header
    return Contents(
        backup_id=backup_id,
        database=header.database,
        archive_version=".".join(str(v) for v in header.version),
        pg_dump_version=header.pg_dump_version,
        server_version=header.server_version,
        compression=header.compression,
        schemas=schemas,
        large_objects=lo_count,
        large_object_bytes=lo_bytes,
        other_objects=dict(other),
    )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.1f} {units[0]}"


def render_text(document: dict[str, Any]) -> list[str]:
    """The document (``Contents.as_dict``, as the API sends it) as lines for a terminal: one line per table,
    then the other objects per schema."""
    unit = "" if document["size_unit"] == "bytes" else " (compressed)"
    pg_dump = str(document["archive"]["pg_dump_version"]).split()[0]
    lines = [f"backup {document['backup_id']} of {document['database']} (pg_dump {pg_dump})"]
    for schema in document["schemas"]:
        owner = f", owner {schema['owner']}" if schema["owner"] else ""
        lines.append(
            f"schema {schema['name']}{owner}: {len(schema['tables'])} tables, {_size(schema['data_bytes'])}{unit}"
        )
        for table in schema["tables"]:
            rows = "" if table["rows"] is None else f", {table['rows']} rows"
            lines.append(f"  {table['name']}: {_size(table['data_bytes'])}{rows} (owner {table['owner'] or '-'})")
        if schema["objects"]:
            lines.append("  also: " + ", ".join(f"{n} {k}" for k, n in sorted(schema["objects"].items())))
    if document["other_objects"]:
        others = sorted(document["other_objects"].items())
        lines.append("outside schemas: " + ", ".join(f"{n} {k}" for k, n in others))
    large = document["large_objects"]
    if large["count"]:
        lines.append(f"large objects: {large['count']}, {_size(large['data_bytes'])}{unit}")
    return lines
