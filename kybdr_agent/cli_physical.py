"""``kybdr-agent restore --physical [ID] --pgdata DIR [--target-time T | --target-lsn L | --target-name N |
--latest] [--start]``: a cluster back to a point in time, from a physical base backup and the archived WAL.

Always in this process, never through the running agent: the directory it writes belongs to whoever runs the
command (root, or the ``postgres`` OS user as pgBackRest runs), and the agent's service user may be neither.
It needs only the configuration, the keys and the repository — not the source server, which may be gone.

The flags are checked together before anything runs, like a logical restore's (exit 2): a target is parsed
the way PostgreSQL will read it (``wal.targets``: a time must carry its zone), and logical-only switches are
refused with ``--physical`` and the reverse. ``restore_physical`` does the work; this module only turns its
result into lines for people or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

from kybdr_agent.backup.manifest import check_backup_id
from kybdr_agent.errors import ConfigError
from kybdr_agent.telemetry.logs import ERROR, stderr_line
from kybdr_agent.wal.names import WalError
from kybdr_agent.wal.targets import (
    LatestTarget,
    RecoveryTarget,
    parse_target_lsn,
    parse_target_name,
    parse_target_time,
)

if TYPE_CHECKING:
    # The restore's machinery is imported by ``run`` only: the restore parser and its usage checks are built on
    # every CLI start, and a refused command line must stay cheap.
    from kybdr_agent import app
    from kybdr_agent.config import AgentSettings
    from kybdr_agent.storage.base import BlobStore
    from kybdr_agent.wal.archive import WalArchive
    from kybdr_agent.wal.restore_physical import PhysicalRestoreResult

EXIT_USAGE: Final = 2
_LOGICAL_ONLY: Final = (
    ("target_database", "--target-database"),
    ("force", "--force"),
    ("no_owner", "--no-owner"),
    ("with_globals", "--with-globals"),
    ("table", "--table"),
    ("schema", "--schema"),
    ("into_existing", "--into-existing"),
    ("rename_to", "--rename-to"),
)
_PHYSICAL_ONLY: Final = (
    ("pgdata", "--pgdata"),
    ("target_time", "--target-time"),
    ("target_lsn", "--target-lsn"),
    ("target_name", "--target-name"),
    ("latest", "--latest"),
    ("start", "--start"),
    ("port", "--port"),
    ("wal_spool", "--wal-spool"),
    ("no_archive", "--no-archive"),
)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 1 to 65535")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The physical restore's switches, on the ``restore`` parser."""
    p.add_argument(
        "--physical",
        action="store_true",
        help="point-in-time restore of the whole cluster from a physical base backup and the archived WAL "
        "into --pgdata (without ID: the base backup is chosen for the target)",
    )
    p.add_argument(
        "--pgdata", type=Path, metavar="DIR", help="with --physical: the new data directory (absent or empty)"
    )
    targets = p.add_mutually_exclusive_group()
    targets.add_argument(
        "--target-time", metavar="T", help="recover to this time, with its zone (2026-12-02 03:22:11+00:00)"
    )
    targets.add_argument("--target-lsn", metavar="L", help="recover to this WAL position (0/3000148)")
    targets.add_argument("--target-name", metavar="N", help="recover to this restore point (pg_create_restore_point)")
    targets.add_argument("--latest", action="store_true", help="recover to the end of the archived WAL (the default)")
    p.add_argument(
        "--start", action="store_true", help="start the server and wait until it has recovered to the target"
    )
    p.add_argument(
        "--port", type=_port, metavar="N", help="with --start: the port (default: the copied configuration's)"
    )
    p.add_argument(
        "--wal-spool",
        type=Path,
        metavar="DIR",
        help="where WAL is fetched ahead of the server (default: DIR.wal-spool)",
    )
    p.add_argument(
        "--no-archive",
        action="store_true",
        help="the restored server does not archive WAL (archive_mode = off): a copy that must not write into the "
        "source's archive",
    )


def _usage(message: str) -> NoReturn:
    stderr_line(f"kybdr-agent: restore: {message}", ERROR)
    sys.exit(EXIT_USAGE)


def _given(args: argparse.Namespace, name: str) -> bool:
    value = getattr(args, name, None)
    return bool(value) if not isinstance(value, int) or isinstance(value, bool) else True


