"""Restore: repository → verify → decrypt → decompress → ``pg_restore``, into a database that appears only
when everything checked out.

The restore goes into a fresh scratch database (``kybdr_restore_<random>``) inside one transaction
(``--single-transaction --exit-on-error``). Only when the whole stream has authenticated, the totals match
the manifest and pg_restore has exited 0 is the scratch database renamed to the target. So a wrong key, a
corrupt or truncated object, or a failing pg_restore leaves no target that looks restored — and with
``--force`` the old target survives until the new one is complete.

Before the scratch database is created, ``globals.prepare_target`` makes sure the server has every role the
backup names (owners, grantees): it refuses the restore with one message naming the missing ones, or, with
``with_globals``, creates them from the roles recorded with the backup. ``no_owner`` needs no roles.

With ``jobs`` > 1 the pre-data and data sections stream through one pg_restore as above (one transaction),
and once the whole stream verified the post-data section — indexes, constraints, triggers, the bulk of a
restore's CPU — is built by ``pg_restore -j N --section=post-data`` from the archive's head alone
(``spool.py``: header and TOC, kilobytes; post-data entries carry no data). ``-j`` cannot be combined with
``--single-transaction``, so each worker commits as it goes; what keeps a half-finished restore from ever
looking restored is the scratch database: it becomes the target only after both exited 0, and is dropped
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio

from kybdr_agent.asyncutil import TailBuffer, task_group
from kybdr_agent.backup.archive_toc import ArchiveError, TocCapture
from kybdr_agent.backup.decode import stream_backup
from kybdr_agent.backup.globals import prepare_target
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.pgdump import child_process, drain_into, failure_message
from kybdr_agent.backup.scratch import (
    DRILL_PREFIX,
    RESTORE_PREFIX,
    drop_scratch,
    held,
    is_scratch,
    mark_keep,
    quote_ident,
    sweep_scratch,
)
from kybdr_agent.backup.spool import check_room, spooled_head
from kybdr_agent.backup.target import TargetContents, describe, inspect_target
from kybdr_agent.errors import DumpError, KybdrError
from kybdr_agent.postgres.connection import DATABASE_ERRORS, Connection, database_errors, pg_message
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.telemetry import get_logger

MAX_IDENTIFIER_BYTES: Final = 63
MAX_JOBS: Final = 16
log = get_logger("kybdr_agent.restore")


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    target_database: str
    replaced_existing: bool
    dump_bytes: int
    seconds: float
    terminated_sessions: int = 0
    notices: list[str] = field(default_factory=list)
    globals: dict[str, Any] | None = None  # what --with-globals created and found (globals.prepare_target)
    region: str = "primary"  # the repository it was read from (backup.regions)


Notice = Callable[[str], None]


def _ignore(_message: str) -> None:
    return None


def check_target_name(name: str) -> str:
    if not name or len(name.encode()) > MAX_IDENTIFIER_BYTES or "\x00" in name:
        raise KybdrError(f"{name!r} is not a usable database name (1 to {MAX_IDENTIFIER_BYTES} bytes)")
    if name in ("template0", "template1"):
        raise KybdrError(f"refusing to restore over {name}")
    return name


def check_user_target(name: str) -> str:
    """A target an operator names: never one of the agent's scratch names, which sweeps drop on sight."""
    check_target_name(name)
    if is_scratch(name):
        raise KybdrError(
            f"{name!r} starts with {RESTORE_PREFIX!r} or {DRILL_PREFIX!r}, the agent's scratch names, which it "
            "drops when no restore holds them; choose another --target-database"
        )
    return name


_SESSIONS: Final = "select count(*) from pg_catalog.pg_stat_activity where datname = $1 and pid <> pg_backend_pid()"


async def _contents(connection: Connection, admin: Any, target: str) -> TargetContents:
    with database_errors(f"inspecting database {target!r}"):
        async with connection.connect(target) as here, connection.connect("template1") as template:
            return await inspect_target(admin, here, template, target)


