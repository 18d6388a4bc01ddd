"""The restore drill of a physical backup: a point-in-time restore into a scratch data directory, started on a
private socket, recovered, queried, timed — then stopped and removed, whatever happened.

A logical backup's drill restores into a scratch database (``backup/drill.py``); a physical backup is a whole
cluster, so its drill is what an operator would do after losing the server: ``restore_physical`` into an empty
directory (``<backup_dir>/drills/pitr-<random>``, with its WAL spool beside the data), start PostgreSQL on it,
wait until recovery has reached the target and the server is out of recovery, and run a query. The figure it
reports is the **RTO**: seconds from the drill's start to the first successful query — repository to answering
server, the number the issue asks to measure.

**How the server runs.** The restore is made without ``start`` and the drill starts the server itself, because:

* as root, ``restore --physical --start`` is refused (PostgreSQL does not run as root): the drill then gives the
  directory to the database's OS user (``os_user``, ``postgres``) and runs ``pg_ctl`` as that user — the
  daemon may run as either;
* the copied ``postgresql.conf`` and ``pg_hba.conf`` are the source's. The drill overrides what would reach
  outside the scratch directory or hurt the host: ``listen_addresses = ''`` (no TCP at all; the "free port" only
  names the socket), ``unix_socket_directories`` = the drill's own 0700 ``sock`` folder, ``hba_file`` = the
  drill's own (``local all all trust``: only root and that OS user can enter the folder), ``archive_mode = off``
  (written by the restore: a promoted scratch copy must never archive into the source's repository), and a
  modest ``shared_buffers`` (a drill on the production host must not take the production server's memory).
  The settings hot standby compares with the source (``max_connections`` and friends) are left as copied.

**Always cleaned up.** The server is stopped (``pg_ctl stop -m fast``, then ``immediate`` if that does not
end it) and the directory and spool removed on success, failure and cancellation alike, shielded from the
cancellation itself; a failure to clean up is reported beside the verdict, never in place of it.

**What is compared.** ``select count(*) from pg_class`` must answer on a server out of recovery. A physical
manifest has no per-table row counts (a base backup does not connect to each database), and "latest" recovers
past the backup anyway, so nothing row-level is compared.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg

from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.physical_manifest import physical_info
from kybdr_agent.errors import KybdrError
from kybdr_agent.postgres.cluster import free_port
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.telemetry import get_logger
from kybdr_agent.wal.names import WalError
from kybdr_agent.wal.restore_physical import PhysicalRestoreRequest, restore_physical
from kybdr_agent.wal.restore_server import C_LOCALE, LAST_TRANSACTION, LOG_TAIL_LINES, NEW_TIMELINE, ServerRun
from kybdr_agent.wal.targets import LatestTarget, RecoveryTarget
from kybdr_agent.wal.window_report import ArchiveFor, describe_target

log = get_logger("kybdr_agent.wal.drill")

DRILL_PREFIX: Final = "pitr-"
CHECK_QUERY: Final = "select count(*) from pg_class"
RECOVERY_TIMEOUT: Final = 900.0
STOP_TIMEOUT: Final = 60
_POLL_SECONDS: Final = 0.2
_CONNECT_SECONDS: Final = 5.0
# Errors that waiting does not cure: the role or database the check connects with does not exist.
_FATAL_CONNECT: Final = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError)


class DrillError(KybdrError):
    """The point-in-time drill failed; the message says where (restore, start, recovery, query)."""


@dataclass(frozen=True)
class DrillOptions:
    """Where and how a drill runs. ``user``/``database``: what the check connects as (trust, over the drill's
    own socket); ``os_user``: who runs the server when the drill runs as root."""

    scratch_root: Path
    target: RecoveryTarget = field(default_factory=LatestTarget)
    user: str = "postgres"
    database: str = "postgres"
    os_user: str = "postgres"
    shared_buffers: str = "128MB"
    timeout: float = RECOVERY_TIMEOUT
    pg_bin_dir: Path | None = None


class _Scratch:
    """The drill's directory: data, WAL spool, socket folder, hba file, server log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pgdata = root / "data"
        self.spool = root / "wal-spool"
        self.sock = root / "sock"
        self.hba = root / "pg_hba.conf"
        self.log = root / "server.log"


