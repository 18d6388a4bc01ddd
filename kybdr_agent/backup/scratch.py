"""Scratch databases (``kybdr_restore_*`` for restores, ``kybdr_drill_*`` for drills): held while in use,
dropped by whoever finds one that nobody holds.

A restore or drill takes a session-level advisory lock named after its scratch database before it creates
it, on a maintenance-database connection it keeps for as long as the scratch database exists. The server
releases that lock the moment the session ends — a ``kill -9`` of the agent included — so a sweeper that
*can* take the lock knows the owner is gone, whichever host or process it was. Sweeps run at the daemon's
start and housekeeping ticks, and before every restore and drill.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import anyio

from kybdr_agent.postgres.connection import DATABASE_ERRORS, pg_message

RESTORE_PREFIX: Final = "kybdr_restore_"
DRILL_PREFIX: Final = "kybdr_drill_"
SCRATCH_PREFIXES: Final = (RESTORE_PREFIX, DRILL_PREFIX)
LOCK_CLASS: Final = 0x6B796264  # "kybd": the advisory-lock namespace of scratch databases
DROP_DEADLINE: Final = 60.0
KEEP_MARK: Final = "kybdr-agent: keep"


async def mark_keep(admin: Any, name: str, why: str) -> None:
    """Protect a scratch database that holds the only copy of something (a restore whose final rename
    failed after the old target was dropped) from every later sweep; best effort."""
    note = f"{KEEP_MARK}: {why}"
    with contextlib.suppress(*DATABASE_ERRORS):
        await admin.execute(f"comment on database {quote_ident(name)} is '{note.replace(chr(39), chr(39) * 2)}'")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def is_scratch(name: str) -> bool:
    return name.startswith(SCRATCH_PREFIXES)


@dataclass
class ScratchSweep:
    dropped: list[str] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"dropped_scratch": self.dropped, "scratch_in_use": self.in_use, "scratch_not_dropped": self.failed}


async def _try_lock(admin: Any, name: str) -> bool:
    return bool(await admin.fetchval("select pg_try_advisory_lock($1, hashtext($2))", LOCK_CLASS, name))


async def _unlock(admin: Any, name: str) -> None:
    await admin.fetchval("select pg_advisory_unlock($1, hashtext($2))", LOCK_CLASS, name)


@asynccontextmanager
async def held(admin: Any, name: str) -> AsyncIterator[None]:
    """Hold ``name``'s lock on ``admin`` (a maintenance-database session) for the block."""
    if not await _try_lock(admin, name):
        raise RuntimeError(f"scratch database name {name} is already held")  # 48 random bits: a bug if seen
    try:
        yield
    finally:
        with anyio.move_on_after(DROP_DEADLINE, shield=True), contextlib.suppress(*DATABASE_ERRORS):
            await _unlock(admin, name)


async def drop_scratch(admin: Any, name: str) -> str | None:
    """Drop one scratch database (bounded, shielded); the error message if it could not be dropped."""
    with anyio.move_on_after(DROP_DEADLINE, shield=True) as scope:
        try:
            await admin.execute(f"drop database if exists {quote_ident(name)} with (force)")
        except DATABASE_ERRORS as exc:
            return pg_message(exc)
    return f"dropping it took longer than {DROP_DEADLINE:g} s" if scope.cancelled_caught else None


async def sweep_scratch(admin: Any) -> ScratchSweep:
    """Drop every scratch database whose owner's session is gone; report those in use or not droppable."""
    report = ScratchSweep()
    rows = await admin.fetch(
        "select datname, coalesce(shobj_description(oid, 'pg_database'), '') as note from pg_catalog.pg_database "
        "where datname like 'kybdr\\_restore\\_%' or datname like 'kybdr\\_drill\\_%' order by 1"
    )
    for row in rows:
        name = row["datname"]
        if row["note"].startswith(KEEP_MARK):
            report.failed[name] = row["note"]
            continue
        if not await _try_lock(admin, name):
            report.in_use.append(name)
            continue
        try:
            error = await drop_scratch(admin, name)
        finally:
            with contextlib.suppress(*DATABASE_ERRORS):
                await _unlock(admin, name)
        if error is None:
            report.dropped.append(name)
        else:
            report.failed[name] = error
    return report
