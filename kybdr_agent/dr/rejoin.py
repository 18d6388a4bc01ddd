"""Turn the old primary back into a standby of the new one: stop it, ``pg_rewind`` it onto the new timeline,
point it at the new primary and start it streaming (``kybdr-agent dr rejoin`` on the old primary's host).

An old primary must never come back writable (``dr-anchors.md`` §6 rule 8), and it cannot simply be started
as a standby: after the failover it may hold WAL the new primary never saw, so its timeline has diverged.
``pg_rewind`` copies back what changed since the fork (it needs ``wal_log_hints = on`` or data checksums on
the old primary, checked first so the operator gets a clear answer instead of pg_rewind's). Then the
old primary is a standby: ``standby.signal`` plus ``primary_conninfo`` in ``postgresql.auto.conf``.

Details that bite:

* ``pg_rewind`` overwrites the target's configuration files with the source's (``postgresql.conf`` and
  ``postgresql.auto.conf`` live in the data directory in a stock layout): this node would come up on the new
  primary's port, with its settings. The node's own files are saved before the rewind and put back after.
* A just-promoted server's control file still shows the old timeline until its first checkpoint, and
  pg_rewind then says there is nothing to do; so a ``CHECKPOINT`` runs on the new primary first.
* The password for ``primary_conninfo`` goes into a passfile (0600, owned by the data directory's owner) that
  the conninfo names, never into the conninfo text. pg_rewind gets its password through the environment.
* The fence (``default_transaction_read_only``) is dropped from ``postgresql.auto.conf``: a read-only standby
  could not later be promoted cleanly (switchover back).
* As root, every server program runs as the data directory's owner (postgres refuses root).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio

from kybdr_agent.dr.pgops import DRError, _session, _timeline
from kybdr_agent.errors import KybdrError
from kybdr_agent.postgres.connection import DATABASE_ERRORS, Connection, pg_message

MAINTENANCE_DB: Final = "postgres"
POLL_INTERVAL: Final = 0.1
# The node's own configuration, kept across pg_rewind (which copies the source's over it).
CONFIG_FILES: Final = ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pg_ident.conf")
PASSFILE_NAME: Final = "kybdr-replication.pgpass"
START_LOG: Final = "kybdr-rejoin-start.log"
START_TIME_SLACK: Final = 2.0
# Settings rejoin owns in postgresql.auto.conf: rewritten (or dropped) every time.
_MANAGED: Final = ("primary_conninfo", "primary_slot_name", "default_transaction_read_only")
# libpq parameters never copied into primary_conninfo: secrets, and what a walreceiver sets itself.
# application_name too: the walreceiver then names itself by cluster_name, as synchronous_standby_names expects.
_NOT_IN_CONNINFO: Final = frozenset(
    {"password", "passfile", "sslpassword", "dbname", "replication", "application_name", "fallback_application_name"}
)
OUTPUT_TAIL: Final = 800


@dataclass(frozen=True)
class RejoinResult:
    """What rejoin did. ``rewound`` is False when the local server was already a streaming standby on the
    new primary's timeline (nothing to do) or pg_rewind found no divergence."""

    rewound: bool
    stopped_local: bool
    started: bool
    streaming: bool
    timeline: int
    slot: str | None
    rewind_s: float
    total_s: float
    detail: str


@dataclass(frozen=True)
class _Owner:
    uid: int
    gid: int

    def run_as(self) -> dict[str, Any]:
        """Keyword arguments for ``anyio.run_process``: drop to the owner when we are root."""
        if os.geteuid() == 0 and self.uid != 0:
            return {"user": self.uid, "group": self.gid, "extra_groups": []}
        return {}


