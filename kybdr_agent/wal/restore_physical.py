"""``restore --physical``: a base backup and the WAL after it, written into an empty directory that then starts
with a plain ``pg_ctl -D DIR start`` and recovers to the target.

The steps, and why in this order:

1. **Plan before touching anything** (``window_report.plan_restore``): the base backup, the WAL, the target
   and the timeline come from the repository, and a target nothing reaches fails here, with the window in
   the message, before a byte is written. The directory must not exist or be empty, and so must the spool.
2. **The tar streams in**: repository → SHA-256 → frames opened → decompressed (``backup.decode``, as a
   logical restore reads) → ``tar_extract`` writing into the directory (0700, owned by whoever runs this),
   refusing any path that would leave it. Memory is the decoder's queues, whatever the backup's size. The
   stream's totals are checked at its end; a backup that does not verify leaves nothing behind.
3. **WAL is fetched meanwhile** (``prefetch``), in parallel, into a spool *outside* the directory — by default
   ``<DIR>.wal-spool`` beside it: inside, it would be copied into the restored server's own base backups; a
   sibling is on the same filesystem and belongs to the same user, so whoever can start the server can read
   it. ``restore_command`` is then a plain shell copy from it (``wal.recovery``), no agent start per file.
4. **Recovery settings**: the block of ``RecoverySettings.conf_text`` appended to ``postgresql.auto.conf`` (the
   target, ``recovery_target_timeline`` as the planned number, ``recovery_target_action = 'promote'``),
   ``recovery.signal`` created, any ``standby.signal`` removed. Then everything is fsynced (``sync_tree``;
   PostgreSQL syncs again when it starts, but a crash in between must not leave a directory that looks
   restored and is not).
5. With ``start``, ``ServerRun`` starts it (``pg_ctl``, its log in ``DIR/log/kybdr-restore.log``) and watches
   the control file (``pg_controldata``, no connection: the copied ``pg_hba.conf`` need not let us in) until
   the cluster is "in production" — promoted — or the server has stopped; the spool follows it with a bounded
   window of segments, and where recovery stopped is read from the log. Without ``start`` the
   whole WAL range is fetched before the command returns (nobody fetches afterwards) and the spool stays until
   the server has recovered.

A failure before the server starts removes what this restore wrote (the directory is left as it was found:
absent or empty). Once a server has run on the directory, it is left for inspection and the spool's missing
files are marked failed, so a later ``pg_ctl start`` aborts rather than promote a shorter database.
"""

from __future__ import annotations

__all__ = ["PhysicalRestoreError", "PhysicalRestoreRequest", "PhysicalRestoreResult", "restore_physical"]

import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio

from kybdr_agent.asyncutil import task_group
from kybdr_agent.backup import decode
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.errors import KybdrError
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.telemetry import get_logger
from kybdr_agent.wal.fetch_plan import SpoolFile
from kybdr_agent.wal.names import PartialSegment
from kybdr_agent.wal.prefetch import DEFAULT_CONCURRENCY, Prefetcher
from kybdr_agent.wal.recovery import (
    AUTO_CONF_FILE,
    SIGNAL_FILE,
    STANDBY_SIGNAL_FILE,
    RecoverySettings,
    restore_command,
)
from kybdr_agent.wal.restore_server import PhysicalRestoreError, ServerOutcome, ServerRun
from kybdr_agent.wal.tar_extract import TarExtractor, sync_directory, sync_tree
from kybdr_agent.wal.targets import RecoveryTarget
from kybdr_agent.wal.window_report import ArchiveFor, RestorePlan, describe_target, plan_restore

log = get_logger("kybdr_agent.wal.restore")

SPOOL_SUFFIX: Final = ".wal-spool"
_REQUIRED_FILES: Final = ("PG_VERSION", "backup_label", "global/pg_control")


@dataclass(frozen=True)
class PhysicalRestoreRequest:
    pgdata: Path
    target: RecoveryTarget
    backup_id: str | None = None
    spool: Path | None = None
    start: bool = False
    port: int | None = None
    disable_archiving: bool = False
    concurrency: int = DEFAULT_CONCURRENCY


@dataclass
class PhysicalRestoreResult:
    backup_id: str
    system_identifier: str
    pgdata: str
    spool: str | None
    target: str
    timeline: int
    tar_bytes: int = 0
    files: int = 0
    wal_files: int = 0
    wal_bytes: int = 0
    seconds: float = 0.0
    server: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        return dict(self.__dict__)


def default_spool(pgdata: Path) -> Path:
    return pgdata.with_name(pgdata.name + SPOOL_SUFFIX)


