"""The server's globals with every backup, and a restore that brings the roles a database needs.

``pg_dump`` carries no roles, so a database restored onto a new server fails on its first ``OWNER TO`` or
``GRANT`` naming an application role. With every backup the agent therefore stores ``pg_dumpall
--globals-only`` (roles, memberships, role settings, parameter privileges, tablespaces) as a second object,
sealed like the data: the same stream format, codec, frame size and data key, under a nonce prefix of its
own that is drawn to differ from the data's — two streams under one key never share a (key, nonce) pair,
however the random draws fall. Role password hashes go in only when the agent may read them (``pg_authid``)
*and* the backup is encrypted: a hash is a credential (md5 ones can log in as they are), so it never lies in
a repository in the clear; otherwise ``--no-role-passwords``, and the manifest says which.

A restore first asks which roles (and tablespaces) the backup needs (``schema_needs``) and which of them the
target lacks. Without ``with_globals`` anything missing refuses the restore before anything changes; with
it, the globals are read (``globals_plan``, never run as a script) and what the target lacks is created —
tablespaces first (they cannot be created inside a transaction; they are dropped again if what follows
fails), then every role, setting, membership and privilege in one transaction — before the scratch database
exists.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import hashlib
import os
import re
from collections.abc import Callable
from typing import Any, Final, Protocol

import anyio

from kybdr_agent.asyncutil import TailBuffer, task_group
from kybdr_agent.backup.decode import stream_backup
from kybdr_agent.backup.globals_plan import (
    Globals,
    GlobalsParser,
    GlobalsPlan,
    SchemaNeeds,
    TargetState,
    plan_globals,
)
from kybdr_agent.backup.globals_sql import SqlSyntaxError, StatementReader, quote_ident, quote_literal
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import GlobalsObject, Manifest
from kybdr_agent.backup.pgdump import child_process, drain_into, failure_message
from kybdr_agent.backup.streamfmt import HEADER_SIZE, NONCE_PREFIX_SIZE, StreamHeader, StreamSealer
from kybdr_agent.errors import DumpError, IntegrityError, KybdrError
from kybdr_agent.postgres.connection import DATABASE_ERRORS, Connection, database_errors, pg_message, tool_version
from kybdr_agent.postgres.conninfo import dbname_only
from kybdr_agent.storage.base import BlobStore, UploadResult
from kybdr_agent.telemetry import get_logger

READ_CHUNK: Final = 64 << 10
SHOWN_NAMES: Final = 20
_PLAIN_NAME: Final = re.compile(r"[a-z_][a-z0-9_$]*")
log = get_logger("kybdr_agent.globals")


class SealingEncoder(Protocol):
    """The backup pipeline's compress → seal → hash step (``pump.Encoder``)."""

    dump_bytes: int
    compressed_bytes: int
    stored_hash: hashlib._Hash
    sealer: StreamSealer

    def update(self, chunk: bytes) -> bytes: ...
    def finalize(self) -> bytes: ...


# --- backup ------------------------------------------------------------------------------------------------


def globals_header(data: StreamHeader) -> StreamHeader:
    """The data stream's header with a fresh nonce prefix that is certainly not the data's."""
    while True:
        prefix = os.urandom(NONCE_PREFIX_SIZE)
        if prefix != data.nonce_prefix:
            return dataclasses.replace(data, nonce_prefix=prefix)


async def _may_read_passwords(conn: Any, connection: Connection, database: str) -> bool:
    query = "select has_table_privilege('pg_catalog.pg_authid', 'select')"
    with contextlib.suppress(*DATABASE_ERRORS):
        # The snapshot's session may have died once pg_dump had the snapshot: no reason to fail; ask anew.
        return bool(await conn.fetchval(query))
    async with connection.connect(database) as fresh:
        with database_errors("checking whether the agent may read role passwords"):
            return bool(await fresh.fetchval(query))