def _check_pgdata(pgdata: Path) -> tuple[_Owner, int]:
    """The data directory's owner and major version, or a ``DRError`` that says what is wrong with it."""
    if not pgdata.is_dir():
        raise DRError(f"dr.pgdata {pgdata} is not a directory")
    version_file = pgdata / "PG_VERSION"
    if not version_file.is_file() or not (pgdata / "global" / "pg_control").is_file():
        raise DRError(f"dr.pgdata {pgdata} is not a PostgreSQL data directory (no PG_VERSION or global/pg_control)")
    st = pgdata.stat()
    if os.geteuid() == 0 and st.st_uid == 0:
        raise DRError(f"dr.pgdata {pgdata} is owned by root; PostgreSQL refuses to run as root")
    if os.geteuid() not in (0, st.st_uid):
        raise DRError(f"dr.pgdata {pgdata} belongs to uid {st.st_uid}: run rejoin as that user or as root")
    try:
        major = int(version_file.read_text().strip().split(".")[0])
    except ValueError:
        raise DRError(f"dr.pgdata {pgdata}: PG_VERSION is unreadable") from None
    return _Owner(st.st_uid, st.st_gid), major


def _binary(local: Connection, pg_bin_dir: Path | None, name: str, major: int) -> str:
    if pg_bin_dir is not None:
        path = pg_bin_dir / name
        if not os.access(path, os.X_OK):
            raise DRError(f"{name} not found in {pg_bin_dir}")
        return str(path)
    try:
        return local.binary(name, major)
    except KybdrError as exc:
        raise DRError(str(exc)) from None


async def _run(
    argv: list[str], owner: _Owner, *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str]:
    """Run a server program as the data directory's owner; (status, its whole output, stderr included)."""
    child_env = dict(env) if env is not None else _base_env()
    result = await anyio.run_process(
        argv,
        check=False,
        env=child_env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        **owner.run_as(),
    )
    return result.returncode, result.stdout.decode(errors="replace").strip()


def _tail(out: str) -> str:
    return out[-OUTPUT_TAIL:]


def _read_tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - OUTPUT_TAIL))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return "(unreadable)"


def _base_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep or k.startswith("LC_")}


async def _is_running(pg_ctl: str, pgdata: Path, owner: _Owner) -> bool:
    status, out = await _run([pg_ctl, "-D", str(pgdata), "status"], owner, cwd=pgdata)
    if status == 0:
        return True
    if status == 3:
        return False
    raise DRError(f"pg_ctl status on {pgdata} failed (status {status}): {_tail(out)}")


