"""Selective restore (``restore --table T --schema S``): some tables or schemas of a backup into a new
database, whole (indexes, constraints, sequences, triggers, grants, comments), never half-done. Adding one
table to a live database builds on this (``selective_existing``).

Which entries make up the selection is ``selective_plan``'s decision, from the archive's table of contents
(``contents.read_toc``: the first frames of the backup). It is made before anything is created, so a table
the backup does not hold is refused with nothing to undo. pg_restore then reads the whole verified stream
with ``--use-list`` naming those entries, in archive order — which is why a pipe is enough (no spool): it
only ever reads forward, skipping the data blocks of entries not listed. The list file holds ids and names,
no data; it lives 0600 in a private temporary directory and is removed afterwards.

Into a new database it goes like a full restore: a scratch database filled in one transaction from a stream
that verified to the end, renamed to the target only then, dropped otherwise. The target must not exist: a
selection never replaces a database (no ``--force``), and it streams (no ``--jobs``).

The roles the selected entries need (owners, grantees, tablespaces — read from the TOC, not from the whole
backup's schema, so a table is not refused for a role only other tables use) are checked as for a full
restore: missing ones refuse it with globals' message, ``with_globals`` creates them, ``no_owner`` needs none.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from kybdr_agent.backup.contents import read_toc
from kybdr_agent.backup.globals import missing_message, prepare_target, target_state
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.restore import Notice, RestoreResult, check_user_target, pg_restore_stream
from kybdr_agent.backup.scratch import RESTORE_PREFIX, drop_scratch, held, quote_ident, sweep_scratch
from kybdr_agent.backup.selection import Selection, qualified
from kybdr_agent.backup.selective_plan import SelectionPlan, plan_selection, selection_needs
from kybdr_agent.errors import DumpError, KybdrError
from kybdr_agent.postgres.connection import DATABASE_ERRORS, Connection, database_errors, pg_message
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.telemetry import get_logger

log = get_logger("kybdr_agent.selective")


def _ignore(_message: str) -> None:
    return None


@dataclass(frozen=True)
class SelectiveResult(RestoreResult):
    tables: tuple[str, ...] = ()  # schema.table of every table restored (or added)
    renamed: dict[str, str] = field(default_factory=dict)  # into an existing database: old name → new name


@dataclass
class SelectiveRun:
    """What every selective restore shares: the backup, where it reads it, how it reaches the server, what
    the operator asked of owners and roles, and whom it tells."""

    backup: Manifest
    store: BlobStore
    keyring: KeyRing | None
    connection: Connection
    maintenance_database: str
    no_owner: bool = False
    with_globals: bool = False
    notice: Notice = _ignore
    notices: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def say(self, message: str) -> None:
        self.notices.append(message)
        log.warning("restore.notice", backup_id=self.backup.id, message=message)
        self.notice(message)

    async def plan(self, selection: Selection, into_existing: str | None = None) -> SelectionPlan:
        """The plan, said before anything starts (for a table added to the database ``into_existing``: what
        it needs there)."""
        plan = plan_selection(await read_toc(self.backup, self.store, self.keyring), selection)
        for message in plan.notices if into_existing is None else plan.notices_into_existing(into_existing):
            self.say(message)
        return plan

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[Any]:
        """A session on the maintenance database, once the scratch databases earlier restores left are swept."""
        async with self.connection.connect(self.maintenance_database) as admin:
            with database_errors("sweeping scratch databases left by earlier restores"):
                swept = await sweep_scratch(admin)
            for name, error in swept.failed.items():
                self.say(f"could not drop the leftover scratch database {name}: {error}")
            yield admin

    async def check_roles(self, admin: Any, plan: SelectionPlan, pg_restore: str) -> dict[str, Any] | None:
        """The roles the selection needs: refused if missing, created with ``with_globals``, none with
        ``no_owner`` — globals.prepare_target's rules, for the selected entries only."""
        if self.with_globals:
            return await prepare_target(
                self.backup,
                admin=admin,
                store=self.store,
                keyring=self.keyring,
                connection=self.connection,
                pg_restore=pg_restore,
                with_globals=True,
                no_owner=self.no_owner,
                say=self.say,
            )
        if not self.no_owner:
            needs, state = selection_needs(plan), await target_state(admin)
            roles, spaces = sorted(needs.roles - state.roles), sorted(needs.tablespaces - state.tablespaces)
            if roles or spaces:
                raise KybdrError(missing_message(self.backup, roles, spaces))
        return None

    @asynccontextmanager
    async def scratch(self, admin: Any) -> AsyncIterator[str]:
        """A new scratch database, held for the block (no sweep takes it) and dropped if the block fails; one
        that succeeds renames it or drops it (``drop``) itself."""
        name = f"{RESTORE_PREFIX}{secrets.token_hex(6)}"
        async with held(admin, name):
            try:
                with database_errors("creating the scratch database for the restore"):
                    await admin.execute(f"create database {quote_ident(name)} template template0")
                yield name
            except BaseException:
                await self.drop(admin, name)  # by its scratch name: never what it was renamed to
                raise

    async def drop(self, admin: Any, name: str) -> None:
        error = await drop_scratch(admin, name)  # bounded and shielded
        if error is not None:
            self.say(f"could not drop the scratch database {name}: {error}")

    def result(self, target: str, dump_bytes: int, tables: tuple[str, ...], **more: Any) -> SelectiveResult:
        return SelectiveResult(
            backup_id=self.backup.id,
            target_database=target,
            replaced_existing=False,
            dump_bytes=dump_bytes,
            seconds=round(time.monotonic() - self.started, 3),
            notices=self.notices,
            tables=tables,
            **more,
        )


