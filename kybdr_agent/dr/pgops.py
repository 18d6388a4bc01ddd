"""What DR does to PostgreSQL itself: fence a server read-only, lift the fence, wait for a standby to catch
up, promote it and prove it writable.

Fencing is PostgreSQL's own switch, ``default_transaction_read_only``, set with ``ALTER SYSTEM`` so it lands
in ``postgresql.auto.conf`` and survives a restart: an old primary that a host reboot brings back must come
back read-only, never writable beside the promoted standby (the split brain repmgr's users keep reporting).
The setting reaches existing sessions only at their next statement and never an open transaction, so every
other client backend is terminated once a fresh session proves the new default is in force. It is a soft
fence (a client can still ``SET default_transaction_read_only = off``); an operator who needs a hard one
configures ``dr.fence_command`` (``run_fence_command``), e.g. to stop the server or cut its network.

Promotion waits for the standby to replay what it received (and, for a zero-loss switchover, at least the
LSN the fenced old primary reported), lifts any fence on the standby (``ALTER SYSTEM`` works in recovery:
checked on PostgreSQL 15), calls ``pg_promote`` and then proves the server takes writes with a test write
that leaves nothing behind: ``pg_logical_emit_message`` in a READ WRITE transaction. Every call is bounded
with ``anyio.fail_after``; credentials come only from the ``Connection`` (environment or passfile).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import anyio
import asyncpg
from anyio.abc import Process

from kybdr_agent.errors import KybdrError
from kybdr_agent.postgres.connection import (
    DATABASE_ERRORS,
    Connection,
    close_quietly,
    pg_message,
    session_settings_sql,
)

POLL_INTERVAL: Final = 0.05
# pg_terminate_backend(pid, timeout) waits this long (ms) per backend for it to exit (PostgreSQL 14+).
TERMINATE_WAIT_MS: Final = 5000
# Replay counts as caught up when it reaches what was received, or when neither moves for this long: a
# primary that died mid-record leaves a partial record the standby received but can never replay.
STALL_GRACE: Final = 2.0
# How much of a fence command's stderr an operator sees in the result.
OUTPUT_TAIL: Final = 500
OUTPUT_GRACE: Final = 0.5
# The environment a fence command inherits from the agent besides what the caller passes.
_COMMAND_ENV: Final = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR"})

_READ_ONLY_GUC: Final = "default_transaction_read_only"
_LSN_SQL: Final = (
    # On a primary the insert position: it covers every commit, even an asynchronous one not yet flushed,
    # so a standby that replays up to it has every write the fenced primary acknowledged.
    "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() - '0/0'"
    " ELSE pg_current_wal_insert_lsn() - '0/0' END"
)


class DRError(KybdrError):
    """A DR step on PostgreSQL (fence, promote, rejoin) failed; the message says which server and why."""


@dataclass(frozen=True)
class FenceResult:
    """What fencing achieved. ``reachable=False`` means it could not even be tried (the caller then waits
    out the old primary's self-fence deadline); ``lsn`` is its WAL position after the fence, for a
    zero-loss switchover (``promote(at_least_lsn=...)``)."""

    fenced: bool
    reachable: bool
    how: str  # "sql" or "command"
    lsn: int | None
    detail: str


@dataclass(frozen=True)
class PromoteResult:
    """``promoted_lsn``: where the old timeline ended (the last replayed LSN when promotion began; for a
    server found already promoted, its last replayed LSN if it still knows it, else its current one).
    ``receive_lsn``/``replay_lsn``: the standby's positions once it had caught up."""

    promoted_lsn: int
    timeline: int
    receive_lsn: int | None
    replay_lsn: int | None
    waited_catchup_s: float
    promote_s: float


@asynccontextmanager
async def _session(conn: Connection, database: str, what: str) -> AsyncIterator[asyncpg.Connection]:
    """A session whose failures (connect or query) become ``DRError`` naming the server and the step."""
    try:
        async with conn.connect(database) as session:
            yield session
    except DRError:
        raise
    except KybdrError as exc:
        raise DRError(f"{what}: {exc}") from None
    except DATABASE_ERRORS as exc:
        raise DRError(f"{what} on {conn.describe()}: {pg_message(exc)}") from None


async def _wait_setting(conn: Connection, database: str, value: str, what: str) -> None:
    """Until a NEW session sees ``default_transaction_read_only = value``: ``pg_reload_conf()`` only signals
    the postmaster, and sessions forked before it re-reads the file still carry the old default."""
    while True:
        async with _session(conn, database, what) as session:
            current = await session.fetchval(f"SELECT current_setting('{_READ_ONLY_GUC}')")
        if current == value:
            return
        await anyio.sleep(POLL_INTERVAL)


async def fence(conn: Connection, *, database: str, timeout: float) -> FenceResult:  # noqa: ASYNC109 - the contract's bound, applied inside with fail_after
    """Make the server read-only for good (``postgresql.auto.conf``) and end every other client session.

    Never raises for a server it cannot reach or cannot fence: the result says so. Idempotent.
    Order matters: set and reload, wait until a fresh session sees the read-only default (so any session
    started from then on is read-only), then terminate every other client backend (they may hold an open
    read-write transaction), then read the WAL position.
    """
    answered = False  # the server spoke PostgreSQL to us: it is up, fenced or not
    started = time.monotonic()
    try:
        with anyio.fail_after(timeout):
            try:
                session = await asyncpg.connect(**conn.asyncpg_kwargs(database))
            except asyncpg.PostgresError:
                # Authentication failed, too many connections, starting up...: the server is there. It
                # must never be reported unreachable, or the caller would promote beside a live primary.
                answered = True
                raise
            answered = True
            try:
                await session.execute(session_settings_sql(session.get_server_version().major))
                await session.execute(f"ALTER SYSTEM SET {_READ_ONLY_GUC} = on")
                await session.fetchval("SELECT pg_reload_conf()")
                await _wait_setting(conn, database, "on", "checking the fence")
                terminated = await session.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, $1)) FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    TERMINATE_WAIT_MS,
                )
                lsn = await session.fetchval(_LSN_SQL)
                in_recovery = await session.fetchval("SELECT pg_is_in_recovery()")
            finally:
                await close_quietly(session)
    except TimeoutError:
        where = "while fencing" if answered else "connecting"
        return FenceResult(
            fenced=False,
            reachable=answered,
            how="sql",
            lsn=None,
            detail=f"timed out after {time.monotonic() - started:.1f}s {where} ({conn.describe()})",
        )
    except DRError as exc:
        return FenceResult(fenced=False, reachable=True, how="sql", lsn=None, detail=str(exc))
    except DATABASE_ERRORS as exc:
        doing = "fencing" if answered else "cannot connect to"
        return FenceResult(
            fenced=False,
            reachable=answered,
            how="sql",
            lsn=None,
            detail=f"{doing} {conn.describe()}: {pg_message(exc)}",
        )
    role = "standby" if in_recovery else "primary"
    return FenceResult(
        fenced=True,
        reachable=True,
        how="sql",
        lsn=int(lsn) if lsn is not None else None,
        detail=(
            f"{role} {conn.describe()} is read-only ({_READ_ONLY_GUC} = on in postgresql.auto.conf);"
            f" {terminated} other session(s) terminated in {time.monotonic() - started:.2f}s"
        ),
    )