def _owner(os_user: str) -> tuple[int, int] | None:
    """(uid, gid) to run the server as, when this process is root; None when it runs as itself."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(os_user)
    except KeyError:
        raise DrillError(f"the OS user {os_user!r} to run the drill's server does not exist") from None
    return pw.pw_uid, pw.pw_gid


def _run(argv: list[str], owner: tuple[int, int] | None, cwd: Path, timeout: float) -> tuple[int, str]:
    demote: dict[str, Any] = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            env={**os.environ, **C_LOCALE},
            cwd=cwd,
            timeout=timeout,
            check=False,
            **demote,
        )
    except subprocess.TimeoutExpired:
        return -1, f"{os.path.basename(argv[0])} did not finish in {timeout:.0f} s"
    return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()


def _make_scratch(options: DrillOptions, owner: tuple[int, int] | None) -> _Scratch:
    if not options.scratch_root.exists():
        options.scratch_root.mkdir(mode=0o700, parents=True)
        if owner is not None:  # the server's user must enter it; nobody else
            os.chown(options.scratch_root, *owner)
    scratch = _Scratch(options.scratch_root / f"{DRILL_PREFIX}{secrets.token_hex(6)}")
    scratch.root.mkdir(mode=0o700)
    scratch.sock.mkdir(mode=0o700)
    if owner is not None:
        os.chown(scratch.root, *owner)
        os.chown(scratch.sock, *owner)
        code, _ = _run(["test", "-w", str(scratch.root)], owner, Path("/"), 10)
        if code != 0:
            raise DrillError(
                f"the drill's directory {scratch.root} is not reachable by the OS user {options.os_user!r}, who must "
                f"run the restored server: let it traverse {options.scratch_root}'s parents (or set the drill's "
                "scratch directory elsewhere)"
            )
    return scratch


def _chown_tree(path: Path, owner: tuple[int, int]) -> None:
    os.chown(path, *owner)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), *owner, follow_symlinks=False)


def _prepare_server(scratch: _Scratch, owner: tuple[int, int] | None) -> None:
    """The drill's hba file, and a ``postgresql.conf`` when the backup has none (Debian keeps it in
    /etc/postgresql, outside the data directory pg_basebackup copies; the server will not start without one)."""
    conf = scratch.pgdata / "postgresql.conf"
    if not conf.exists():
        conf.write_text(
            "# written by the kybdr-agent drill: the source's configuration lives outside its data directory\n"
        )
    scratch.hba.write_text("# the drill's own: its socket folder is 0700, only root and the server's user enter\n"
                           "local all all trust\n")  # fmt: skip
    if owner is not None:
        for path in (scratch.pgdata, scratch.spool):
            _chown_tree(path, owner)
        os.chown(scratch.hba, *owner)


def _server_options(scratch: _Scratch, port: int, shared_buffers: str) -> str:
    settings = {
        "port": str(port),
        "listen_addresses": "",
        "unix_socket_directories": str(scratch.sock),
        "hba_file": str(scratch.hba),
        "shared_buffers": shared_buffers,
        "logging_collector": "off",
        "lc_messages": "C",
    }
    # pg_ctl hands -o to a shell: each value is quoted for it.
    return " ".join(f"-c {shlex.quote(f'{name}={value}')}" for name, value in settings.items())


def _log_text(scratch: _Scratch) -> str:
    try:
        with open(scratch.log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - (256 << 10)))
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _log_tail(scratch: _Scratch) -> str:
    return "\n".join(_log_text(scratch).rstrip().splitlines()[-LOG_TAIL_LINES:])


def _server_alive(scratch: _Scratch) -> bool:
    try:
        pid = int((scratch.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _first_answer(scratch: _Scratch, port: int, options: DrillOptions, began: float) -> tuple[float, int]:
    """Poll until the server is out of recovery and answers the check query: (RTO, its answer)."""
    deadline = time.monotonic() + options.timeout
    started_grace = time.monotonic() + 30  # the postmaster.pid may take a moment to appear
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(
                host=str(scratch.sock), port=port, user=options.user, database=options.database,
                timeout=_CONNECT_SECONDS, server_settings={"application_name": "kybdr-agent drill"},
            )  # fmt: skip
            try:
                if await conn.fetchval("select pg_is_in_recovery()") is False:
                    count = int(await conn.fetchval(CHECK_QUERY))
                    return time.monotonic() - began, count
                last_error = "still in recovery"
            finally:
                await conn.close(timeout=_CONNECT_SECONDS)
        except _FATAL_CONNECT as exc:
            raise DrillError(
                f"the restored server answers, but the check cannot connect as {options.user!r} to "
                f"{options.database!r}: {exc}"
            ) from None
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            last_error = str(exc) or type(exc).__name__
        if not _server_alive(scratch) and time.monotonic() > started_grace:
            raise DrillError(
                "PostgreSQL stopped before it finished recovery: the restored database never opened. The end of its "
                f"log:\n{_log_tail(scratch)}"
            )
        await anyio.sleep(_POLL_SECONDS)
    raise DrillError(
        f"the restored server was not out of recovery and answering within {options.timeout:.0f} s "
        f"({last_error}). The end of its log:\n{_log_tail(scratch)}"
    )


def _read_log(scratch: _Scratch, result: dict[str, Any]) -> None:
    for line in _log_text(scratch).splitlines():
        if found := LAST_TRANSACTION.search(line):
            result["last_transaction_time"] = found.group(1).strip()
        if found := NEW_TIMELINE.search(line):
            result["timeline"] = int(found.group(1))  # the one the promoted copy opened


def _stop_and_remove(scratch: _Scratch, server: ServerRun | None, owner: tuple[int, int] | None) -> str | None:
    """Stop the server if one runs, then remove the directory; what could not be done, or None.

    A server that will not stop keeps its directory: removing the files under a running server helps nobody."""
    problems: list[str] = []
    if server is not None and _server_alive(scratch):
        pg_ctl = server.binary("pg_ctl")
        for mode in ("fast", "immediate"):
            code, output = _run(
                [pg_ctl, "-D", str(scratch.pgdata), "-m", mode, "-w", "-t", str(STOP_TIMEOUT), "stop"],
                owner, scratch.root, STOP_TIMEOUT + 10,
            )  # fmt: skip
            if code == 0 and not _server_alive(scratch):
                break
            problems.append(f"pg_ctl stop -m {mode}: {output or f'exit status {code}'}")
        if _server_alive(scratch):
            return "; ".join(problems) + f"; the server still runs on {scratch.pgdata}, which is left in place"
    shutil.rmtree(scratch.root, ignore_errors=True)
    if scratch.root.exists():
        return f"{scratch.root} could not be removed entirely"
    return None


async def pitr_drill(
    store: BlobStore,
    manifests: list[Manifest],
    keyring: KeyRing | None,
    archive_for: ArchiveFor,
    m: Manifest,
    options: DrillOptions,
) -> dict[str, Any]:
    """Drill physical backup ``m`` (module docstring). Returns the drill's document: ``passed``, ``rto_seconds``,
    ``error`` when it failed, ``cleanup_error`` when its directory or server could not be removed."""
    began = time.monotonic()
    info = physical_info(m)
    result: dict[str, Any] = {
        "database": m.database,
        "backup_id": m.id,
        "kind": "physical",
        "system_identifier": info.system_identifier,
        "target": describe_target(options.target),
        "passed": False,
        "rto_seconds": None,
    }
    scratch: _Scratch | None = None
    server: ServerRun | None = None
    owner: tuple[int, int] | None = None
    try:
        owner = _owner(options.os_user)
        scratch = await anyio.to_thread.run_sync(_make_scratch, options, owner)
        result["scratch_dir"] = str(scratch.root)
        request = PhysicalRestoreRequest(
            scratch.pgdata, options.target, backup_id=m.id, spool=scratch.spool, start=False, disable_archiving=True
        )
        restored = await restore_physical(
            store, manifests, keyring, archive_for, request, pg_bin_dir=options.pg_bin_dir
        )
        result.update(
            restore_seconds=restored.seconds,
            tar_bytes=restored.tar_bytes,
            wal_files=restored.wal_files,
            recovery_timeline=restored.timeline,
        )
        await anyio.to_thread.run_sync(_prepare_server, scratch, owner)
        port = free_port()
        result["port"] = port
        server = ServerRun(scratch.pgdata, info.server_version_num, pg_bin_dir=options.pg_bin_dir, port=port)
        argv = [
            server.binary("pg_ctl"), "-D", str(scratch.pgdata), "-l", str(scratch.log),
            "-o", _server_options(scratch, port, options.shared_buffers), "-W", "start",
        ]  # fmt: skip
        code, output = await anyio.to_thread.run_sync(_run, argv, owner, scratch.root, 60.0)
        if code != 0:
            raise DrillError(f"pg_ctl could not start the restored server: {output}\n{_log_tail(scratch)}")
        rto, count = await _first_answer(scratch, port, options, began)
        result.update(rto_seconds=round(rto, 3), pg_class_count=count, tables_compared=0, passed=True)
        _read_log(scratch, result)
    except (KybdrError, WalError, OSError) as exc:
        result["error"] = str(exc) if not isinstance(exc, OSError) else f"the drill failed: {exc}"
    finally:
        with anyio.CancelScope(shield=True):
            if scratch is not None:
                cleanup = await anyio.to_thread.run_sync(_stop_and_remove, scratch, server, owner)
                if cleanup is not None:
                    result["cleanup_error"] = cleanup
    result["seconds"] = round(time.monotonic() - began, 3)
    log.info(
        "drill.pitr_done",
        backup_id=m.id,
        passed=result["passed"],
        rto_seconds=result["rto_seconds"],
        error=result.get("error"),
    )
    return result
