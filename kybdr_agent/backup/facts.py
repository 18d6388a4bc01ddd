"""Facts about a database recorded at backup time, so a restore drill can prove what came back.

Row counts are taken on the connection that exported pg_dump's snapshot, inside that snapshot, so they
describe exactly the data in the dump even while the database keeps changing. Counting reads the tables,
so it is bounded: tables larger than a cap are skipped (and the skip is visible: they are simply absent).
"""

from __future__ import annotations

from typing import Any, Final

import asyncpg

DEFAULT_MAX_TABLE_BYTES: Final = 64 << 20
DEFAULT_MAX_TOTAL_BYTES: Final = 256 << 20

_TABLES: Final = """
select quote_ident(n.nspname) || '.' || quote_ident(c.relname) as name, pg_relation_size(c.oid) as bytes
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relkind = 'r' and n.nspname not in ('pg_catalog', 'information_schema')
  and has_table_privilege(c.oid, 'SELECT')
  and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp%'
order by pg_relation_size(c.oid), 1
"""


async def table_sizes(conn: Any) -> list[tuple[str, int]]:
    return [(row["name"], int(row["bytes"])) for row in await conn.fetch(_TABLES)]


async def row_counts(
    conn: Any,
    *,
    max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    only: set[str] | None = None,
    into: dict[str, int] | None = None,
) -> dict[str, int]:
    """Exact row counts of user tables, smallest first, within the byte caps (``only`` restricts the set).

    Counts land in ``into`` as they are taken, so a caller whose session dies midway keeps those done."""
    counts: dict[str, int] = {} if into is None else into
    budget = max_total_bytes
    for name, size in await table_sizes(conn):
        if only is not None and name not in only:
            continue
        if only is None and (size > max_table_bytes or size > budget):
            continue
        budget -= size
        # A savepoint, so a failing count (a lock timeout, a policy) never aborts the snapshot's
        # transaction that pg_dump depends on; such a table is just not counted. By hand, because the
        # snapshot's transaction is begun by hand (asyncpg refuses its savepoint helper inside one).
        in_transaction = conn.is_in_transaction()
        if in_transaction:
            await conn.execute("savepoint kybdr_count")
        try:
            query = f"select count(*) from {name}"  # noqa: S608 - name comes from quote_ident
            counts[name] = int(await conn.fetchval(query))
        except asyncpg.PostgresError:
            if in_transaction:
                await conn.execute("rollback to savepoint kybdr_count")
        if in_transaction:
            await conn.execute("release savepoint kybdr_count")
    return counts