def _quote_conninfo(value: str) -> str:
    if value and not any(c in value for c in " \t\n\r\f\v'\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_setting(value: str) -> str:
    """A value as postgresql.auto.conf writes it: single quotes, embedded quotes doubled."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _passfile_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def primary_conninfo(new_primary: Connection, passfile: Path | None) -> str:
    """The walreceiver's conninfo: how the agent reaches the new primary, minus every secret."""
    params = {k: v for k, v in new_primary.params.items() if k not in _NOT_IN_CONNINFO and v != ""}
    if passfile is not None:
        params["passfile"] = str(passfile)
    return " ".join(f"{key}={_quote_conninfo(value)}" for key, value in params.items())


def _write_owned(path: Path, text: str, owner: _Owner, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` atomically, owned by the data directory's owner."""
    tmp = path.with_name(f".{path.name}.kybdr-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        if os.geteuid() == 0:
            os.chown(tmp, owner.uid, owner.gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _auto_conf(text: str, conninfo: str, slot: str | None) -> str:
    """postgresql.auto.conf without the settings rejoin owns, then ours."""
    kept = [line for line in text.splitlines() if line.split("=", 1)[0].strip() not in _MANAGED]
    kept.append(f"primary_conninfo = {_quote_setting(conninfo)}")
    if slot:
        kept.append(f"primary_slot_name = {_quote_setting(slot)}")
    return "\n".join(kept) + "\n"


def _setting(text: str, name: str) -> str | None:
    value: str | None = None
    for line in text.splitlines():
        key, eq, rest = line.partition("=")
        if eq and key.strip() == name:
            value = rest.strip().strip("'")
    return value


async def rejoin(
    *,
    pgdata: Path,
    local: Connection,
    new_primary: Connection,
    pg_bin_dir: Path | None,
    timeout: float,  # noqa: ASYNC109 - the contract's bound, applied inside with fail_after
    start: bool = True,
    passfile: Path | None = None,
    log_file: Path | None = None,
) -> RejoinResult:
    """Rewind the local old primary at ``pgdata`` onto ``new_primary`` and start it as its standby.

    ``local`` reaches the local server (to see whether it already is a streaming standby, and to wait for it
    to stream); ``new_primary`` is the promoted server (its password reaches pg_rewind through the
    environment and the walreceiver through ``passfile``, default ``pgdata/kybdr-replication.pgpass``).
    ``log_file`` is passed to ``pg_ctl start -l`` (default ``pgdata/log/kybdr-rejoin-start.log``): without
    ``-l`` the server would inherit pg_ctl's output pipe and hold it open for its whole life. The server's
    own logging settings (``logging_collector``) take over once it runs.
    With ``start=False`` the data directory is left ready for the operator's service manager to start.
    Raises ``DRError`` with what went wrong and what to do.
    """
    started = time.monotonic()
    owner, major = _check_pgdata(pgdata)
    pg_ctl = _binary(local, pg_bin_dir, "pg_ctl", major)
    pg_rewind = _binary(local, pg_bin_dir, "pg_rewind", major)
    pg_controldata = _binary(local, pg_bin_dir, "pg_controldata", major)
    try:
        with anyio.fail_after(timeout):
            return await _rejoin(
                pgdata=pgdata,
                local=local,
                new_primary=new_primary,
                owner=owner,
                tools=(pg_ctl, pg_rewind, pg_controldata),
                start=start,
                passfile=passfile or pgdata / PASSFILE_NAME,
                log_file=log_file,
                started=started,
            )
    except TimeoutError:
        raise DRError(f"rejoin of {pgdata} did not finish within {timeout:g}s") from None
    except DATABASE_ERRORS as exc:
        raise DRError(f"rejoin of {pgdata}: {pg_message(exc)}") from None


@dataclass(frozen=True)
class _Postmaster:
    """Enough of a running server's identity to tell whether two descriptions are the same server."""

    data_directory: str
    port: int
    started: float  # epoch seconds

    def same_as(self, other: _Postmaster) -> bool:
        # postmaster.pid holds whole seconds taken a moment apart from pg_postmaster_start_time().
        return (self.data_directory, self.port) == (other.data_directory, other.port) and abs(
            self.started - other.started
        ) <= START_TIME_SLACK


async def _primary_facts(new_primary: Connection) -> tuple[int, _Postmaster]:
    """Checks the new primary is one and returns its timeline and identity; the CHECKPOINT makes its
    control file show its new timeline, which pg_rewind reads."""
    what = f"checking the new primary {new_primary.describe()}"
    async with _session(new_primary, MAINTENANCE_DB, what) as session:
        if await session.fetchval("SELECT pg_is_in_recovery()"):
            raise DRError(f"{what}: it is still in recovery; promote it before rejoining the old primary to it")
        if await session.fetchval("SHOW full_page_writes") != "on":
            raise DRError(f"{what}: full_page_writes is off there, and pg_rewind needs it on its source")
        await session.execute("CHECKPOINT")
        timeline = await _timeline(session)
        row = await session.fetchrow(
            "SELECT current_setting('data_directory') AS dir, current_setting('port')::int AS port,"
            " extract(epoch FROM pg_postmaster_start_time())::float8 AS started"
        )
    assert row is not None
    return timeline, _Postmaster(str(row["dir"]), int(row["port"]), float(row["started"]))


async def _local_state(local: Connection, timeline: int) -> tuple[bool, bool] | None:
    """If the local server answers: (in recovery, streaming on ``timeline``)."""
    try:
        async with local.connect(MAINTENANCE_DB) as session:
            row = await session.fetchrow(
                "SELECT pg_is_in_recovery() AS rec,"
                " (SELECT status = 'streaming' AND received_tli = $1 FROM pg_stat_wal_receiver) AS streaming",
                timeline,
            )
    except (KybdrError, *DATABASE_ERRORS):
        return None
    if row is None:
        return None
    return bool(row["rec"]), bool(row["streaming"])


def _postmaster(pgdata: Path) -> _Postmaster | None:
    """A running server's identity from its postmaster.pid (pid, data directory, start time, port...)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text(errors="replace").splitlines()
        return _Postmaster(lines[1], int(lines[3]), float(lines[2]))
    except (OSError, IndexError, ValueError):
        return None


async def _rejoin(
    *,
    pgdata: Path,
    local: Connection,
    new_primary: Connection,
    owner: _Owner,
    tools: tuple[str, str, str],
    start: bool,
    passfile: Path,
    log_file: Path | None,
    started: float,
) -> RejoinResult:
    pg_ctl, pg_rewind, pg_controldata = tools
    timeline, primary = await _primary_facts(new_primary)
    running = await _is_running(pg_ctl, pgdata, owner)
    if running:
        # The same data directory path, port and start time as the new primary: it is the new primary (the
        # configuration or the host is mixed up). postmaster.pid does not depend on the local DSN being right,
        # and a false match only refuses.
        local_postmaster = _postmaster(pgdata)
        if local_postmaster is not None and local_postmaster.same_as(primary):
            raise DRError(
                f"the local server at {pgdata} IS the new primary {new_primary.describe()}: refusing to"
                " rewind it (run rejoin on the old primary's host)"
            )
        state = await _local_state(local, timeline)
        if state is not None:
            in_recovery, streaming = state
            if in_recovery and streaming:
                await _drop_fence(pgdata, owner)
                return RejoinResult(
                    rewound=False,
                    stopped_local=False,
                    started=True,
                    streaming=True,
                    timeline=timeline,
                    slot=None,
                    rewind_s=0.0,
                    total_s=time.monotonic() - started,
                    detail=f"already a streaming standby on timeline {timeline}; nothing rewound",
                )
    await _check_rewindable(pg_controldata, pgdata, owner)
    if running:
        status, out = await _run([pg_ctl, "-D", str(pgdata), "stop", "-m", "fast", "-w"], owner, cwd=pgdata)
        if status != 0:
            raise DRError(f"could not stop the local server at {pgdata} (pg_ctl status {status}): {_tail(out)}")

    saved = {name: (pgdata / name).read_bytes() for name in CONFIG_FILES if (pgdata / name).is_file()}
    auto_before = saved.get("postgresql.auto.conf", b"").decode(errors="replace")
    rewind_started = time.monotonic()
    env = {**_base_env(), **new_primary.child_env(MAINTENANCE_DB)}
    env.pop("PGDATABASE", None)
    env["PGDATABASE"] = MAINTENANCE_DB
    # The source conninfo carries nothing of the connection: host, user and password come from PG* (argv is
    # public in ps); naming only the application keeps it non-empty, as pg_rewind requires.
    status, out = await _run(
        [pg_rewind, f"--target-pgdata={pgdata}", "--source-server=application_name=kybdr-agent-rewind"],
        owner,
        env=env,
        cwd=pgdata,
    )
    rewind_s = time.monotonic() - rewind_started
    if status != 0:
        raise DRError(
            f"pg_rewind of {pgdata} from {new_primary.describe()} failed (status {status}): {_tail(out)}\n"
            "If it ran past its start the data directory may be unusable: re-clone it with pg_basebackup."
        )
    rewound = "no rewind required" not in out
    for name, data in saved.items():
        _write_owned(pgdata / name, data.decode(errors="surrogateescape"), owner)

    password = new_primary.env.get("PGPASSWORD")
    pass_target: Path | None = None
    if password:
        _write_owned(passfile, f"*:*:*:*:{_passfile_escape(password)}\n", owner)
        pass_target = passfile
    slot = await _kept_slot(new_primary, _setting(auto_before, "primary_slot_name"))
    conninfo = primary_conninfo(new_primary, pass_target)
    _write_owned(pgdata / "postgresql.auto.conf", _auto_conf(auto_before, conninfo, slot), owner)
    _write_owned(pgdata / "standby.signal", "", owner)

    streaming = False
    if start:
        if log_file is None:
            log_file = pgdata / "log" / START_LOG
            if not log_file.parent.exists():
                log_file.parent.mkdir(mode=0o700)
                if os.geteuid() == 0:
                    os.chown(log_file.parent, owner.uid, owner.gid)
        argv = [pg_ctl, "-D", str(pgdata), "start", "-w", "-t", "600", "-l", str(log_file)]
        status, out = await _run(argv, owner, cwd=pgdata)
        if status != 0:
            raise DRError(
                f"the rewound server at {pgdata} did not start (pg_ctl status {status}): {_tail(out)}\n"
                f"Its log: {log_file}: {_tail(_read_tail(log_file))}"
            )
        await _wait_streaming(local, timeline)
        streaming = True
    return RejoinResult(
        rewound=rewound,
        stopped_local=running,
        started=start,
        streaming=streaming,
        timeline=timeline,
        slot=slot,
        rewind_s=rewind_s,
        total_s=time.monotonic() - started,
        detail=_tail(out),
    )


async def _check_rewindable(pg_controldata: str, pgdata: Path, owner: _Owner) -> None:
    """pg_rewind needs wal_log_hints or data checksums on the target: say so before touching anything."""
    status, out = await _run([pg_controldata, "-D", str(pgdata)], owner, env={**_base_env(), "LC_ALL": "C"})
    if status != 0:
        raise DRError(f"pg_controldata {pgdata} failed (status {status}): {_tail(out)}")
    facts = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    hints = facts.get("wal_log_hints setting", "").strip()
    checksums = facts.get("Data page checksum version", "0").strip()
    if hints != "on" and checksums in ("", "0"):
        raise DRError(
            f"{pgdata} cannot be rewound: it has neither wal_log_hints = on nor data checksums. Re-clone it"
            " as a standby with pg_basebackup (and set wal_log_hints = on for next time)"
        )


async def _kept_slot(new_primary: Connection, slot: str | None) -> str | None:
    """Keep the node's primary_slot_name only if the new primary has that physical slot (pg_rewind does not
    copy slots, so the old one usually is gone; a missing slot would stop streaming altogether)."""
    if not slot:
        return None
    what = f"looking for replication slot {slot!r} on {new_primary.describe()}"
    async with _session(new_primary, MAINTENANCE_DB, what) as session:
        found = await session.fetchval(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND slot_type = 'physical'", slot
        )
    return slot if found else None


async def _drop_fence(pgdata: Path, owner: _Owner) -> None:
    """Remove a read-only fence from an already-streaming standby's auto.conf (takes effect on reload or
    promotion; ``promote`` resets it anyway)."""
    path = pgdata / "postgresql.auto.conf"
    text = path.read_text(encoding="utf-8")
    if _setting(text, "default_transaction_read_only") is None:
        return
    kept = [line for line in text.splitlines() if line.split("=", 1)[0].strip() != "default_transaction_read_only"]
    _write_owned(path, "\n".join(kept) + "\n", owner)


async def _wait_streaming(local: Connection, timeline: int) -> None:
    """Until the local server is in recovery with its walreceiver streaming the new primary's timeline."""
    while True:
        state = await _local_state(local, timeline)
        if state is not None and state[0] and state[1]:
            return
        await anyio.sleep(POLL_INTERVAL)