def _empty_or_absent(path: Path, what: str) -> bool:
    """True if ``path`` exists (empty); refuses anything else than an empty directory or nothing."""
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise PhysicalRestoreError(f"{what} {path} exists and is not a directory; nothing was changed") from None
    except OSError as exc:
        raise PhysicalRestoreError(f"cannot read {what} {path}: {exc.strerror}; nothing was changed") from None
    if entries:
        raise PhysicalRestoreError(
            f"{what} {path} exists and is not empty; a restore writes only into an empty or new directory, "
            "so nothing was changed"
        )
    return True


def check_request(request: PhysicalRestoreRequest) -> tuple[Path, Path]:
    """The absolute data directory and spool, both new or empty; refusals change nothing."""
    pgdata = Path(os.path.abspath(request.pgdata))
    spool = Path(os.path.abspath(request.spool)) if request.spool is not None else default_spool(pgdata)
    if spool == pgdata or spool.is_relative_to(pgdata) or pgdata.is_relative_to(spool):
        raise PhysicalRestoreError("the WAL spool must be outside the data directory (and not contain it)")
    if request.start and os.geteuid() == 0:
        raise PhysicalRestoreError(
            "--start: PostgreSQL does not run as root. Run the restore as the database's OS user "
            "(runuser -u postgres -- kybdr-agent restore --physical …), or restore without --start, chown -R "
            "the directory and its spool to that user and start it with pg_ctl"
        )
    _empty_or_absent(pgdata, "the data directory")
    _empty_or_absent(spool, "the WAL spool")
    if not pgdata.parent.is_dir():
        raise PhysicalRestoreError(f"{pgdata.parent} does not exist; nothing was changed")
    return pgdata, spool


class _Written:
    """What this restore created, so a failure before the server started can take it back."""

    def __init__(self, pgdata: Path, spool: Path) -> None:
        self.pgdata, self.spool = pgdata, spool
        self.pgdata_existed = pgdata.exists()
        self.spool_existed = spool.exists()

    def remove(self) -> None:
        for path, existed in ((self.pgdata, self.pgdata_existed), (self.spool, self.spool_existed)):
            if existed:
                for entry in list(path.iterdir()) if path.is_dir() else []:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            else:
                shutil.rmtree(path, ignore_errors=True)


async def restore_physical(
    store: BlobStore,
    manifests: list[Manifest],
    keyring: KeyRing | None,
    archive_for: ArchiveFor,
    request: PhysicalRestoreRequest,
    *,
    pg_bin_dir: Path | None = None,
) -> PhysicalRestoreResult:
    """The whole restore (module docstring); raises ``PhysicalRestoreError`` and friends with what was left."""
    began = time.monotonic()
    pgdata, spool = check_request(request)
    plan = await plan_restore(manifests, archive_for, request.target, request.backup_id)
    physical = plan.manifest.physical
    assert physical is not None
    result = PhysicalRestoreResult(
        backup_id=plan.manifest.id,
        system_identifier=physical.system_identifier,
        pgdata=str(pgdata),
        spool=str(spool),
        target=describe_target(plan.target),
        timeline=plan.fetch.timeline,
    )
    if plan.reach.gap is not None:
        result.warnings.append(
            f"the archive has WAL after a gap at {plan.reach.gap.name} (missing): this restore ends before it, "
            "and WAL after the gap cannot be replayed from this base backup"
        )
    log.info("restore.physical_planned", backup_id=result.backup_id, target=result.target, files=len(plan.fetch.files))
    written = _Written(pgdata, spool)
    pgdata.mkdir(mode=0o700, exist_ok=True)
    os.chmod(pgdata, 0o700)
    prefetcher = Prefetcher(
        spool, plan.fetch.histories, plan.fetch.segments, _fetcher(plan, spool), concurrency=request.concurrency
    )
    server: ServerRun | None = None
    try:
        prefetcher.prepare()
        if request.start:
            server = ServerRun(pgdata, physical.server_version_num, pg_bin_dir=pg_bin_dir, port=request.port)
            outcome = await _restore_and_run(store, keyring, plan, request, pgdata, prefetcher, server, result)
            result.server = outcome.document()
        else:
            async with task_group() as tg:
                tg.start_soon(_prefetch_all, prefetcher)
                await _lay_down(store, keyring, plan, request, pgdata, spool, result)
            await anyio.to_thread.run_sync(sync_directory, spool)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await _after_failure(written, prefetcher, server, exc)
        raise
    result.wal_files, result.wal_bytes = prefetcher.stats.fetched, prefetcher.stats.bytes
    result.seconds = round(time.monotonic() - began, 3)
    if request.start:
        shutil.rmtree(spool, ignore_errors=True)  # recovery is over: PostgreSQL reads no more WAL from it
        result.spool = None
    result.next_steps = _next_steps(result, request, pgdata, spool)
    return result