async def unfence(conn: Connection, *, database: str, timeout: float) -> None:  # noqa: ASYNC109 - the contract's bound, applied inside with fail_after
    """Lift the fence: ``ALTER SYSTEM RESET`` and reload, then check from a fresh session.

    Raises ``DRError`` if the server stays read-only, e.g. because ``postgresql.conf`` itself sets
    ``default_transaction_read_only`` (only the operator can change that file).
    """
    what = f"lifting the read-only fence on {conn.describe()}"
    try:
        with anyio.fail_after(timeout):
            async with _session(conn, database, what) as session:
                await session.execute(f"ALTER SYSTEM RESET {_READ_ONLY_GUC}")
                await session.fetchval("SELECT pg_reload_conf()")
                await _reset_or_explain(conn, database, what)
    except TimeoutError:
        raise DRError(f"{what}: timed out after {timeout:g}s") from None
    except DATABASE_ERRORS as exc:
        raise DRError(f"{what}: {pg_message(exc)}") from None


async def _reset_or_explain(conn: Connection, database: str, what: str) -> None:
    """Wait until fresh sessions are writable by default, unless a file other than auto.conf sets it on."""
    # pg_settings shows the file values only after the reload was processed; tolerate the old view
    # (source = 'configuration file' pointing at postgresql.auto.conf) while waiting.
    while True:
        async with _session(conn, database, what) as fresh:
            current = await fresh.fetchval(f"SELECT current_setting('{_READ_ONLY_GUC}')")
            row = await fresh.fetchrow(
                "SELECT source, sourcefile, sourceline FROM pg_settings WHERE name = $1", _READ_ONLY_GUC
            )
        if current == "off":
            return
        sourcefile = (row["sourcefile"] or "") if row is not None else ""
        if row is not None and row["source"] != "configuration file":
            raise DRError(
                f"{what}: {_READ_ONLY_GUC} is still on, set by {row['source']} (a role or database setting?);"
                " reset it there"
            )
        if sourcefile and not sourcefile.endswith("postgresql.auto.conf"):
            raise DRError(
                f"{what}: {_READ_ONLY_GUC} = on is set in {sourcefile} line {row['sourceline'] if row else '?'};"
                " remove it there and reload"
            )
        await anyio.sleep(POLL_INTERVAL)


