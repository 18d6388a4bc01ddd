"""The restored server, with ``restore --physical --start`` and the point-in-time drill: ``pg_ctl`` with its log in
``DIR/log/kybdr-restore.log`` (C messages, no logging collector, so the log can be read), watched through
``pg_controldata`` until it is in production or has stopped, and what its log says about where recovery ended.

Kept apart from ``restore_physical`` (laying down a base backup and its WAL) because the drill starts its own
servers the same way and reads the same log lines.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio

from kybdr_agent.errors import KybdrError
from kybdr_agent.postgres.connection import PG_LIB_ROOT


class PhysicalRestoreError(KybdrError):
    """The point-in-time restore cannot be done or did not finish; the message says what was left where."""


_WATCH_SECONDS: Final = 0.5
_PID_GRACE_SECONDS: Final = 30.0
_READY_SECONDS: Final = 30.0
LOG_TAIL_LINES: Final = 15
C_LOCALE: Final = {"LC_ALL": "C", "LANG": "C"}
_STOPPING: Final = re.compile(r"recovery stopping (?:before|after) .*")
_REDO_DONE: Final = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+)")
LAST_TRANSACTION: Final = re.compile(r"last completed transaction was at log time (.+)$")
NEW_TIMELINE: Final = re.compile(r"selected new timeline ID: (\d+)")


@dataclass
class ServerOutcome:
    log: str
    port: int | None
    seconds: float
    stopped: str | None = None  # PostgreSQL's "recovery stopping before commit of transaction …, time …"
    redo_done_lsn: str | None = None
    last_transaction_time: str | None = None
    timeline: int | None = None
    accepting_connections: bool = False

    def document(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ServerRun:
    """One ``pg_ctl start`` of the restored directory, watched until it has promoted or stopped."""

    def __init__(self, pgdata: Path, server_version_num: int, *, pg_bin_dir: Path | None, port: int | None) -> None:
        self.pgdata, self.port = pgdata, port
        self.major = server_version_num // 10000
        self.bin_dir = pg_bin_dir
        self.log = pgdata / "log" / "kybdr-restore.log"
        self.started = False

    def binary(self, name: str) -> str:
        for directory in (self.bin_dir, PG_LIB_ROOT / str(self.major) / "bin"):
            if directory is not None and os.access(directory / name, os.X_OK):
                return str(directory / name)
        found = shutil.which(name)
        if found is None:
            raise PhysicalRestoreError(f"{name} (PostgreSQL {self.major}) not found; set database.pg_bin_dir")
        return found

    async def _run(self, *argv: str) -> tuple[int, str]:
        proc = await anyio.run_process(list(argv), check=False, env={**os.environ, **C_LOCALE})
        return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace")

    async def start_and_wait(self, failures: Any) -> ServerOutcome:
        """Start; wait until promoted (the control file says "in production") or stopped (raises, log tail)."""
        began = time.monotonic()
        self.log.parent.mkdir(mode=0o700, exist_ok=True)
        # The log goes to a file we read, in English, whatever the copied configuration says.
        options = "-c logging_collector=off -c lc_messages=C" + (f" -p {self.port}" if self.port else "")
        self.started = True
        code, output = await self._run(
            self.binary("pg_ctl"), "-D", str(self.pgdata), "-l", str(self.log), "-o", options, "-W", "start"
        )
        if code != 0:
            raise PhysicalRestoreError(
                f"pg_ctl could not start the restored server: {output.strip()} ({self.pgdata} and its WAL spool are "
                "left as they are, the spool's missing files marked failed: remove both before restoring again)"
            )
        while True:
            await anyio.sleep(_WATCH_SECONDS)
            if await self._state() == "in production":
                break
            if not self._alive(time.monotonic() - began):
                raise PhysicalRestoreError(self._stopped_message(failures()))
        outcome = ServerOutcome(str(self.log), self.port, 0.0)
        with anyio.move_on_after(_READY_SECONDS):
            while not (outcome.accepting_connections or not self._alive(time.monotonic() - began)):
                outcome.accepting_connections = "ready to accept connections" in self._log_text()
                await anyio.sleep(0.2)
        self._read_log(outcome)
        outcome.seconds = round(time.monotonic() - began, 3)
        return outcome

    async def _state(self) -> str | None:
        code, output = await self._run(self.binary("pg_controldata"), "-D", str(self.pgdata))
        for line in output.splitlines() if code == 0 else []:
            if line.startswith("Database cluster state:"):
                return line.split(":", 1)[1].strip()
        return None

    def _alive(self, elapsed: float) -> bool:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return elapsed < _PID_GRACE_SECONDS and not self._log_says_stopped()
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _log_text(self) -> str:
        try:
            with open(self.log, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - (256 << 10)))
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _log_says_stopped(self) -> bool:
        return "database system is shut down" in self._log_text()

    def _stopped_message(self, failures: list[str]) -> str:
        tail = "\n".join(self._log_text().rstrip().splitlines()[-LOG_TAIL_LINES:])
        fetch = f" {failures[0]}." if failures else ""
        return (
            f"PostgreSQL stopped before it finished recovery, and never opened the database.{fetch} The directory "
            f"is left for inspection ({self.pgdata}; its WAL spool's missing files are marked failed, so starting it "
            f"again stops again). The end of its log ({self.log}):\n{tail}"
        )

    def _read_log(self, outcome: ServerOutcome) -> None:
        for line in self._log_text().splitlines():
            if found := _STOPPING.search(line):
                outcome.stopped = found.group(0)
            if found := _REDO_DONE.search(line):
                outcome.redo_done_lsn = found.group(1)
            if found := LAST_TRANSACTION.search(line):
                outcome.last_transaction_time = found.group(1).strip()
            if found := NEW_TIMELINE.search(line):
                outcome.timeline = int(found.group(1))

    async def stop_if_running(self) -> None:
        if self._alive(_PID_GRACE_SECONDS):
            with anyio.move_on_after(60):
                await self._run(self.binary("pg_ctl"), "-D", str(self.pgdata), "-m", "immediate", "-w", "stop")