def _not_empty(target: str, found: TargetContents) -> KybdrError:
    return KybdrError(
        f"database {target!r} exists and is not empty (it holds {'; '.join(describe(found))}); "
        "choose another --target-database or pass --force to replace it"
    )


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
    with_globals: bool = False,
    jobs: int = 1,
    spool_dir: Path | None = None,
    notice: Notice = _ignore,
) -> RestoreResult:
    """Restore into a scratch database, then put it in place of ``target``.

    An existing target is replaced only if it is exactly a fresh, untouched database (``target.py``) or
    ``force`` is given, and that is checked again just before the swap. ``notice`` hears, before it
    happens, anything the operator should know — above all that client sessions will be terminated.
    ``jobs`` > 1 builds the post-data section with ``pg_restore -j jobs`` from the archive's head, spooled
    in ``spool_dir``, whose room is checked before anything is created.
    """
    check_target_name(target)
    if not 1 <= jobs <= MAX_JOBS:
        raise KybdrError(f"--jobs must be 1 to {MAX_JOBS}, not {jobs}")
    if jobs > 1:
        if spool_dir is None:
            raise KybdrError("a parallel restore (--jobs > 1) needs restore.spool_dir")
        check_room(spool_dir)
    started = time.monotonic()
    notices: list[str] = []

    def say(message: str) -> None:
        notices.append(message)
        log.warning("restore.notice", target=target, message=message)
        notice(message)

    scratch = f"{RESTORE_PREFIX}{secrets.token_hex(6)}"
    async with connection.connect(maintenance_database) as admin:
        with database_errors("sweeping scratch databases left by earlier restores"):
            swept = await sweep_scratch(admin)
        for name, error in swept.failed.items():
            say(f"could not drop the leftover scratch database {name}: {error}")
        server_major = admin.get_server_version().major
        with database_errors(f"checking the target database {target!r}"):
            exists = bool(await admin.fetchval("select true from pg_database where datname = $1", target))
        if exists:
            found = await _contents(connection, admin, target)
            if not found.empty and not force:
                raise _not_empty(target, found)
            if force:
                with database_errors(f"counting the sessions connected to {target!r}"):
                    sessions = int(await admin.fetchval(_SESSIONS, target))
                if sessions:
                    say(
                        f"{target!r} has {sessions} client session(s) connected now; --force terminates every "
                        "session connected to it when the restored copy replaces it"
                    )
        pg_restore = connection.binary("pg_restore", server_major)
        applied = await prepare_target(
            backup,
            admin=admin,
            store=store,
            keyring=keyring,
            connection=connection,
            pg_restore=pg_restore,
            with_globals=with_globals,
            no_owner=no_owner,
            say=say,
        )
        async with held(admin, scratch):
            with database_errors("creating the scratch database for the restore"):
                await admin.execute(f"create database {quote_ident(scratch)} template template0")
            try:
                if jobs > 1:
                    assert spool_dir is not None
                    stats_bytes = await _pg_restore_parallel(
                        scratch, backup, store, keyring, connection, pg_restore, no_owner, jobs, spool_dir, admin
                    )
                else:
                    stats_bytes = await pg_restore_stream(
                        scratch, backup, store, keyring, connection, pg_restore, no_owner, session=admin
                    )
            except BaseException:
                await drop_scratch(admin, scratch)
                raise
            # The restored copy is complete. From here on it is the only good copy once the old target is
            # dropped, so the swap is shielded from cancellation and a failure never drops the scratch
            # database after the old target is gone.
            with anyio.CancelScope(shield=True):
                terminated = await _swap_in(connection, admin, scratch, target, replace=exists, force=force, say=say)
    return RestoreResult(
        backup_id=backup.id,
        target_database=target,
        replaced_existing=exists,
        dump_bytes=stats_bytes,
        seconds=round(time.monotonic() - started, 3),
        terminated_sessions=terminated,
        notices=notices,
        globals=applied,
    )


async def _swap_in(
    connection: Connection, admin: Any, scratch: str, target: str, *, replace: bool, force: bool, say: Notice
) -> int:
    """Drop the old target (if any) and rename the scratch copy; the number of sessions terminated."""
    dropped = False
    terminated = 0
    try:
        if replace:
            if not force:
                # It was empty when the restore began; somebody may have used it since.
                found = await _contents(connection, admin, target)
                if not found.empty:
                    raise _not_empty(target, found)
                await admin.execute(f"drop database {quote_ident(target)}")
            else:
                terminated = int(await admin.fetchval(_SESSIONS, target))
                if terminated:
                    say(f"terminating {terminated} client session(s) connected to {target!r} to replace it")
                await admin.execute(f"drop database {quote_ident(target)} with (force)")
            dropped = True
        await admin.execute(f"alter database {quote_ident(scratch)} rename to {quote_ident(target)}")
    except (*DATABASE_ERRORS, KybdrError) as exc:
        if not dropped:
            await drop_scratch(admin, scratch)
            if isinstance(exc, KybdrError):
                raise
            raise DumpError(f"could not put the restored database in place of {target!r}: {pg_message(exc)}") from None
        await mark_keep(admin, scratch, f"the restored copy of {target}; rename it to {target}")
        raise DumpError(
            f"the old {target!r} was dropped but renaming the restored copy failed ({pg_message(exc)}); the "
            f"restored data is complete in database {scratch!r}, which sweeps will not drop: rename it with "
            f"ALTER DATABASE {quote_ident(scratch)} RENAME TO {quote_ident(target)}"
        ) from None
    return terminated


