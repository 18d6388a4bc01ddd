"""What the WAL code must know about a cluster before it touches its archive: which cluster (system identifier),
which timeline it writes now, and its WAL segment size — read from the server, never configured, so an
archive can never be keyed by a guess.

The system identifier and segment size come from ``pg_control_system()`` / ``pg_control_init()`` (the control
file: exactly what ``pg_controldata`` prints and what every WAL page header carries). The timeline is the one
WAL is *being written* on: on a primary the timeline of ``pg_current_wal_lsn()``'s file, which changes the
moment a promotion ends, unlike the last checkpoint's; on a standby (no insert position) the timeline of the
WAL it last replayed, from the control file's latest checkpoint.

And one fact about each archived WAL file: the span of commit timestamps in it (``CommitTimeReader``), which
is what makes a target *time* resolvable to the archive.
"""

from __future__ import annotations

import asyncio
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import anyio

from kybdr_agent.backup.pgdump import stop_process
from kybdr_agent.postgres.connection import database_errors
from kybdr_agent.wal.names import PARTIAL_SUFFIX, check_segment_size, check_timeline
from kybdr_agent.wal.records import CommitTimes, check_system_identifier

_FACTS_SQL = """
select
    (select system_identifier::text from pg_control_system()) as system_identifier,
    (select bytes_per_wal_segment from pg_control_init()) as segment_size,
    pg_is_in_recovery() as in_recovery,
    case when pg_is_in_recovery() then (select timeline_id from pg_control_checkpoint())
         else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint
    end as timeline
"""


async def system_facts(conn: Any) -> tuple[str, int, int]:
    """``(system identifier, current timeline, wal_segment_size)`` of the server ``conn`` (asyncpg) is on.

    Needs ``EXECUTE`` on the ``pg_control_*`` functions (superuser or ``pg_monitor``, as the agent's role
    already has for backups); a refusal is a ``DumpError`` naming what was being read."""
    with database_errors("reading the cluster's system identifier, timeline and WAL segment size"):
        row = await conn.fetchrow(_FACTS_SQL)
    return (
        check_system_identifier(str(row["system_identifier"])),
        check_timeline(int(row["timeline"])),
        check_segment_size(int(row["segment_size"])),
    )


# --- commit timestamps of one WAL file ----------------------------------------------------------------

WALDUMP_TIMEOUT: Final = 30.0
WALDUMP_DIR: Final = ".waldump"
# pg_waldump's description of a transaction's end (src/backend/access/rmgrdesc/xactdesc.c), run with TZ=UTC:
# "COMMIT 2026-12-02 05:35:41.927375 UTC", "ABORT …", "COMMIT_PREPARED 745: 2026-… UTC"
_XACT_END: Final = re.compile(
    rb"desc: (?:COMMIT|ABORT)(?:_PREPARED \d+:)? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,6})?) UTC\b"
)


def parse_xact_time(raw: bytes) -> datetime:
    text = raw.decode("ascii")
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f" if "." in text else "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


def xact_end_time(line: bytes) -> datetime | None:
    """The timestamp of a commit or abort record in one line of ``pg_waldump`` output, else None."""
    match = _XACT_END.search(line)
    return parse_xact_time(match[1]) if match else None


class CommitTimeReader:
    """The commit and abort timestamps in a WAL file, read with ``pg_waldump --rmgr=Transaction``.

    What the recovery window is made of (``wal/window.py``: a target time is recoverable up to the newest
    commit known to be archived). Streamed line by line (a dense segment is ~100k commits: only the count and
    the extremes are kept), bounded by ``WALDUMP_TIMEOUT``; a file pg_waldump cannot read to its end yields
    what it read, so the window is understated, never overstated. pg_waldump needs a file under its segment
    name: a complete spool file is read where it is; a ``.partial``'s content is written to
    ``<spool>/.waldump/<segment>`` first (the spool's own filesystem, not a tmpfs) and removed after.
    Cost (measured, docs/wal.md): a fraction of the time it takes to seal and upload the same segment.
    """

    def __init__(self, pg_waldump: str, spool_dir: Path, timeout: float = WALDUMP_TIMEOUT) -> None:
        self.pg_waldump = pg_waldump
        self.spool_dir = spool_dir
        self.timeout = timeout

    async def __call__(self, name: str, data: bytes) -> CommitTimes | None:
        if not name.endswith(PARTIAL_SUFFIX):
            return await self._read(self.spool_dir / name)
        scratch = self.spool_dir / WALDUMP_DIR
        copy = scratch / name.removesuffix(PARTIAL_SUFFIX)

        def write() -> None:
            scratch.mkdir(mode=0o700, exist_ok=True)
            copy.write_bytes(data)

        await anyio.to_thread.run_sync(write)
        try:
            return await self._read(copy)
        finally:
            copy.unlink(missing_ok=True)

    async def _read(self, path: Path) -> CommitTimes | None:
        env = {"TZ": "UTC", "LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        proc = await asyncio.create_subprocess_exec(
            self.pg_waldump,
            "--rmgr=Transaction",
            str(path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        count, first, last = 0, None, None
        try:
            with anyio.fail_after(self.timeout):
                assert proc.stdout is not None
                async for line in proc.stdout:
                    moment = xact_end_time(line)
                    if moment is not None:
                        count += 1
                        first = moment if first is None or moment < first else first
                        last = moment if last is None or moment > last else last
                await proc.wait()
        except TimeoutError:
            return None
        finally:
            with anyio.CancelScope(shield=True):
                await stop_process(proc, 2.0)
        return CommitTimes(count=count, first=first, last=last)