async def run_fence_command(argv: Sequence[str], *, env: Mapping[str, str], timeout: float) -> FenceResult:  # noqa: ASYNC109 - the contract's bound, applied inside with fail_after
    """Run the operator's ``dr.fence_command``: exit status 0 means fenced, anything else (or no answer
    within ``timeout``) means not fenced, with the command's stderr tail in ``detail``.

    A failed command reports ``reachable=True``: we cannot tell why it failed, and claiming the old primary
    unreachable would let the caller promote after merely waiting. The child gets the agent's basic
    environment (PATH, HOME, locale) plus ``env``, runs in its own session and, on timeout or cancellation,
    its whole process group is killed.
    """
    if not argv:
        return FenceResult(fenced=False, reachable=True, how="command", lsn=None, detail="fence_command is empty")
    child_env = {k: v for k, v in os.environ.items() if k in _COMMAND_ENV or k.startswith("LC_")}
    child_env.update(env)
    started = time.monotonic()
    try:
        process = await anyio.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env,
            start_new_session=True,
        )
    except OSError as exc:
        return FenceResult(
            fenced=False,
            reachable=True,
            how="command",
            lsn=None,
            detail=f"fence_command {argv[0]!r} could not be started: {exc.strerror or exc}",
        )
    stderr = bytearray()
    try:
        with anyio.move_on_after(timeout) as scope:
            async with anyio.create_task_group() as tg:
                collected = anyio.Event()
                tg.start_soon(_collect, process, stderr, collected)
                await process.wait()
                # A background child may keep stderr open: take what is there, then stop reading.
                with anyio.move_on_after(OUTPUT_GRACE):
                    await collected.wait()
                tg.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            _kill_group(process)
            with anyio.CancelScope(shield=True):
                await process.wait()
        await process.aclose()
    elapsed = time.monotonic() - started
    tail = stderr.decode(errors="replace").strip()[-OUTPUT_TAIL:]
    suffix = f": {tail}" if tail else ""
    if scope.cancelled_caught:
        return FenceResult(
            fenced=False,
            reachable=True,
            how="command",
            lsn=None,
            detail=f"fence_command {argv[0]!r} did not finish within {timeout:g}s and was killed{suffix}",
        )
    status = process.returncode
    if status == 0:
        return FenceResult(
            fenced=True,
            reachable=True,
            how="command",
            lsn=None,
            detail=f"fence_command {argv[0]!r} succeeded in {elapsed:.2f}s{suffix}",
        )
    return FenceResult(
        fenced=False,
        reachable=True,
        how="command",
        lsn=None,
        detail=f"fence_command {argv[0]!r} exited with status {status}{suffix}",
    )


