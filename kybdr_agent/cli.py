"""The ``kybdr-agent`` command line.

Results go to stdout (a table for people, ``--json`` for scripts); logs and errors go to stderr. Exit
status: 0 success, 1 the operation failed, 2 bad usage, 78 bad configuration, 130 interrupted. Every
failure an operator can cause prints one paragraph saying what happened and what to do — no traceback.
That holds for failures that are not ours too (an OSError, a library's ValueError, a driver's error): they
end as one line "kybdr-agent: COMMAND failed: …", and the traceback is printed only with ``-v``. A bug
says "internal error" and asks for ``-v``. How a successful result is printed is ``cli_output``'s job.
Every message of its own goes through ``stderr_line``, so under systemd it reaches the journal with its
priority (``<3>`` error) like the log lines. ``check`` is the exception to the exit statuses above: a
monitoring probe, it answers in the Nagios convention (``cli_check``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn

import anyio

from kybdr_agent import __version__, cli_output, secret_files
from kybdr_agent.asyncutil import leaf_exceptions, primary_error
from kybdr_agent.backup.manifest import InvalidBackupId, check_backup_id
from kybdr_agent.backup.selection import Selection, SelectionError, selective_request
from kybdr_agent.config import DEFAULT_CONFIG_PATH, AgentSettings, load_settings
from kybdr_agent.control.client import ControlClient, agent_listening, check_socket_location
from kybdr_agent.errors import ConfigError, KybdrError
from kybdr_agent.telemetry import configure_logging, get_logger
from kybdr_agent.telemetry.logs import ERROR, WARNING, stderr_line

if TYPE_CHECKING:
    # Imported where used: the composition root and the operations behind it are most of the CLI's start-up
    # (~0.5 s), which a usage error, a configuration check or a refused configuration never needs.
    from kybdr_agent.operations import Operations

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONFIG: Final = 78
EXIT_INTERRUPTED: Final = 130
_M_TRIM_THRESHOLD: Final = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8

log = get_logger("kybdr_agent.cli")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the operation was cancelled and cleaned up."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors written as every other CLI message (``stderr_line``: with their
    priority when stderr is the journal). Subcommand parsers are made of the same class."""

    def error(self, message: str) -> NoReturn:
        stderr_line(f"{self.format_usage().rstrip()}\n{self.prog}: error: {message}", ERROR)
        sys.exit(EXIT_USAGE)


def _restore_jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError("must be 1 to 16")
    return value


_REGION_HELP: Final = (
    "read this region's repository: primary or dr (default: the primary, or the DR region's copy when the "
    "primary cannot be read, which is then said)"
)