async def _prefetch_all(prefetcher: Prefetcher) -> None:
    await prefetcher.run(follow=False)


async def _restore_and_run(
    store: BlobStore,
    keyring: KeyRing | None,
    plan: RestorePlan,
    request: PhysicalRestoreRequest,
    pgdata: Path,
    prefetcher: Prefetcher,
    server: ServerRun,
    result: PhysicalRestoreResult,
) -> ServerOutcome:
    """The tar and the first WAL at once; then the server, with the spool following it until it is done."""
    outcome: list[ServerOutcome] = []
    async with task_group() as tg:

        async def follow() -> None:
            await prefetcher.run(follow=True)

        tg.start_soon(follow)
        await _lay_down(store, keyring, plan, request, pgdata, prefetcher.spool, result)
        outcome.append(await server.start_and_wait(failures=lambda: prefetcher.stats.failures))
        tg.cancel_scope.cancel()
    return outcome[0]


async def _lay_down(
    store: BlobStore,
    keyring: KeyRing | None,
    plan: RestorePlan,
    request: PhysicalRestoreRequest,
    pgdata: Path,
    spool: Path,
    result: PhysicalRestoreResult,
) -> None:
    """Base backup extracted and checked, recovery settings written, all of it on disk."""
    extractor = TarExtractor(pgdata)
    try:

        async def sink(chunk: bytes) -> None:
            await anyio.to_thread.run_sync(extractor.feed, chunk)

        def read() -> AsyncIterator[bytes]:
            return store.read(plan.manifest.object_key)

        await decode.stream_backup(read, plan.manifest, keyring, sink)
        stats = extractor.finish()
    finally:
        extractor.close()
    result.tar_bytes, result.files = stats.bytes, stats.files
    missing = [name for name in _REQUIRED_FILES if not (pgdata / name).is_file()]
    if missing:
        raise PhysicalRestoreError(
            f"backup {plan.manifest.id} is not a PostgreSQL base backup: it lacks {', '.join(missing)}"
        )
    settings = RecoverySettings(
        restore_command(str(spool)),
        plan.target,
        plan.fetch.timeline,
        action="promote",
        disable_archiving=request.disable_archiving,
    )
    await anyio.to_thread.run_sync(_write_settings, pgdata, settings, plan.manifest.id)
    await anyio.to_thread.run_sync(sync_tree, pgdata)


def _write_settings(pgdata: Path, settings: RecoverySettings, backup_id: str) -> None:
    (pgdata / STANDBY_SIGNAL_FILE).unlink(missing_ok=True)
    text = settings.conf_text(f"point-in-time recovery from backup {backup_id}, written by kybdr-agent")
    with open(pgdata / AUTO_CONF_FILE, "a", encoding="utf-8") as conf:
        conf.write("\n" + text)
    with open(pgdata / SIGNAL_FILE, "w"):
        pass


def _fetcher(plan: RestorePlan, spool: Path) -> Any:
    """Fetch one planned file: verified by ``WalArchive.fetch`` under a name the copy never asks for, a partial
    padded with zeros to a whole segment (PostgreSQL refuses a short file from ``restore_command`` outside
    standby mode), then renamed to the name PostgreSQL asks for."""

    async def fetch(file: SpoolFile, dest: Path) -> None:
        record = plan.record_of(file.source)
        staging = spool / f".{file.spool_name}.fetching"
        await plan.archive.fetch(record, staging)
        if isinstance(file.source, PartialSegment):
            size = plan.cluster.segment_size
            if staging.stat().st_size < size:
                os.truncate(staging, size)
                fd = os.open(staging, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        os.replace(staging, dest)

    return fetch


async def _after_failure(
    written: _Written, prefetcher: Prefetcher, server: ServerRun | None, exc: BaseException
) -> None:
    if server is not None and server.started:
        await server.stop_if_running()
        why = str(exc) if isinstance(exc, KybdrError) else "the restore was interrupted"
        with contextlib.suppress(OSError):
            prefetcher.abandon(why)
        return
    await anyio.to_thread.run_sync(written.remove)


def _next_steps(result: PhysicalRestoreResult, request: PhysicalRestoreRequest, pgdata: Path, spool: Path) -> list[str]:
    if request.start:
        return [f"the server runs on {pgdata} (stop it with: pg_ctl -D {pgdata} stop)"]
    steps = []
    if os.geteuid() == 0:
        steps.append(f"chown -R postgres: {pgdata} {spool}  (the files belong to root, who ran the restore)")
    steps.append(f"pg_ctl -D {pgdata} start  (add -o '-p PORT' if the source's port is taken on this host)")
    steps.append(f"once the server has left recovery (pg_is_in_recovery() is false): rm -r {spool}")
    return steps
