"""Restore: repository → verify → decrypt → decompress → ``pg_restore``, into a database that appears only
when everything checked out.

The restore goes into a fresh scratch database (``kybdr_restore_<random>``) inside one transaction
(``--single-transaction --exit-on-error``). Only when the whole stream has authenticated, the totals match
the manifest and pg_restore has exited 0 is the scratch database renamed to the target. So a wrong key, a
corrupt or truncated object, or a failing pg_restore leaves no target that looks restored — and with
``--force`` the old target survives until the new one is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

import anyio
import asyncpg

from kybdr_agent.asyncutil import TailBuffer, task_group
from kybdr_agent.backup.decode import stream_backup
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.pgdump import Connection, child_process, database_errors, drain_into, failure_message
from kybdr_agent.errors import DumpError, KybdrError
from kybdr_agent.storage.base import BlobStore

MAX_IDENTIFIER_BYTES: Final = 63
CLEANUP_DEADLINE: Final = 60.0


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    target_database: str
    replaced_existing: bool
    dump_bytes: int
    seconds: float


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def check_target_name(name: str) -> str:
    if not name or len(name.encode()) > MAX_IDENTIFIER_BYTES or "\x00" in name:
        raise KybdrError(f"{name!r} is not a usable database name (1 to {MAX_IDENTIFIER_BYTES} bytes)")
    if name in ("template0", "template1"):
        raise KybdrError(f"refusing to restore over {name}")
    return name


_USER_OBJECTS: Final = """
select (select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname not in ('pg_catalog', 'information_schema')
           and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp%')
     + (select count(*) from pg_largeobject_metadata)
     + (select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname not in ('pg_catalog', 'information_schema'))
"""


async def restore_backup(
    backup: Manifest,
    *,
    store: BlobStore,
    keyring: KeyRing | None,
    connection: Connection,
    maintenance_database: str,
    target: str,
    force: bool = False,
    no_owner: bool = False,
) -> RestoreResult:
    check_target_name(target)
    started = time.monotonic()
    scratch = f"kybdr_restore_{secrets.token_hex(6)}"
    async with connection.connect(maintenance_database) as admin:
        server_major = admin.get_server_version().major
        with database_errors(f"checking the target database {target!r}"):
            exists = bool(await admin.fetchval("select true from pg_database where datname = $1", target))
        if exists:
            async with connection.connect(target) as existing:
                with database_errors(f"inspecting database {target!r}"):
                    objects = int(await existing.fetchval(_USER_OBJECTS))
            if objects and not force:
                raise KybdrError(
                    f"database {target!r} exists and is not empty ({objects} objects); "
                    "choose another --target-database or pass --force to replace it"
                )
        pg_restore = connection.binary("pg_restore", server_major)
        with database_errors("creating the scratch database for the restore"):
            await admin.execute(f"create database {quote_ident(scratch)} template template0")
        try:
            stats_bytes = await _pg_restore_into(scratch, backup, store, keyring, connection, pg_restore, no_owner)
        except BaseException:
            with anyio.move_on_after(CLEANUP_DEADLINE, shield=True), contextlib.suppress(Exception):
                await admin.execute(f"drop database if exists {quote_ident(scratch)} with (force)")
            raise
        # The restored copy is complete. From here on it is the only good copy once the old target is
        # dropped, so the swap is shielded from cancellation and a failure never drops the scratch database.
        with anyio.CancelScope(shield=True):
            await _swap_in(admin, scratch, target, replace=exists)
    return RestoreResult(
        backup_id=backup.id,
        target_database=target,
        replaced_existing=exists,
        dump_bytes=stats_bytes,
        seconds=round(time.monotonic() - started, 3),
    )


async def _swap_in(admin: Any, scratch: str, target: str, *, replace: bool) -> None:
    dropped = False
    try:
        if replace:
            await admin.execute(f"drop database {quote_ident(target)} with (force)")
            dropped = True
        await admin.execute(f"alter database {quote_ident(scratch)} rename to {quote_ident(target)}")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        if not dropped:
            with anyio.move_on_after(CLEANUP_DEADLINE), contextlib.suppress(Exception):
                await admin.execute(f"drop database if exists {quote_ident(scratch)} with (force)")
            raise DumpError(f"could not put the restored database in place of {target!r}: {exc}") from None
        raise DumpError(
            f"the old {target!r} was dropped but renaming the restored copy failed ({exc}); the restored data "
            f"is complete in database {scratch!r}: rename it with ALTER DATABASE {quote_ident(scratch)} "
            f"RENAME TO {quote_ident(target)}"
        ) from None


async def _pg_restore_into(
    database: str,
    backup: Manifest,
    store: BlobStore,
    keyring: KeyRing | None,
    connection: Connection,
    pg_restore: str,
    no_owner: bool,
) -> int:
    argv = [pg_restore, "--exit-on-error", "--single-transaction", "--no-password", f"--dbname={database}"]
    if no_owner:
        argv += ["--no-owner", "--no-acl"]
    stderr = TailBuffer()
    async with child_process(
        argv,
        env=connection.child_env(database),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    ) as proc:
        assert proc.stdin is not None
        stdin = proc.stdin

        async def feed(data: bytes) -> None:
            stdin.write(data)
            try:
                await stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                raise DumpError(failure_message("pg_restore", await proc.wait(), stderr)) from None

        async with task_group() as tg:
            tg.start_soon(drain_into, proc.stderr, stderr)
            try:
                stats = await stream_backup(lambda: store.read(backup.object_key), backup, keyring, feed)
            except BaseException:
                # Never let pg_restore see end-of-input for a stream that did not verify: kill it
                # mid-transaction so nothing it did is committed.
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                raise
            # Everything verified: end of input lets pg_restore commit.
            stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await stdin.wait_closed()
            returncode = await proc.wait()
        if returncode != 0:
            raise DumpError(failure_message("pg_restore", returncode, stderr))
    return stats.dump_bytes