def _add_region(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", choices=("primary", "dr"), default=None, help=_REGION_HELP)


def _backfill_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be 1 to 1000")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kybdr-agent", description="Backup and disaster recovery for PostgreSQL hosts.")
    parser.add_argument("--version", action="version", version=f"kybdr-agent {__version__}")
    parser.add_argument(
        "--config", type=Path, default=None, help=f"TOML configuration file (default {DEFAULT_CONFIG_PATH})"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--local", action="store_true", help="do the work in this process even if an agent is running")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("backup", help="dump databases into the repository now")
    p.add_argument("--database", action="append", help="database to back up (repeatable; default: database.databases)")
    p.add_argument("--description", help="free text stored in the manifest")
    p.add_argument(
        "--physical",
        action="store_true",
        help="a base backup of the whole cluster (pg_basebackup), restorable to any point in time from the WAL "
        "archive ([wal] enabled); takes no --database",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("list", help="list completed backups")
    p.add_argument("--database", help="only this database's backups")
    p.add_argument("--json", action="store_true", help="print an array of manifests")
    _add_region(p)

    p = sub.add_parser("show", help="show one backup's manifest")
    p.add_argument("backup_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    _add_region(p)

    p = sub.add_parser(
        "restore", help="restore a backup into a new database, or (--physical) a cluster to a point in time"
    )
    p.add_argument(
        "backup_id", metavar="ID", nargs="?", help="the backup (with --physical: chosen for the target if omitted)"
    )
    p.add_argument(
        "--target-database", help="database to create (must not exist or be empty); required unless --physical"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty target once the restore succeeded")
    p.add_argument("--no-owner", action="store_true", help="do not restore ownership and privileges")
    p.add_argument(
        "--with-globals",
        action="store_true",
        help="first create the roles (and tablespaces) recorded with the backup that the server lacks; "
        "existing ones are left as they are",
    )
    p.add_argument(
        "--jobs",
        type=_restore_jobs,
        default=1,
        metavar="N",
        help="build indexes and constraints with pg_restore -j N (1-16) once the data has streamed in",
    )
    p.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="T",
        help="restore only this table (schema.table, or a name unique in the backup), whole: indexes, constraints, "
        "sequences, grants (repeatable)",
    )
    p.add_argument("--schema", action="append", default=[], metavar="S", help="restore only this schema (repeatable)")
    p.add_argument(
        "--into-existing",
        action="store_true",
        help="add the one --table to the existing --target-database under --rename-to; never overwrites anything",
    )
    p.add_argument("--rename-to", metavar="NAME", help="with --into-existing: the added table's name")
    p.add_argument("--json", action="store_true")
    _add_region(p)
    from kybdr_agent import cli_physical

    cli_physical.add_arguments(p)

    p = sub.add_parser("contents", help="what a backup holds: schemas, tables with sizes and rows, other objects")
    p.add_argument("backup_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    _add_region(p)

    p = sub.add_parser("validate", help="check a backup's integrity")
    p.add_argument("backup_id", metavar="ID")
    p.add_argument("--level", choices=("quick", "full"), default="quick")
    p.add_argument("--json", action="store_true")
    _add_region(p)

    p = sub.add_parser("backfill", help="copy to the DR region's bucket the backups it lacks, newest first")
    p.add_argument("--limit", type=_backfill_limit, default=20, metavar="N", help="copy at most N (default 20)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cleanup", help="delete backups the retention policies no longer keep")
    p.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("stats", help="backup statistics: outcomes, durations, sizes, last good backup per database")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("test", help="restore drill: restore the newest backups into scratch databases and compare")
    p.add_argument("--database", help="only this database")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", help="the running agent's state and recent jobs")
    p.add_argument("--json", action="store_true")

    sub.add_parser("run", help="run the agent (the systemd service's command)")

    from kybdr_agent.cli_dr import add_parser as add_dr_parser

    add_dr_parser(sub)

    from kybdr_agent.cli_audit import add_parser as add_audit_parser

    add_audit_parser(sub)

    from kybdr_agent.cli_check import add_parser as add_check_parser

    add_check_parser(sub)

    from kybdr_agent.cli_key import add_parser as add_key_parser

    add_key_parser(sub)

    p = sub.add_parser("config", help="configuration tools")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    c = config_sub.add_parser("check", help="validate the configuration and print it, secrets masked")
    c.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "wal-push",
        help="PostgreSQL's archive_command: hand one WAL file to the running agent "
        "(archive_command = 'kybdr-agent wal-push %%p'); exits 0 only once the agent holds it durably",
    )
    p.add_argument("path", metavar="PATH", help="the WAL file (PostgreSQL's %%p)")

    p = sub.add_parser("keygen", help="write a new random master key file (mode 0600)")
    p.add_argument("path", type=Path)

    p = sub.add_parser(
        "demo",
        help="the whole path on a throwaway PostgreSQL and a local repository: backup, validate, restore",
    )
    p.add_argument("--workdir", type=Path, default=Path(".kybdr/demo"), help="where the demo keeps its files")
    return parser


def _tune_malloc() -> None:
    """Keep glibc's allocator from trading our memory bound for page faults, or the reverse.

    By default glibc raises its mmap threshold each time a large block is freed, after which the
    pipeline's 1 MiB buffers come from heaps that grow in every thread's arena and are never given back.
    A threshold pinned at 1 MiB returned them at once but made every buffer a fresh mmap: +0.6 CPU-s of
    page faults per GB. Pinned at 8 MiB with two arenas, the 1 MiB buffers are reused from a heap that
    cannot grow per thread. Pinning it also pins the trim threshold at its 128 KiB default, though: each
    1 MiB read freed at the top of the heap was given back and faulted in again, ~250,000 page faults per
    GB of dump (~0.4 CPU-s). At 16 MiB the heap keeps what the next buffer needs; the peak is the same, and
    a finished job hands the rest back (``jobs._release_memory``: ``malloc_trim``). A no-op where libc
    has no ``mallopt`` (benchmarks/backup_bench.py, docs/benchmarks.md).
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 8 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 16 << 20)
        libc.mallopt(_M_ARENA_MAX, 2)


def main(argv: Sequence[str] | None = None) -> int:
    _tune_malloc()
    # What the imports made (~80,000 container objects; ~95,000 once botocore's S3 model is loaded) lives as
    # long as the process. Frozen, the cyclic collector stops walking it in full collections (a finished
    # job asks for one) and in the interpreter's last one at exit (py-spy: 0.2 s of a one-shot backup to
    # S3 was that collection); measured, ~0.3-0.5 CPU-s of a one-shot backup to S3, ~0.15 to a folder.
    # Cycles among these objects are never collected: they are modules, classes and settings, kept anyway.
    gc.freeze()
    args = _parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        return _dispatch(args)
    except BaseExceptionGroup as group:  # a task group's leftovers: judge the error that started it
        return _report(args, _unwrap(group))
    except BaseException as exc:  # noqa: BLE001 - every way out of a command ends in one line (see _report)
        return _report(args, exc)
    finally:
        gc.freeze()  # the process is about to exit: nothing is left for the last collection to find


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves = list(leaf_exceptions(group))
    if any(isinstance(leaf, KeyboardInterrupt | Interrupted) for leaf in leaves):
        return Interrupted()
    return primary_error(group)


_OPERATIONAL: Final = (OSError, TimeoutError, EOFError, UnicodeError)


def _report(args: argparse.Namespace, exc: BaseException) -> int:
    """One paragraph for whatever ended the command, with the documented exit status.

    ``KybdrError`` messages are written for operators. Other errors are either the environment failing
    in a way no adapter translated (a disk, a socket, a driver: exit 1 with the library's own message)
    or a bug (exit 1, "internal error"); their traceback goes to stderr only with ``-v``.
    """
    if isinstance(exc, SystemExit):
        raise exc
    if isinstance(exc, BrokenPipeError):
        # stdout's reader went away (`kybdr-agent list | head -1`): not an error worth a message, but
        # Python would otherwise complain again when it flushes stdout at exit.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    if isinstance(exc, KybdrError) and args.verbose and exc.__cause__ is not None:
        _traceback(exc.__cause__)
    if isinstance(exc, ConfigError):
        stderr_line(f"kybdr-agent: configuration error: {exc}")
        return EXIT_CONFIG
    if isinstance(exc, Interrupted | KeyboardInterrupt):
        if getattr(args, "remote", False):
            stderr_line(
                "kybdr-agent: interrupted; the job keeps running in the agent (see `kybdr-agent status`)", WARNING
            )
        elif getattr(args, "physical", False) and args.command == "restore":
            # restore --physical keeps a directory whose server already ran (it was stopped, and the WAL not yet
            # fetched is marked failed, so a later start stops rather than promotes a shorter database).
            stderr_line(
                "kybdr-agent: interrupted; the restore was cancelled: nothing is kept unless the server had "
                "started, whose stopped directory is kept for inspection and will not promote if started"
            )
        else:
            stderr_line("kybdr-agent: interrupted; the operation was cancelled and nothing half-done was kept")
        return EXIT_INTERRUPTED
    if isinstance(exc, InvalidBackupId):
        stderr_line(f"kybdr-agent: {exc}")
        return EXIT_USAGE
    if isinstance(exc, KybdrError):
        stderr_line(f"kybdr-agent: {args.command} failed: {exc}")
        return EXIT_FAILED
    if args.verbose:
        _traceback(exc)
    stderr_line(f"kybdr-agent: {args.command} failed: {_unexpected(exc, verbose=args.verbose)}")
    return EXIT_FAILED


def _traceback(exc: BaseException) -> None:
    """A traceback for ``-v``, each of its lines an error line (the journal files lines one by one)."""
    stderr_line("".join(traceback.format_exception(exc)).rstrip("\n"))


def _unexpected(exc: BaseException, *, verbose: bool) -> str:
    """What an error no adapter translated says: its own words for the environment's, none for a bug's.

    An OSError or a driver's error describes the world (a disk, a socket, a refused login) and its message
    is what the operator needs; the class is named so it can be looked up. A TypeError or KeyError
    describes our code, and its message would only confuse.
    """
    hint = "" if verbose else " (run with -v for details)"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    module = type(exc).__module__.split(".")[0]
    if isinstance(exc, _OPERATIONAL) or module in ("asyncpg", "aiohttp", "botocore", "aiobotocore"):
        text = " ".join(str(exc).split()) or "no details"
        return f"{type(exc).__name__}: {text[:500]}"
    if isinstance(exc, RecursionError | MemoryError):
        return f"{type(exc).__name__}: the input is too large or too deeply nested{hint}"
    return f"internal error: {type(exc).__name__}{hint}"


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "wal-push":  # kybdr_agent.entry answers it before this module is imported; not here
        from kybdr_agent.wal.push_client import main as push_main

        config = ["--config", str(args.config)] if args.config else []
        return push_main([*config, *(["-v"] if args.verbose else []), "wal-push", args.path])
    if args.command == "keygen":
        try:
            from kybdr_agent.backup.keys import generate_master_key_file

            key = generate_master_key_file(args.path)
        except OSError as exc:
            raise KybdrError(f"cannot create {args.path}: {exc.strerror}") from None
        print(f"wrote {args.path} (key id {key.key_id.hex()})")
        return EXIT_OK
    if args.command == "demo":
        from kybdr_agent.demo import run_demo

        workdir = args.workdir.resolve()
        configured = (
            args.config is not None
            or _default_config_present()
            or any(name.startswith("KYBDR_DATABASE__") for name in os.environ)
        )
        demo_settings = load_settings(args.config) if configured else None
        return _run(lambda: run_demo(workdir, demo_settings))
    if args.command == "check":
        # A monitoring probe answers in its own convention, even for a configuration it cannot load.
        from kybdr_agent import cli_check

        return _run(lambda: cli_check.run(args))
    if args.command == "restore":
        from kybdr_agent import cli_physical

        cli_physical.check_usage(args)
        if args.physical:
            physical_settings = load_settings(args.config)
            return _run(lambda: cli_physical.run(physical_settings, args))
    if args.command in ("show", "restore", "validate", "contents"):
        check_backup_id(args.backup_id)
    if args.command == "restore":
        args.selection = _selection(args)
    settings = load_settings(args.config)
    if args.command == "config":
        return _config_check(settings, args)
    if args.command == "audit":
        from kybdr_agent import cli_audit

        return cli_audit.run(settings, args)
    if args.command == "key":
        from kybdr_agent import cli_key

        return cli_key.run(settings, args)
    if args.command == "run":
        from kybdr_agent.daemon import run_daemon

        configure_logging(verbose=True)
        try:
            return anyio.run(run_daemon, args.config)
        except BaseExceptionGroup as group:
            raise primary_error(group) from None
    if args.command == "dr":
        from kybdr_agent import cli_dr as dr_cli

        return _run(lambda: dr_cli.run(settings, args))
    command = COMMANDS[args.command]
    ops = _operations(settings, args)

    async def entry() -> int:
        async with ops:
            return await command(ops, args)

    return _run(entry)


def _default_config_present() -> bool:
    """Whether the default config file is there; one we may not even look at counts (load_settings then
    says why it cannot be read) instead of raising PermissionError out of ``Path.exists``."""
    try:
        os.stat(DEFAULT_CONFIG_PATH)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def _run(entry: Callable[[], Awaitable[int]]) -> int:
    """Run one command; SIGINT/SIGTERM cancel it, and its cleanup (abort upload, drop scratch db) runs."""

    async def guarded() -> int:
        outcome: list[int] = []
        interrupted = False
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        interrupted = True
                        tg.cancel_scope.cancel()
                        return

            async def work() -> None:
                outcome.append(await entry())
                tg.cancel_scope.cancel()

            tg.start_soon(watch_signals)
            tg.start_soon(work)
        if interrupted or not outcome:
            raise Interrupted
        return outcome[0]

    try:
        return anyio.run(guarded)
    except BaseExceptionGroup as group:
        raise primary_error(group) from None


def _config_check(settings: AgentSettings, args: argparse.Namespace) -> int:
    """Validate as ``run`` would start: every secret file read and checked, the socket's place judged."""
    secret_files.check_all(settings)  # keys, passwords and tokens: read, with run's rules
    from kybdr_agent import app

    app.connection(settings)  # the DSN and password make a connection description
    check_socket_location(settings.control.socket, secret_files.trusted_owners(settings.daemon.service_user))
    cli_output.print_config(settings.masked(), args)
    return EXIT_OK


def _operations(settings: AgentSettings, args: argparse.Namespace) -> Operations:
    """The running agent when one listens on the control socket (unless --local), else this process.

    The socket must be one the agent could have made (``agent_listening`` with the trusted owners): a
    socket anyone else may have put there is refused, and the command is not quietly run here instead.
    """
    from kybdr_agent.operations import LocalOperations, RemoteOperations, terminal_progress

    if not args.local:
        owners = secret_files.trusted_owners(settings.daemon.service_user)
        if agent_listening(settings.control.socket, owners):
            args.remote = True
            return RemoteOperations(ControlClient(settings.control.socket), progress=terminal_progress())
    if args.command in _USES_SECRETS:
        # Checked before any I/O, with run's rules: a bad key or password file is exit 78 here too, not a
        # failure halfway through (or a success with a key file anyone may read).
        secret_files.load_keyring(settings)
        secret_files.check_password_files(settings, drill=args.command == "test")
    return LocalOperations(settings)


_USES_SECRETS: Final = frozenset({"backup", "restore", "validate", "test", "backfill", "contents"})


async def _backup(ops: Operations, args: argparse.Namespace) -> int:
    if args.physical and args.database:
        stderr_line("kybdr-agent: backup: --physical backs up the whole cluster; it takes no --database", ERROR)
        return EXIT_USAGE
    cli_output.print_backups(await ops.backup(args.database, args.description, physical=args.physical), args)
    return EXIT_OK


async def _list(ops: Operations, args: argparse.Namespace) -> int:
    cli_output.print_backup_list(await ops.list(args.database, args.region), args)
    return EXIT_OK


async def _show(ops: Operations, args: argparse.Namespace) -> int:
    cli_output.print_manifest(await ops.show(args.backup_id, args.region), args)
    return EXIT_OK


def _selection(args: argparse.Namespace) -> Selection | None:
    """``--table``/``--schema``/``--into-existing``/``--rename-to`` checked together before anything runs:
    a combination that cannot be done is a usage error (exit 2), like argparse's own."""
    try:
        return selective_request(
            args.table,
            args.schema,
            into_existing=args.into_existing,
            rename_to=args.rename_to,
            force=args.force,
            jobs=args.jobs,
        )
    except SelectionError as exc:
        stderr_line(f"kybdr-agent: restore: {exc}", ERROR)
        sys.exit(EXIT_USAGE)


async def _restore(ops: Operations, args: argparse.Namespace) -> int:
    result = await ops.restore(
        args.backup_id,
        args.target_database,
        args.force,
        args.no_owner,
        args.with_globals,
        args.jobs,
        args.region,
        args.selection,
        args.rename_to if args.into_existing else None,
    )
    cli_output.print_restore(result, args)
    return EXIT_OK


async def _contents(ops: Operations, args: argparse.Namespace) -> int:
    cli_output.print_contents(await ops.contents(args.backup_id, args.region), args)
    return EXIT_OK


async def _validate(ops: Operations, args: argparse.Namespace) -> int:
    result = await ops.validate(args.backup_id, args.level, args.region)
    cli_output.print_validation(result, args)
    return EXIT_OK if result["ok"] else EXIT_FAILED


async def _backfill(ops: Operations, args: argparse.Namespace) -> int:
    result = await ops.backfill(args.limit)
    cli_output.print_backfill(result, args)
    return EXIT_FAILED if result["failed"] else EXIT_OK


async def _cleanup(ops: Operations, args: argparse.Namespace) -> int:
    cli_output.print_cleanup(await ops.cleanup(args.dry_run), args)
    return EXIT_OK


async def _stats(ops: Operations, args: argparse.Namespace) -> int:
    cli_output.print_stats(await ops.stats(), args)
    return EXIT_OK


async def _test(ops: Operations, args: argparse.Namespace) -> int:
    result = await ops.test(args.database)
    cli_output.print_drills(result, args)
    failed = [d for d in result["drills"] if not d["passed"]]
    return EXIT_FAILED if failed else EXIT_OK


async def _status(ops: Operations, args: argparse.Namespace) -> int:
    cli_output.print_status(await ops.status(), args)
    return EXIT_OK


COMMANDS: Final[dict[str, Callable[[Operations, argparse.Namespace], Awaitable[int]]]] = {
    "backup": _backup,
    "list": _list,
    "show": _show,
    "restore": _restore,
    "validate": _validate,
    "contents": _contents,
    "backfill": _backfill,
    "cleanup": _cleanup,
    "stats": _stats,
    "test": _test,
    "status": _status,
}
