"""``restore --table T --into-existing --rename-to NEW``: one table of a backup added to a live database under a
new name, whole (indexes, constraints, owned sequences, triggers, grants, comments), refusing to overwrite
anything.

How, and why this way: the table is restored into a scratch database exactly as a selective restore does
(``selective.restore_list``: the verified stream, pg_restore ``--use-list``, one transaction), renamed
there — its indexes and owned sequences too, since ``orders_pkey`` or ``orders_id_seq`` would collide with
the live table's — and then ``pg_dump -t`` of it is piped into ``pg_restore --single-transaction
--exit-on-error`` on the live database. The live database sees one transaction that creates the table and
its parts and commits only if all of it worked: a name taken meanwhile fails the CREATE and nothing
changes, and no work in progress (a temporary schema, a half-loaded table) is ever visible there, as it
would be restoring into the live database and renaming afterwards. The names are checked first for a clear
message; the transaction is what makes it safe. The scratch database is dropped whatever happens.

The new table lands in the schema the backup's table was in (which must exist); its owner and grants are
the source's, the roles checked first as for any restore (or ``--no-owner``, ``--with-globals``). A table
dropped by mistake comes back under its own name (``--rename-to`` the same name): its parts then keep theirs
where the live database leaves them free.

The live database is named to pg_restore as a quoted ``dbname='…'``: pg_restore reads a ``--dbname`` holding
``=`` (or a URI) as a whole connection string, so a database name like ``dbname=prod`` would otherwise send
the table into another database than the one checked.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

from kybdr_agent.asyncutil import TailBuffer, task_group
from kybdr_agent.backup.pgdump import child_process, drain_into, failure_message
from kybdr_agent.backup.restore import check_user_target
from kybdr_agent.backup.scratch import quote_ident
from kybdr_agent.backup.selection import Selection, SelectionError, parse_name, qualified, renamed
from kybdr_agent.backup.selective import SelectiveResult, SelectiveRun, database_exists, restore_list
from kybdr_agent.errors import DumpError, KybdrError
from kybdr_agent.postgres.connection import database_errors
from kybdr_agent.postgres.conninfo import dbname_only

COPY_CHUNK: Final = 1 << 20


async def restore_into_existing(
    run: SelectiveRun, selection: Selection, target: str, rename_to: str
) -> SelectiveResult:
    """Add the one table of ``selection`` to the existing database ``target`` as ``rename_to`` (in the table's
    own schema), with its indexes, constraints, owned sequences, triggers, grants and comments; refused, with
    nothing changed, if the name is taken."""
    check_user_target(target)
    if selection.schemas or len(selection.table_names()) != 1:
        raise SelectionError("--into-existing adds exactly one table: one --table, no --schema")
    (new,) = parse_name(rename_to, most=1)
    plan = await run.plan(selection, into_existing=target)
    if len(plan.tables) != 1:
        raise SelectionError(
            f"{qualified(*plan.tables[0])} is partitioned ({len(plan.tables) - 1} partitions): --into-existing adds "
            "one plain table; restore it into a new database instead"
        )
    schema, old = plan.tables[0]
    async with run.admin() as admin:
        if not await database_exists(admin, target):
            raise KybdrError(f"database {target!r} does not exist; --into-existing adds a table to an existing one")
        async with run.connection.connect(target) as live:
            await _check_free(live, target, schema, new)
        major = admin.get_server_version().major
        pg_restore, pg_dump = run.connection.binary("pg_restore", major), run.connection.binary("pg_dump", major)
        applied = await run.check_roles(admin, plan, pg_restore)
        async with run.scratch(admin) as scratch:
            dump_bytes = await restore_list(run, plan, scratch, pg_restore, admin)
            async with run.connection.connect(scratch) as copy, run.connection.connect(target) as live:
                names = await _rename(copy, live, schema, old, new)
            await _copy_table(run, scratch, target, qualified(schema, new), pg_dump, pg_restore, admin)
            await run.drop(admin, scratch)
    run.say(f"added {qualified(schema, new)} to {target!r} (the backup's {qualified(schema, old)})")
    return run.result(target, dump_bytes, (qualified(schema, new),), renamed=names, globals=applied)


async def _check_free(live: Any, target: str, schema: str, name: str) -> None:
    with database_errors(f"checking names in {target!r}"):
        if not await live.fetchval("select true from pg_namespace where nspname = $1", schema):
            raise SelectionError(
                f"database {target!r} has no schema {schema!r} for the table; nothing was changed: create the "
                "schema first"
            )
        taken = await live.fetchval(
            "select coalesce((select c.relkind::text from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = $1 and c.relname = $2), (select 'type' from pg_type t join pg_namespace n on "
            "n.oid = t.typnamespace where n.nspname = $1 and t.typname = $2))",
            schema,
            name,
        )
    if taken is not None:
        raise SelectionError(
            f"database {target!r} already has {qualified(schema, name)} (a relation or type of that name); "
            "nothing was changed: choose another --rename-to"
        )


_INDEXES: Final = (
    "select n.nspname, c.relname from pg_index i join pg_class c on c.oid = i.indexrelid "
    "join pg_namespace n on n.oid = c.relnamespace where i.indrelid = $1 order by 2"
)
_SEQUENCES: Final = (  # owned (serial) and identity sequences
    "select n.nspname, c.relname from pg_depend d join pg_class c on c.oid = d.objid "
    "join pg_namespace n on n.oid = c.relnamespace where d.classid = 'pg_class'::regclass "
    "and d.refclassid = 'pg_class'::regclass and d.refobjid = $1 and c.relkind = 'S' and d.deptype in ('a', 'i') "
    "order by 2"
)
_NAMES: Final = (
    "select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
    "where n.nspname = any($1::text[])"
)


async def _rename(copy: Any, live: Any, schema: str, old: str, new: str) -> dict[str, str]:
    """Rename the restored table in the scratch database to ``new``, and its indexes and owned sequences so that
    none collides with a name in the live database (``old_pkey`` → ``new_pkey``; under its own name a part
    keeps its name where it is free); old → new qualified names."""
    with database_errors("renaming the restored table in the scratch database"):
        oid = await copy.fetchval(
            "select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = $1 and c.relname = $2",
            schema,
            old,
        )
        parts = [("INDEX", r["nspname"], r["relname"]) for r in await copy.fetch(_INDEXES, oid)]
        parts += [("SEQUENCE", r["nspname"], r["relname"]) for r in await copy.fetch(_SEQUENCES, oid)]
        spaces = sorted({schema, *(s for _, s, _ in parts)})
        in_live = {(r["nspname"], r["relname"]) for r in await live.fetch(_NAMES, spaces)}
        taken = in_live | {(r["nspname"], r["relname"]) for r in await copy.fetch(_NAMES, spaces)}
        names = {qualified(schema, old): qualified(schema, new)}
        # Under its own name (a dropped table brought back) the table is not renamed: ALTER … RENAME to the
        # same name fails ("already exists").
        statements = (
            [] if new == old else [f"alter table {quote_ident(schema)}.{quote_ident(old)} rename to {quote_ident(new)}"]
        )
        for kind, space, name in parts:
            if (space, name) not in in_live:
                taken.discard((space, name))  # its own name in the scratch database is no obstacle
            fresh = renamed(old, new, name, {n for s, n in taken if s == space})
            taken.add((space, fresh))
            if fresh != name:
                names[qualified(space, name)] = qualified(space, fresh)
                statements.append(
                    f"alter {kind} {quote_ident(space)}.{quote_ident(name)} rename to {quote_ident(fresh)}"
                )
        async with copy.transaction():
            for sql in statements:
                await copy.execute(sql)
    return names


async def _copy_table(
    run: SelectiveRun, scratch: str, target: str, table: str, pg_dump: str, pg_restore: str, session: Any
) -> None:
    """``pg_dump -t table scratch | pg_restore --single-transaction target``, through this process, which holds
    back the last chunk until pg_dump has exited 0: pg_restore cannot reach the archive's end, and so cannot
    commit, before the dump is known to be whole (else pg_restore is killed mid-transaction)."""
    owner = ["--no-owner", "--no-acl"] if run.no_owner else []
    dump_argv = [pg_dump, "--format=custom", "--compress=0", "--no-password", "--strict-names", f"--table={table}"]
    load_argv = [
        pg_restore,
        "--exit-on-error",
        "--single-transaction",
        "--no-password",
        f"--dbname={dbname_only(target)}",
        *owner,
    ]
    dump_err, load_err = TailBuffer(), TailBuffer()
    async with (
        child_process(
            dump_argv + owner,
            env=run.connection.child_env(scratch, session),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        ) as dump,
        child_process(
            load_argv,
            env=run.connection.child_env(target, session),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        ) as load,
    ):
        assert dump.stdout is not None
        assert load.stdin is not None
        source, sink = dump.stdout, load.stdin
        async with task_group() as tg:
            tg.start_soon(drain_into, dump.stderr, dump_err)
            tg.start_soon(drain_into, load.stderr, load_err)
            held_back = b""
            try:
                while chunk := await source.read(COPY_CHUNK):
                    if held_back:
                        sink.write(held_back)
                        await sink.drain()
                    held_back = chunk
                dumped = await dump.wait()
                if dumped != 0:
                    with contextlib.suppress(ProcessLookupError):
                        load.kill()
                    raise DumpError(failure_message("pg_dump of the restored table", dumped, dump_err))
                sink.write(held_back)
                await sink.drain()
            except (BrokenPipeError, ConnectionResetError):
                raise DumpError(failure_message(f"pg_restore into {target!r}", await load.wait(), load_err)) from None
            sink.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await sink.wait_closed()
            loaded = await load.wait()
        if loaded != 0:
            raise DumpError(failure_message(f"pg_restore into {target!r}", loaded, load_err))
