"""PURE. A selective restore's request as the operator gives it: ``--table`` and ``--schema`` names read as SQL
reads them, the switches that go with them checked together, and the names a table added under a new name
gives its parts.

Names follow SQL, so that what works in psql works here: ``schema.table`` or ``table``; unquoted parts fold
to lower case (ASCII letters only, as PostgreSQL does), double-quoted ones are exact, ``""`` inside quotes
is a quote (``"My.Table"``, ``sales."Order""s"``). Every part must fit PostgreSQL's 63 bytes: a longer one
cannot name anything in a backup, so it is refused rather than searched for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from kybdr_agent.errors import KybdrError

MAX_IDENTIFIER_BYTES: Final = 63
_PLAIN: Final = re.compile(r"[a-z_][a-z0-9_$]*")


class SelectionError(KybdrError):
    """A selection that cannot be restored as asked; nothing was done."""


def _fold(part: str) -> str:
    """SQL's folding of an unquoted identifier: ASCII letters to lower case, nothing else."""
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in part)


def parse_name(text: str, *, most: int = 2) -> tuple[str, ...]:
    """``a.b`` → ("a", "b"); ``"A.b".c`` → ("A.b", "c"): the dotted parts of a name, unquoted and folded."""
    if not text or "\x00" in text:
        raise SelectionError(f"{text!r} is not a name")
    parts: list[str] = []
    pos = 0
    while True:
        if text.startswith('"', pos):
            pieces, start = [], pos + 1
            while True:
                close = text.find('"', start)
                if close < 0:
                    raise SelectionError(f"{text!r}: a double quote is not closed")
                pieces.append(text[start:close])
                if not text.startswith('"', close + 1):
                    break
                pieces.append('"')
                start = close + 2
            part, pos = "".join(pieces), close + 1
        else:
            dot = text.find(".", pos)
            raw = text[pos:] if dot < 0 else text[pos:dot]
            if '"' in raw or any(c.isspace() for c in raw):
                raise SelectionError(f'{text!r}: quote a name that holds spaces or quotes ("My Table")')
            part, pos = _fold(raw), pos + len(raw)
        if not part:
            raise SelectionError(f"{text!r} has an empty name in it")
        if len(part.encode()) > MAX_IDENTIFIER_BYTES:
            raise SelectionError(f"{text!r}: {part!r} is longer than PostgreSQL's {MAX_IDENTIFIER_BYTES} bytes")
        parts.append(part)
        if pos == len(text):
            break
        if text[pos] != "." or pos + 1 == len(text):
            raise SelectionError(f"{text!r}: expected a '.' between names, and a name after it")
        pos += 1
    if len(parts) > most:
        raise SelectionError(
            f"{text!r} has {len(parts)} dotted parts; at most {most} ({'schema.table' if most > 1 else 'schema'})"
        )
    return tuple(parts)


@dataclass(frozen=True)
class Selection:
    """``--table`` and ``--schema`` as given (each checked here: a bad name is refused before anything)."""

    tables: tuple[str, ...] = ()
    schemas: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.tables and not self.schemas:
            raise SelectionError("a selective restore needs at least one --table or --schema")
        self.table_names()
        self.schema_names()

    def table_names(self) -> list[tuple[str | None, str]]:
        found: list[tuple[str | None, str]] = []
        for text in self.tables:
            parts = parse_name(text)
            name = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
            if name not in found:
                found.append(name)
        return found

    def schema_names(self) -> list[str]:
        return list(dict.fromkeys(parse_name(text, most=1)[0] for text in self.schemas))


def selective_request(
    tables: Iterable[str] = (),
    schemas: Iterable[str] = (),
    *,
    into_existing: bool = False,
    rename_to: str | None = None,
    force: bool = False,
    jobs: int = 1,
) -> Selection | None:
    """A restore request's selection (None: a whole restore), refused if the switches do not go together —
    for the CLI and the API to call before a job starts."""
    tables, schemas = tuple(tables), tuple(schemas)
    if not tables and not schemas:
        if into_existing or rename_to is not None:
            raise SelectionError("--into-existing and --rename-to go with one --table")
        return None
    selection = Selection(tables, schemas)
    if into_existing:
        if schemas or len(selection.table_names()) != 1:
            raise SelectionError("--into-existing adds exactly one table: one --table, no --schema")
        if rename_to is None:
            raise SelectionError("--into-existing needs --rename-to NEW: the table is added under a new name")
        parse_name(rename_to, most=1)
    elif rename_to is not None:
        raise SelectionError("--rename-to goes with --into-existing")
    if force:
        raise SelectionError("a selective restore never replaces a database: --force does not go with --table/--schema")
    if jobs != 1:
        raise SelectionError("a selective restore streams: --jobs does not go with --table/--schema")
    return selection


def qualified(schema: str | None, name: str) -> str:
    """``schema.name`` as the user would type it: parts quoted where SQL needs it."""
    return ".".join(p if _PLAIN.fullmatch(p) else '"' + p.replace('"', '""') + '"' for p in (schema, name) if p)


def renamed(old: str, new: str, name: str, taken: Iterable[str]) -> str:
    """The name of one of ``old``'s indexes or sequences once the table is ``new``: ``old_pkey`` →
    ``new_pkey`` (else ``new_<name>``; the name itself if the table keeps its own), cut to 63 bytes and
    numbered until it is not in ``taken``."""
    prefix = "" if new == old else f"{new}_"
    base = new + name[len(old) :] if name.startswith(old) else prefix + name
    used = set(taken)
    for n in range(1, 1000):
        suffix = "" if n == 1 else f"_{n}"
        cut = base.encode()[: MAX_IDENTIFIER_BYTES - len(suffix)].decode("utf-8", "ignore")
        if cut + suffix not in used:
            return cut + suffix
    raise SelectionError(f"no free name for {name!r} after renaming {old!r} to {new!r}")