async def dump_globals(
    conn: Any,
    *,
    connection: Connection,
    database: str,
    server_major: int,
    store: BlobStore,
    key: str,
    header: StreamHeader,
    encoder: SealingEncoder,
    encrypted: bool,
) -> GlobalsObject:
    """Stream ``pg_dumpall --globals-only`` through ``encoder`` (sealing under ``header``) into ``key``, from
    the server ``conn`` reached."""
    passwords = encrypted and await _may_read_passwords(conn, connection, database)
    pg_dumpall = connection.binary("pg_dumpall", server_major)
    argv = [
        pg_dumpall,
        "--globals-only",
        "--no-password",
        "--encoding=UTF8",
        f"--database={dbname_only(database)}",
        *([] if passwords else ["--no-role-passwords"]),
    ]
    result = UploadResult()
    stderr = TailBuffer()
    async with (
        store.open_upload(key, size_hint=None, result=result) as sink,
        child_process(
            argv,
            env=connection.child_env(database, conn),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        ) as proc,
    ):
        assert proc.stdout is not None
        async with task_group() as tg:
            tg.start_soon(drain_into, proc.stderr, stderr)
            while chunk := await proc.stdout.read(READ_CHUNK):
                if sealed := encoder.update(chunk):
                    await sink.write(sealed)
            returncode = await proc.wait()
        if returncode != 0:
            raise DumpError(failure_message("pg_dumpall --globals-only", returncode, stderr))
        await sink.write(encoder.finalize())
    return GlobalsObject(
        object_key=key,
        sql_bytes=encoder.dump_bytes,
        compressed_bytes=encoder.compressed_bytes,
        stored_bytes=result.size,
        sha256=encoder.stored_hash.hexdigest(),
        frames=encoder.sealer.frames_sealed,
        stream_header=header.encode().hex(),
        role_passwords=passwords,
        pg_dumpall_version=await tool_version(pg_dumpall),
    )


# --- reading a backup's globals -------------------------------------------------------------------------------


def globals_view(backup: Manifest) -> Manifest:
    """The manifest as the decoder sees it for the globals object: same key and codec, the globals' totals."""
    g = backup.globals
    if g is None:
        raise KybdrError(f"backup {backup.id} has no globals object")
    return backup.model_copy(
        update={
            "object_key": g.object_key,
            "stream_header": g.stream_header,
            "stored_bytes": g.stored_bytes,
            "sha256": g.sha256,
            "dump_bytes": g.sql_bytes,
            "compressed_bytes": g.compressed_bytes,
            "frames": g.frames,
        }
    )


async def read_globals(backup: Manifest, store: BlobStore, keyring: KeyRing | None) -> Globals:
    """Decode, verify and parse the globals object (streamed: only the parsed roles are kept)."""
    view = globals_view(backup)
    parser = GlobalsParser()
    reader = StatementReader()
    text = codecs.getincrementaldecoder("utf-8")()

    async def sink(data: bytes) -> None:
        for stmt in reader.feed(text.decode(data)):
            parser.add(stmt)

    try:
        await stream_backup(lambda: store.read(view.object_key), view, keyring, sink)
        for stmt in [*reader.feed(text.decode(b"", final=True)), *reader.finish()]:
            parser.add(stmt)
    except (SqlSyntaxError, UnicodeDecodeError) as exc:
        raise DumpError(f"backup {backup.id}'s globals cannot be read: {exc}") from None
    return parser.globals


async def check_globals_object(backup: Manifest, store: BlobStore) -> str | None:
    """Quick validation of the globals object: present, the manifest's size and header. None if it has none."""
    g = backup.globals
    if g is None:
        return None
    info = await store.stat(g.object_key)
    if info is None or info.size != g.stored_bytes:
        found = "is missing" if info is None else f"has {info.size} bytes, manifest says {g.stored_bytes}"
        raise IntegrityError(f"backup {backup.id}: globals object {g.object_key} {found}")
    head = b""
    async for chunk in store.read(g.object_key, chunk_size=HEADER_SIZE):
        head += chunk
        if len(head) >= HEADER_SIZE:
            break
    if head[:HEADER_SIZE].hex() != g.stream_header:
        raise IntegrityError(f"backup {backup.id}: globals stream header differs from the manifest's")
    return "globals object present with the manifest's size and header"


async def verify_globals(backup: Manifest, store: BlobStore, keyring: KeyRing | None) -> str | None:
    """Full validation of the globals object: every frame, the totals, and that it parses. None if it has none."""
    if backup.globals is None:
        return None
    found = await read_globals(backup, store, keyring)
    return f"globals verified and read ({len(found.roles)} roles, {len(found.tablespaces)} tablespaces)"


