"""Stream mode: ``pg_receivewal`` under the agent's supervision, on a physical replication slot.

**The slot** (``wal.slot_name``) is created if missing (``pg_create_physical_replication_slot(slot, true)``:
reserving WAL at once, so nothing written between its creation and pg_receivewal's first connection is
lost). It makes the server keep every segment pg_receivewal has not confirmed, which is what lets the agent
stop, restart or be killed without a gap in the archive — and why ``max_slot_wal_keep_size`` must be set
on the server (docs/wal.md): a slot nobody reads would otherwise fill ``pg_wal``. The WAL the slot holds
(``pg_current_wal_lsn() - restart_lsn``) and its ``wal_status`` are read every ``SLOT_CHECK_SECONDS`` for
``/v1/wal/status`` and the ``kybdr_wal_slot_retained_bytes`` metric.

**The flags**, chosen deliberately: ``--slot`` (the slot above; since PostgreSQL 15 an empty directory
resumes from the slot's ``restart_lsn``), ``--synchronous`` (flush every write and report the flush at once:
the slot then advances only past WAL that is on the agent's disk, and a ``.partial`` holds every commit the
server has sent), ``--no-loop`` (a lost connection ends it; the agent restarts it with a bounded backoff and
records why), ``--no-password`` (never prompt: the password comes from the same ``PG*`` environment as
pg_dump's, built by ``postgres.connection`` from ``database.password_file``, never argv). No
``--compress``: the shipper compresses and seals, and PostgreSQL's own tools can read the spool as it is.

**Stopping**: SIGTERM, on which pg_receivewal flushes its ``.partial`` and exits; SIGKILL after
``STOP_GRACE`` seconds. Its parent-death signal is SIGTERM too, so an agent killed with ``kill -9`` does not
leave an orphan holding the slot (the restarted agent's pg_receivewal would be refused: "replication slot
is active").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus

from kybdr_agent.asyncutil import TailBuffer
from kybdr_agent.backup.pgdump import drain_into, failure_message, stop_process
from kybdr_agent.clock import Clock
from kybdr_agent.errors import KybdrError
from kybdr_agent.postgres.connection import DATABASE_ERRORS, Connection, pg_message
from kybdr_agent.telemetry import get_logger
from kybdr_agent.wal.status import ReceiverState

RESTART_FIRST: Final = 1.0
RESTART_MAX: Final = 30.0
HEALTHY_RUN_SECONDS: Final = 60.0  # a run this long resets the backoff
SLOT_CHECK_SECONDS: Final = 10.0
STATUS_INTERVAL_SECONDS: Final = 10
STOP_GRACE: Final = 10.0
_PR_SET_PDEATHSIG: Final = 1
log = get_logger("kybdr_agent.wal")

_SLOT_SQL: Final = """
select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint as retained, wal_status, active
from pg_replication_slots where slot_name = $1 and slot_type = 'physical'
"""


def receivewal_argv(binary: str, spool_dir: Path, slot: str) -> list[str]:
    return [
        binary,
        f"--directory={spool_dir}",
        f"--slot={slot}",
        "--synchronous",
        "--no-loop",
        "--no-password",
        f"--status-interval={STATUS_INTERVAL_SECONDS}",
    ]


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the agent dies (Linux ``PR_SET_PDEATHSIG``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return preexec


async def ensure_slot(conn: Any, slot: str) -> bool:
    """Create the physical slot if it is missing; True when this call created it."""
    kind = await conn.fetchval("select slot_type from pg_replication_slots where slot_name = $1", slot)
    if kind is not None:
        if kind != "physical":
            raise KybdrError(
                f"replication slot {slot!r} exists but is {kind}, not physical: pick another wal.slot_name"
            )
        return False
    try:
        await conn.execute("select pg_create_physical_replication_slot($1, true)", slot)
    except Exception as exc:
        if getattr(exc, "sqlstate", None) == "42710":  # duplicate_object: created meanwhile by someone else
            return False
        raise
    return True


class Receiver:
    """Keeps pg_receivewal running into ``spool_dir`` and watches its slot; see the module docstring."""

    def __init__(
        self,
        connection: Connection,
        *,
        database: str,
        spool_dir: Path,
        slot: str,
        clock: Clock,
        on_segment: Callable[[], None] | None = None,
    ) -> None:
        self.connection = connection
        self.database = database
        self.spool_dir = spool_dir
        self.slot = slot
        self.clock = clock
        self.on_segment = on_segment
        self.state = ReceiverState(slot=slot)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_slot, name="wal:slot")
            await self._supervise()

    async def _supervise(self) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await self._run_once()
                problem = "pg_receivewal exited"
            except KybdrError as exc:
                problem = str(exc)
            except DATABASE_ERRORS as exc:
                problem = f"cannot prepare the replication slot {self.slot!r}: {pg_message(exc)}"
            self.state.running, self.state.pid = False, None
            self.state.last_exit, self.state.last_exit_at = problem[:500], self.clock()
            failures = 1 if time.monotonic() - started >= HEALTHY_RUN_SECONDS else failures + 1
            delay = min(RESTART_MAX, RESTART_FIRST * 2 ** (failures - 1))
            log.warning("wal.receiver_stopped", error=self.state.last_exit, restart_in=delay)
            await anyio.sleep(delay)

    async def _run_once(self) -> None:
        async with self.connection.connect(self.database) as conn:
            if await ensure_slot(conn, self.slot):
                log.info("wal.slot_created", slot=self.slot)
            major = conn.get_server_version().major
            env = self.connection.child_env(self.database, conn)
        binary = self.connection.binary("pg_receivewal", major)
        await anyio.to_thread.run_sync(lambda: self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True))
        argv = receivewal_argv(binary, self.spool_dir, self.slot)
        stderr = TailBuffer()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=_die_with_parent(),  # one prctl call in the child: no locks taken
        )
        self.state.running, self.state.pid = True, proc.pid
        self.state.starts += 1
        log.info("wal.receiver_started", pid=proc.pid, slot=self.slot, spool=str(self.spool_dir))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain_into, proc.stderr, stderr)
                returncode = await proc.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await stop_process(proc, STOP_GRACE)
        raise KybdrError(failure_message("pg_receivewal", returncode, stderr))

    async def _watch_slot(self) -> None:
        while True:
            with contextlib.suppress(*DATABASE_ERRORS, KybdrError):
                await self.check_slot()
            await anyio.sleep(SLOT_CHECK_SECONDS)

    async def check_slot(self) -> None:
        """Read how much WAL the slot holds on the server (and whether it is still usable)."""
        try:
            async with self.connection.connect(self.database) as conn:
                row = await conn.fetchrow(_SLOT_SQL, self.slot)
        except (KybdrError, *DATABASE_ERRORS) as exc:
            self.state.last_error = f"reading the slot: {exc}"[:500]
            raise
        self.state.slot_checked_at = self.clock()
        if row is None:
            self.state.slot_retained_bytes = self.state.slot_wal_status = None
            return
        self.state.slot_retained_bytes = int(row["retained"]) if row["retained"] is not None else None
        self.state.slot_wal_status = row["wal_status"]
        self.state.last_error = None