async def database_exists(admin: Any, database: str) -> bool:
    with database_errors(f"checking database {database!r}"):
        return bool(await admin.fetchval("select true from pg_database where datname = $1", database))


async def restore_selection(run: SelectiveRun, selection: Selection, target: str) -> SelectiveResult:
    """Restore ``selection`` of ``run.backup`` into the new database ``target`` (which must not exist)."""
    check_user_target(target)
    plan = await run.plan(selection)
    async with run.admin() as admin:
        if await database_exists(admin, target):
            raise KybdrError(
                f"database {target!r} exists; a selective restore (--table, --schema) creates a new database: "
                "choose another --target-database, or add one table to it with --into-existing --rename-to"
            )
        pg_restore = run.connection.binary("pg_restore", admin.get_server_version().major)
        applied = await run.check_roles(admin, plan, pg_restore)
        async with run.scratch(admin) as scratch:
            dump_bytes = await restore_list(run, plan, scratch, pg_restore, admin)
            with anyio.CancelScope(shield=True):
                try:
                    await admin.execute(f"alter database {quote_ident(scratch)} rename to {quote_ident(target)}")
                except DATABASE_ERRORS as exc:
                    raise DumpError(f"could not name the restored database {target!r}: {pg_message(exc)}") from None
    return run.result(target, dump_bytes, tuple(qualified(s, t) for s, t in plan.tables), globals=applied)


@asynccontextmanager
async def _list_file(plan: SelectionPlan) -> AsyncIterator[Path]:
    """The ``--use-list`` file, 0600 in a 0700 directory of its own, removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix="kybdr-list-"))
    try:
        path = folder / "restore.list"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(plan.list_file())
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def restore_list(run: SelectiveRun, plan: SelectionPlan, database: str, pg_restore: str, session: Any) -> int:
    """Fill ``database`` (a scratch database) with the entries of ``plan``: pg_restore --use-list in one
    transaction, fed the stream; returns only once the whole stream verified and pg_restore exited 0, which
    is often long before the stream's end (``restore.pg_restore_stream``). A stream that fails before
    pg_restore is done kills it mid-transaction; one that fails after it committed fails this all the same,
    and the caller drops the database."""
    async with _list_file(plan) as listing:
        return await pg_restore_stream(
            database,
            run.backup,
            run.store,
            run.keyring,
            run.connection,
            pg_restore,
            run.no_owner,
            session=session,
            use_list=listing,
        )