# --- the roles a restore needs ----------------------------------------------------------------------------------


class _TocRead(Exception):
    """Control flow: pg_restore has read what it needed and closed its input."""


async def schema_needs(
    backup: Manifest, store: BlobStore, keyring: KeyRing | None, connection: Connection, pg_restore: str
) -> SchemaNeeds:
    """Every role the backup's schema names (and tablespace it uses), from ``pg_restore --schema-only`` on the
    decoded stream.

    Why the archive and not the globals: the globals list every role of the *source server*, most of which a
    given database may never mention, so they would refuse restores that would succeed; and backups made
    before globals were recorded have none. ``pg_restore --list`` is not enough either: it shows owners but
    not the grantees of ACL entries, default privileges or policies. The schema-only script names all of
    them, and it costs little: a custom-format archive begins with its table of contents, which holds every
    statement's text, so pg_restore exits after the first frames and the rest of the stream is never
    decoded (only authenticated frames reach it, as in a restore). Nothing is written to disk.
    """
    refs = SchemaNeeds()
    reader = StatementReader()
    stderr = TailBuffer()
    argv = [pg_restore, "--schema-only", "--file=-"]
    async with child_process(
        argv, env=connection.child_env("postgres"), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout

        async def scan() -> None:
            while chunk := await stdout.read(READ_CHUNK):
                for stmt in reader.feed(chunk.decode("latin-1")):
                    refs.add(stmt)
            for stmt in reader.finish():
                refs.add(stmt)

        async def feed(data: bytes) -> None:
            stdin.write(data)
            try:
                await stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                raise _TocRead from None

        async with task_group() as tg:
            tg.start_soon(drain_into, proc.stderr, stderr)
            tg.start_soon(scan)
            try:
                await stream_backup(lambda: store.read(backup.object_key), backup, keyring, feed)
                stdin.close()
            except _TocRead:
                pass
            returncode = await proc.wait()
    if returncode != 0:
        raise DumpError(failure_message("pg_restore --schema-only", returncode, stderr))
    return refs


async def target_state(admin: Any) -> TargetState:
    with database_errors("reading the target server's roles and tablespaces"):
        roles = frozenset(str(r) for r in await admin.fetchval("select array_agg(rolname) from pg_roles") or [])
        spaces = frozenset(str(r) for r in await admin.fetchval("select array_agg(spcname) from pg_tablespace") or [])
        me = str(await admin.fetchval("select current_user"))
    return TargetState(roles=roles, tablespaces=spaces, current_user=me)


def _shown(names: list[str]) -> str:
    shown = [n if _PLAIN_NAME.fullmatch(n) else quote_ident(n) for n in names[:SHOWN_NAMES]]
    more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    return ", ".join(shown) + more


def missing_message(backup: Manifest, roles: list[str], tablespaces: list[str]) -> str:
    """One message naming what the server lacks and the ways forward."""
    lacks = [f"{len(roles)} role(s) this server does not have: {_shown(roles)}"] if roles else []
    if tablespaces:
        lacks.append(f"{len(tablespaces)} tablespace(s) it does not have: {_shown(tablespaces)}")
    first = (
        '--with-globals (API: "with_globals": true) to create them from the roles and tablespaces recorded with '
        "the backup"
        if backup.globals is not None
        else "creating them first (this backup was made before kybdr-agent recorded the server's roles, so "
        "--with-globals cannot)"
    )
    second = (
        'with --no-owner (API: "no_owner": true), which restores without owners and privileges '
        "(pg_restore --no-owner --no-acl)"
        if not tablespaces
        else "after creating the tablespaces (--no-owner does without roles, not without tablespaces)"
    )
    return (
        f"backup {backup.id} of {backup.database!r} needs {'; and '.join(lacks)}; nothing was changed. "
        f"Restore either with {first}, or {second}"
    )


# --- applying the globals ----------------------------------------------------------------------------------------


async def _check_tablespaces(admin: Any, plan: GlobalsPlan) -> None:
    if not plan.tablespaces_created:
        return
    names = _shown([t.name for t in plan.tablespaces_created])
    with database_errors("checking the tablespaces to create"):
        superuser = bool(await admin.fetchval("select rolsuper from pg_roles where rolname = current_user"))
        if not superuser:
            raise KybdrError(
                f"the backup's globals hold tablespace(s) this server lacks ({names}) and only a superuser can "
                "create them; nothing was changed: create them, or restore as a superuser"
            )
        for space in plan.tablespaces_created:
            isdir = await admin.fetchval("select isdir from pg_stat_file($1, true)", space.location)
            if not isdir:
                raise KybdrError(
                    f"tablespace {space.name}'s directory {space.location} does not exist on the database server "
                    f"(or is not a directory); nothing was changed: create it, owned by the server's OS user, and "
                    "restore again"
                )


async def apply_globals(admin: Any, plan: GlobalsPlan) -> None:
    """Create the missing tablespaces, then everything else in one transaction; undo the tablespaces on failure."""
    made: list[str] = []
    try:
        for space in plan.tablespaces_created:
            with database_errors(f"creating tablespace {space.name} in {space.location}"):
                await admin.execute(
                    f"CREATE TABLESPACE {quote_ident(space.name)} LOCATION {quote_literal(space.location)}"
                )
            made.append(space.name)
        try:
            async with admin.transaction():
                for sql in plan.statements:
                    await admin.execute(sql)
        except DATABASE_ERRORS as exc:
            raise DumpError(
                f"creating the backup's roles failed and was rolled back, nothing was changed: {pg_message(exc)}"
            ) from None
    except BaseException:
        with anyio.CancelScope(shield=True):
            for name in made:
                try:
                    await admin.execute(f"DROP TABLESPACE {quote_ident(name)}")
                except DATABASE_ERRORS as exc:
                    log.warning("globals.undo_failed", tablespace=name, error=pg_message(exc))
        raise


async def prepare_target(
    backup: Manifest,
    *,
    admin: Any,
    store: BlobStore,
    keyring: KeyRing | None,
    connection: Connection,
    pg_restore: str,
    with_globals: bool,
    no_owner: bool,
    say: Callable[[str], None],
) -> dict[str, Any] | None:
    """Before a restore touches anything: refuse it if the server lacks roles the backup needs, or (with
    ``with_globals``) create them from the backup's globals. The report of what was done, or None."""
    if with_globals and backup.globals is None:
        raise KybdrError(
            f"backup {backup.id} has no globals (it was made before kybdr-agent recorded the server's roles); "
            "restore it without --with-globals, after creating its roles, or with --no-owner"
        )
    needs = SchemaNeeds() if no_owner else await schema_needs(backup, store, keyring, connection, pg_restore)
    state = await target_state(admin)
    roles = sorted(needs.roles - state.roles)
    spaces = sorted(needs.tablespaces - state.tablespaces)
    if not with_globals:
        if roles or spaces:
            raise KybdrError(missing_message(backup, roles, spaces))
        return None
    found = await read_globals(backup, store, keyring)
    plan = plan_globals(found, state)
    created = {t.name for t in plan.tablespaces_created}
    still = [name for name in roles if name not in plan.roles_after] + [s for s in spaces if s not in created]
    if still:
        raise KybdrError(
            f"backup {backup.id} needs role(s) or tablespace(s) this server lacks and its globals do not create: "
            f"{_shown(still)}; nothing was changed: create them first, or restore with --no-owner"
        )
    await _check_tablespaces(admin, plan)
    await apply_globals(admin, plan)
    if plan.roles_existing:
        say(
            f"{len(plan.roles_existing)} role(s) of the backup's globals already exist on this server and were "
            f"left as they are: {_shown(plan.roles_existing)}"
        )
    if plan.roles_created:
        say(f"created {len(plan.roles_created)} role(s) from the backup's globals: {_shown(plan.roles_created)}")
    for what in plan.skipped:
        say(f"not applied from the backup's globals: {what}")
    assert backup.globals is not None
    return {
        "role_passwords": backup.globals.role_passwords,
        "roles_created": plan.roles_created,
        "roles_existing": plan.roles_existing,
        "roles_not_created": plan.roles_not_created,
        "memberships_granted": plan.memberships_granted,
        "settings_applied": plan.settings_applied,
        "tablespaces_created": [t.name for t in plan.tablespaces_created],
        "tablespaces_existing": plan.tablespaces_existing,
        "skipped": plan.skipped,
    }