async def pg_restore_stream(
    database: str,
    backup: Manifest,
    store: BlobStore,
    keyring: KeyRing | None,
    connection: Connection,
    pg_restore: str,
    no_owner: bool,
    *,
    session: Any = None,
    use_list: Path | None = None,
    sections: tuple[str, ...] = (),
    tap: Callable[[bytes], Awaitable[None]] | None = None,
) -> int:
    """Fill ``database`` with pg_restore fed the verified stream, in one transaction, on the server ``session``
    reached (the one that created it); the dump's bytes, once the whole stream verified and pg_restore exited 0.

    A whole restore reads the archive to its last byte, so pg_restore going away before the end of the input
    is a failure, whatever its exit status. With ``use_list`` (a selective restore, ``--use-list``) it stops
    reading once it has the last entry asked for, commits and exits 0 — often long before the stream's end:
    then the rest is still read and verified (to nowhere), and ``database`` (a scratch database, which the
    caller drops on any error) becomes anything only if the whole stream verifies. ``sections`` limits it
    the same way (the last data block may come before the archive's end); ``tap`` sees every verified chunk
    first."""
    argv = [pg_restore, "--exit-on-error", "--single-transaction", "--no-password", f"--dbname={database}"]
    if use_list is not None:
        argv.append(f"--use-list={use_list}")
    argv += [f"--section={section}" for section in sections]
    may_stop_early = use_list is not None or bool(sections)
    if no_owner:
        argv += ["--no-owner", "--no-acl"]
    stderr = TailBuffer()
    async with child_process(
        argv,
        env=connection.child_env(database, session),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    ) as proc:
        assert proc.stdin is not None
        stdin = proc.stdin
        done_reading = False

        async def feed(data: bytes) -> None:
            nonlocal done_reading
            if tap is not None:
                await tap(data)
            if done_reading:
                return
            stdin.write(data)
            try:
                await stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                returncode = await proc.wait()
                if returncode != 0 or not may_stop_early:
                    raise DumpError(failure_message("pg_restore", returncode, stderr)) from None
                done_reading = True

        async with task_group() as tg:
            tg.start_soon(drain_into, proc.stderr, stderr)
            try:
                stats = await stream_backup(lambda: store.read(backup.object_key), backup, keyring, feed)
            except BaseException:
                # Kill pg_restore mid-transaction so that nothing it did is committed. (It may already have
                # committed: it does once it has read the archive's last block, before the stream's final
                # checks. Only the scratch database saw that, and the caller drops it.)
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                raise
            # Everything verified: end of input lets pg_restore finish, if it has not yet.
            stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await stdin.wait_closed()
            returncode = await proc.wait()
        if returncode != 0:
            raise DumpError(failure_message("pg_restore", returncode, stderr))
    return stats.dump_bytes


async def _pg_restore_parallel(
    database: str,
    backup: Manifest,
    store: BlobStore,
    keyring: KeyRing | None,
    connection: Connection,
    pg_restore: str,
    no_owner: bool,
    jobs: int,
    spool_dir: Path,
    session: Any,
) -> int:
    """Pre-data and data streamed in one transaction, then the post-data section with ``pg_restore -j jobs``
    from the archive's head (spooled, deleted afterwards); the dump's bytes.

    The post-data step starts only after the whole stream verified. No ``--single-transaction`` there
    (pg_restore refuses it with ``-j``): ``database`` is the scratch database, which replaces the target
    only if this returns, so a failure halfway leaves nothing that looks restored."""
    capture = TocCapture()

    async def keep_head(data: bytes) -> None:
        if not capture.complete:  # parsed off the loop: a large schema's TOC is megabytes
            try:
                await anyio.to_thread.run_sync(capture.feed, data)
            except ArchiveError as exc:
                raise DumpError(f"backup {backup.id}'s archive cannot be restored in parallel: {exc}") from None

    dump_bytes = await pg_restore_stream(
        database,
        backup,
        store,
        keyring,
        connection,
        pg_restore,
        no_owner,
        session=session,
        sections=("pre-data", "data"),
        tap=keep_head,
    )
    argv = [pg_restore, "--exit-on-error", f"--jobs={jobs}", "--section=post-data", "--no-password"]
    argv.append(f"--dbname={database}")
    if no_owner:
        argv += ["--no-owner", "--no-acl"]
    try:
        head = capture.head
    except ArchiveError as exc:
        raise DumpError(f"backup {backup.id}'s archive cannot be restored in parallel: {exc}") from None
    with spooled_head(spool_dir, backup.id, head) as path:
        stderr = TailBuffer()
        async with child_process(
            [*argv, str(path)], env=connection.child_env(database, session), stdout=asyncio.subprocess.DEVNULL
        ) as proc:
            async with task_group() as tg:
                tg.start_soon(drain_into, proc.stderr, stderr)
                returncode = await proc.wait()
            if returncode != 0:
                raise DumpError(failure_message("pg_restore", returncode, stderr))
    return dump_bytes