async def _collect(process: Process, into: bytearray, done: anyio.Event) -> None:
    try:
        if process.stderr is None:
            return
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            async for chunk in process.stderr:
                into.extend(chunk)
                del into[: max(0, len(into) - 4 * OUTPUT_TAIL)]
    finally:
        done.set()


def _kill_group(process: Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()


async def _positions(session: asyncpg.Connection) -> tuple[bool, int | None, int | None]:
    row = await session.fetchrow(
        "SELECT pg_is_in_recovery() AS rec, pg_last_wal_receive_lsn() - '0/0' AS rcv,"
        " pg_last_wal_replay_lsn() - '0/0' AS rpl"
    )
    assert row is not None
    rcv = int(row["rcv"]) if row["rcv"] is not None else None
    rpl = int(row["rpl"]) if row["rpl"] is not None else None
    return bool(row["rec"]), rcv, rpl


async def wait_caught_up(
    conn: Connection,
    *,
    database: str,
    timeout: float,  # noqa: ASYNC109 - the contract's bound, applied inside with fail_after
    at_least_lsn: int | None = None,
) -> tuple[int | None, int | None]:
    """Until the standby has replayed what it received (and at least ``at_least_lsn``); returns
    ``(receive_lsn, replay_lsn)``.

    "Replayed what it received" also holds when neither position moves for ``STALL_GRACE`` seconds: a
    primary that died mid-record leaves a tail the standby can never replay. A server that is not in
    recovery (already promoted) is caught up by definition. Raises ``DRError`` on timeout, saying how far
    replay got, so the operator can judge the loss of a forced promotion.
    """
    what = f"waiting for {conn.describe()} to catch up"
    rcv: int | None = None
    rpl: int | None = None
    try:
        with anyio.fail_after(timeout):
            async with _session(conn, database, what) as session:
                last: tuple[int | None, int | None] | None = None
                still_since = time.monotonic()
                while True:
                    in_recovery, rcv, rpl = await _positions(session)
                    if not in_recovery:
                        return rcv, rpl
                    now = time.monotonic()
                    if (rcv, rpl) != last:
                        last, still_since = (rcv, rpl), now
                    enough = at_least_lsn is None or (rpl is not None and rpl >= at_least_lsn)
                    replayed = rpl is not None and (rcv is None or rpl >= rcv or now - still_since >= STALL_GRACE)
                    if enough and replayed:
                        return rcv, rpl
                    await anyio.sleep(POLL_INTERVAL)
    except TimeoutError:
        need = f", needed at least {_fmt_lsn(at_least_lsn)}" if at_least_lsn is not None else ""
        raise DRError(
            f"{what}: not caught up after {timeout:g}s (received {_fmt_lsn(rcv)}, replayed {_fmt_lsn(rpl)}{need})"
        ) from None
    except DATABASE_ERRORS as exc:
        raise DRError(f"{what}: {pg_message(exc)}") from None


def _fmt_lsn(lsn: int | None) -> str:
    if lsn is None:
        return "nothing"
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


async def _timeline(session: asyncpg.Connection) -> int:
    name = await session.fetchval("SELECT pg_walfile_name(pg_current_wal_lsn())")
    return int(str(name)[:8], 16)


async def promote(
    conn: Connection,
    *,
    database: str,
    catchup_timeout: float,
    promote_timeout: float,
    at_least_lsn: int | None = None,
) -> PromoteResult:
    """Promote the standby behind ``conn`` and prove it writable; raises ``DRError`` on any failure.

    Steps: wait for catch-up (``wait_caught_up``; refuses to promote if it times out), lift any read-only
    fence (a fenced old primary that rejoined as a standby must not come up read-only), ``pg_promote(true,
    n)``, then from a fresh session check it left recovery, is no longer read-only, and commits a test
    write. A server that is already out of recovery is not promoted again (a restarted agent must never
    repeat a promotion); the fence is still lifted and the write check still made, which completes a
    promotion interrupted after ``pg_promote``. So never call this on a server meant to stay fenced.
    """
    what = f"promoting {conn.describe()}"
    total = catchup_timeout + promote_timeout
    try:
        with anyio.fail_after(total):
            return await _promote(conn, database, what, catchup_timeout, promote_timeout, at_least_lsn)
    except TimeoutError:
        raise DRError(f"{what}: timed out after {total:g}s") from None
    except DATABASE_ERRORS as exc:
        raise DRError(f"{what}: {pg_message(exc)}") from None


async def _promote(
    conn: Connection,
    database: str,
    what: str,
    catchup_timeout: float,
    promote_timeout: float,
    at_least_lsn: int | None,
) -> PromoteResult:
    started = time.monotonic()
    async with _session(conn, database, what) as session:
        in_recovery, rcv, rpl = await _positions(session)
    if in_recovery:
        rcv, rpl = await wait_caught_up(conn, database=database, timeout=catchup_timeout, at_least_lsn=at_least_lsn)
    promote_started = time.monotonic()
    try:
        with anyio.fail_after(promote_timeout):
            async with _session(conn, database, what) as session:
                # ALTER SYSTEM works in recovery, so the fence is gone before the server can take writes.
                await session.execute(f"ALTER SYSTEM RESET {_READ_ONLY_GUC}")
                await session.fetchval("SELECT pg_reload_conf()")
                in_recovery, _, replayed = await _positions(session)
                if in_recovery:
                    wait_s = max(1, math.ceil(promote_timeout))
                    try:
                        done = await session.fetchval("SELECT pg_promote(true, $1)", wait_s)
                    except asyncpg.ObjectNotInPrerequisiteStateError:
                        done = True  # promoted by someone else meanwhile ("recovery is not in progress")
                    if not done:
                        raise DRError(f"{what}: pg_promote did not finish within {wait_s}s")
                promoted_lsn = replayed
                if promoted_lsn is None:
                    promoted_lsn = int(await session.fetchval("SELECT pg_current_wal_lsn() - '0/0'"))
            await _check_writable(conn, database, what)
            async with _session(conn, database, what) as session:
                timeline = await _timeline(session)
    except TimeoutError:
        raise DRError(f"{what}: promotion not verified within {promote_timeout:g}s") from None
    return PromoteResult(
        promoted_lsn=int(promoted_lsn),
        timeline=timeline,
        receive_lsn=rcv,
        replay_lsn=rpl,
        waited_catchup_s=promote_started - started,
        promote_s=time.monotonic() - promote_started,
    )


async def _check_writable(conn: Connection, database: str, what: str) -> None:
    """From fresh sessions: out of recovery, not read-only by default, and a READ WRITE transaction commits
    a WAL record (a logical message: nothing is left behind in any table)."""
    while True:
        async with _session(conn, database, what) as session:
            in_recovery = await session.fetchval("SELECT pg_is_in_recovery()")
            read_only = await session.fetchval("SHOW transaction_read_only")
            if not in_recovery and read_only == "off":
                try:
                    async with session.transaction(readonly=False):
                        await session.execute("SET TRANSACTION READ WRITE")
                        await session.fetchval("SELECT pg_logical_emit_message(true, 'kybdr-agent', 'promotion check')")
                except DATABASE_ERRORS as exc:
                    raise DRError(f"{what}: the test write failed: {pg_message(exc)}") from None
                return
        await anyio.sleep(POLL_INTERVAL)