def parse_target(args: argparse.Namespace) -> RecoveryTarget:
    try:
        if args.target_time is not None:
            return parse_target_time(args.target_time)
        if args.target_lsn is not None:
            return parse_target_lsn(args.target_lsn)
        if args.target_name is not None:
            return parse_target_name(args.target_name)
    except WalError as exc:
        _usage(str(exc))
    return LatestTarget()


def check_usage(args: argparse.Namespace) -> None:
    """Exit 2 on switches that do not go together; with ``--physical``, ``args.recovery_target`` is set."""
    if not args.physical:
        extra = [flag for name, flag in _PHYSICAL_ONLY if _given(args, name)]
        if extra:
            _usage(f"{', '.join(extra)} need --physical")
        if args.backup_id is None:
            _usage("the backup ID is required (only --physical can choose one)")
        if not args.target_database:
            _usage("--target-database is required (or --physical with --pgdata)")
        return
    extra = [flag for name, flag in _LOGICAL_ONLY if _given(args, name)]
    if getattr(args, "jobs", 1) != 1:
        extra.append("--jobs")
    if extra:
        _usage(f"{', '.join(extra)} cannot be used with --physical")
    if args.pgdata is None:
        _usage("--physical needs --pgdata DIR (the new data directory)")
    if args.port is not None and not args.start:
        _usage("--port needs --start")
    if args.backup_id is not None:
        check_backup_id(args.backup_id)
    args.recovery_target = parse_target(args)


async def _repository(settings: AgentSettings, stores: app.Stores, region: str | None) -> BlobStore:
    if region == "dr":
        replica = await stores.replica(settings)
        if replica is None:
            raise ConfigError("--region dr: no DR bucket is configured (backup.cross_region)")
        return replica
    return await stores.get(settings.repository)


async def run(settings: AgentSettings, args: argparse.Namespace) -> int:
    from kybdr_agent import app
    from kybdr_agent.backup.catalog import read_catalog
    from kybdr_agent.backup.streamfmt import Compression
    from kybdr_agent.wal.archive import WalArchive
    from kybdr_agent.wal.restore_physical import PhysicalRestoreRequest, restore_physical

    request = PhysicalRestoreRequest(
        pgdata=args.pgdata,
        target=getattr(args, "recovery_target", None) or parse_target(args),
        backup_id=args.backup_id,
        spool=args.wal_spool,
        start=args.start,
        port=args.port,
        disable_archiving=args.no_archive,
    )
    async with app.open_stores() as stores:
        store = await _repository(settings, stores, getattr(args, "region", None))
        ring = app.keyring(settings, stores)
        catalog = await read_catalog(store)

        def archive_for(system_identifier: str, segment_size: int) -> WalArchive:
            return WalArchive(
                store,
                system_identifier=system_identifier,
                segment_size=segment_size,
                keyring=ring,
                compression=Compression[settings.compression.algorithm.upper()],
                compression_level=settings.compression.level,
                frame_size=settings.encryption.frame_size_kib * 1024,
            )

        result = await restore_physical(
            store, catalog.backups, ring, archive_for, request, pg_bin_dir=settings.database.pg_bin_dir
        )
    print_result(result, json_output=args.json)
    return 0


def print_result(result: PhysicalRestoreResult, *, json_output: bool) -> None:
    if json_output:
        print(json.dumps(result.document(), indent=2, default=str))
        return
    print(
        f"restored base backup {result.backup_id} (cluster {result.system_identifier}) into {result.pgdata}: "
        f"{result.files} files, {_size(result.tar_bytes)}; {result.wal_files} WAL file(s), {_size(result.wal_bytes)} "
        f"in {result.seconds:.1f} s"
    )
    print(f"recovery target: {result.target}, along timeline {result.timeline}; then promote")
    server: dict[str, Any] | None = result.server
    if server is not None:
        stopped = server.get("stopped") or (
            f"end of the archived WAL, redo done at {server.get('redo_done_lsn') or '?'}"
        )
        print(f"recovered: {stopped}")
        if server.get("last_transaction_time"):
            print(f"last transaction replayed: {server['last_transaction_time']}")
        if server.get("timeline"):
            print(f"the server now runs on timeline {server['timeline']} (log: {server['log']})")
    for warning in result.warnings:
        print(f"warning: {warning}")
    for step in result.next_steps:
        print(f"next: {step}")


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
