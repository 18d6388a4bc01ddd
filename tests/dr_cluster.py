"""A real PostgreSQL primary and a streaming standby on loopback ports, for the DR tests.

The primary is initdb'ed with ``wal_level=replica``, ``wal_log_hints=on`` (pg_rewind needs it, or data
checksums) and ``full_page_writes=on`` (pg_rewind checks it on its source); the standby is a
``pg_basebackup -R -X stream -C -S dr_slot`` copy started with ``hot_standby=on``. Both run under ``pg_ctl``
(not as children of the test process), so a test can crash, stop and start either one, and the agent's
``dr rejoin`` can stop, rewind and start a data directory exactly as it would on a real host. Each node's
port, listen address and socket directory live in its own ``postgresql.conf``, so ``pg_ctl start`` with no
options brings it back on the same port.

TCP connections need the superuser's SCRAM password: tests and the agent read it from ``pair.password_file``
(0600, owned by whoever runs the tests; as root the agent subprocess runs as root too). Each node's
walreceiver finds it in a passfile owned by the server's OS user (``node.passfile``), so no password is ever
written into ``primary_conninfo``.

As root, initdb refuses to run, so every server program runs as the ``postgres`` OS user (like
``postgres/cluster.py``); the throwaway directories live under /tmp where that user can reach them.

Usage::

    with start_pair() as pair:
        pair.crash(pair.primary)
        ...

``start_pair`` takes about a second here (initdb dominates); share one pair per test module.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kybdr_agent.postgres.cluster import PG_BIN, free_port
from kybdr_agent.postgres.connection import Connection

SLOT: Final = "dr_slot"
START_TIMEOUT: Final = 60.0
# Settings both nodes share (the standby inherits them from the base backup). fsync is off for speed: the
# tests crash servers with ``pg_ctl stop -m immediate``, which loses no WAL the kernel already has.
COMMON_CONF: Final = """
fsync = off
synchronous_commit = on
full_page_writes = on
wal_level = replica
wal_log_hints = on
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 128MB
hot_standby = on
hot_standby_feedback = on
max_connections = 60
shared_buffers = 32MB
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = 200ms
checkpoint_timeout = 30min
log_min_messages = warning
"""


def _demote() -> dict[str, Any]:
    """subprocess arguments that run a child as the ``postgres`` OS user when we are root."""
    if os.geteuid() != 0:
        return {}
    import pwd

    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _owner() -> tuple[int, int]:
    demote = _demote()
    if demote:
        return int(demote["user"]), int(demote["group"])
    return os.geteuid(), os.getegid()


@dataclass
class Node:
    """One PostgreSQL server of the pair: its directories, port and whether it should be running.

    Quacks like ``postgres.cluster.Cluster`` (``port``, ``data_dir``, ``socket_dir``, ``env()``, ``psql()``,
    ``superuser_password``) so helpers written for that work here too.
    """

    name: str
    base: Path
    port: int
    superuser_password: str = field(repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> str:
        return str(self.base / "sock")

    @property
    def log_file(self) -> Path:
        return self.base / "postgres.log"

    @property
    def passfile(self) -> Path:
        """The walreceiver's passfile (owned by the server's OS user, 0600)."""
        return self.base / "pgpass"

    def env(self, *, tcp: bool = False) -> dict[str, str]:
        env = {"PGHOST": "127.0.0.1" if tcp else self.socket_dir, "PGPORT": str(self.port), "PGUSER": "postgres"}
        if tcp:
            env["PGPASSWORD"] = self.superuser_password
        return env

    def psql(self, database: str, sql: str, *, check: bool = True, timeout: float = 30) -> str:
        """SQL through psql over the unix socket (trust): test set-up and checks, not the agent's path."""
        proc = subprocess.run(
            [str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", database],
            input=sql.encode(),
            capture_output=True,
            env={**os.environ, **self.env()},
            check=False,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"psql on {self.name} failed: {proc.stderr.decode().strip()}")
        return proc.stdout.decode().strip()

    def is_running(self) -> bool:
        proc = subprocess.run(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True,
            check=False,
            **_demote(),
        )
        return proc.returncode == 0

    def in_recovery(self) -> bool:
        return self.psql("postgres", "SELECT pg_is_in_recovery()") == "t"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _pg_ctl(node: Node, *args: str, timeout: float = START_TIMEOUT) -> None:
    proc = subprocess.run(
        [str(PG_BIN / "pg_ctl"), "-D", str(node.data_dir), *args],
        capture_output=True,
        check=False,
        timeout=timeout,
        **_demote(),
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"pg_ctl {' '.join(args)} on {node.name} failed: {proc.stderr.decode().strip()}\n{node.log_tail()}"
        )


def _write_owned(path: Path, text: str, mode: int = 0o600) -> None:
    uid, gid = _owner()
    path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, uid, gid)


def _node_conf(node: Node) -> str:
    return (
        f"\n# kybdr test node {node.name}\nport = {node.port}\nlisten_addresses = '127.0.0.1'\n"
        f"unix_socket_directories = '{node.socket_dir}'\n"
    )


@dataclass
class Pair:
    """A primary and its streaming standby. ``primary``/``standby`` name the nodes as started; after a
    failover the roles swap but the names stay (tests ask ``node.in_recovery()``)."""

    base: Path
    primary: Node
    standby: Node
    password_file: Path
    _closed: bool = field(default=False, repr=False)

    @property
    def nodes(self) -> tuple[Node, Node]:
        return self.primary, self.standby

    def dsn(self, node: Node, port: int | None = None) -> str:
        """A TCP DSN for ``node`` (or for a proxy in front of it on ``port``); the password is not in it."""
        return f"host=127.0.0.1 port={port or node.port} user=postgres dbname=postgres"

    def connection(self, node: Node, port: int | None = None, connect_timeout: float = 5.0) -> Connection:
        """The agent's ``Connection`` to ``node`` (password from ``password_file``), as DR code builds it."""
        return Connection.from_settings(self.dsn(node, port), self.password_file, PG_BIN, connect_timeout)

    def crash(self, node: Node) -> None:
        """``pg_ctl stop -m immediate``: the server dies without a shutdown checkpoint, like a power cut."""
        _pg_ctl(node, "stop", "-m", "immediate", "-w")

    def stop(self, node: Node) -> None:
        """A fast, clean shutdown (no-op if it is not running)."""
        if node.is_running():
            _pg_ctl(node, "stop", "-m", "fast", "-w")

    def start(self, node: Node) -> None:
        """Start ``node`` from its data directory on its own port; waits until it accepts connections."""
        _pg_ctl(node, "start", "-w", "-t", str(int(START_TIMEOUT)), "-l", str(node.log_file))

    def restart(self, node: Node) -> None:
        self.stop(node)
        self.start(node)

    def wait_streaming(self, standby: Node | None = None, timeout: float = 30.0) -> None:
        """Until ``standby`` (default: whichever node is in recovery) has a streaming walreceiver."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            target = standby or next((n for n in self.nodes if n.is_running() and n.in_recovery()), None)
            if target is not None:
                last = target.psql("postgres", "SELECT status FROM pg_stat_wal_receiver", check=False)
                if last == "streaming":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"standby not streaming after {timeout}s (walreceiver: {last or 'none'})")

    def wait_replayed(self, standby: Node, lsn: str, timeout: float = 30.0) -> None:
        """Until ``standby`` has replayed up to ``lsn`` (text form, e.g. from ``pg_current_wal_lsn()``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if standby.psql("postgres", f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") == "t":
                return
            time.sleep(0.05)
        raise RuntimeError(f"{standby.name} did not replay {lsn} within {timeout}s")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for node in self.nodes:
            if node.data_dir.exists():
                with contextlib.suppress(Exception):
                    _pg_ctl(node, "stop", "-m", "immediate", "-w", timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_node(base: Path, name: str, password: str) -> Node:
    uid, gid = _owner()
    node_base = base / name
    node_base.mkdir()
    (node_base / "sock").mkdir()
    for path in (node_base, node_base / "sock"):
        os.chown(path, uid, gid)
    os.chmod(node_base, 0o755)  # noqa: S103 - the postgres user must traverse it; secrets are 0600 files
    node = Node(name=name, base=node_base, port=free_port(), superuser_password=password)
    _write_owned(node.passfile, f"*:*:*:postgres:{password}\n")
    return node


def start_pair(*, extra_conf: Mapping[str, str] | None = None) -> Pair:
    """initdb a primary, base-backup a standby from it, start both and wait until the standby streams."""
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"PostgreSQL server binaries not found in {PG_BIN} (install postgresql-15)")
    password = secrets.token_urlsafe(16)
    demote = _demote()
    base = Path(tempfile.mkdtemp(prefix="kybdr-drpair-", dir="/tmp"))
    os.chmod(base, 0o755)  # noqa: S103 - see _make_node
    pair: Pair | None = None
    try:
        password_file = base / "superuser.password"
        password_file.write_text(password + "\n")
        os.chmod(password_file, 0o600)
        primary = _make_node(base, "primary", password)
        standby = _make_node(base, "standby", password)
        pair = Pair(base=base, primary=primary, standby=standby, password_file=password_file)
        pwfile = primary.base / "initpw"
        _write_owned(pwfile, password + "\n")
        subprocess.run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(primary.data_dir),
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--no-instructions",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            **demote,
        )
        pwfile.unlink()
        extra = "".join(f"{key} = {value}\n" for key, value in (extra_conf or {}).items())
        with open(primary.data_dir / "postgresql.conf", "a") as conf:
            conf.write(COMMON_CONF + extra + _node_conf(primary))
        pair.start(primary)
        env = {**os.environ, "PGPASSFILE": str(standby.passfile)}
        env.pop("PGPASSWORD", None)
        subprocess.run(
            [
                str(PG_BIN / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(primary.port),
                "-U",
                "postgres",
                "-D",
                str(standby.data_dir),
                "-R",
                "-X",
                "stream",
                "-C",
                "-S",
                SLOT,
                "--no-sync",
                "-c",
                "fast",
            ],
            check=True,
            capture_output=True,
            env=env,
            **demote,
        )
        with open(standby.data_dir / "postgresql.conf", "a") as conf:
            conf.write(_node_conf(standby))
        # -R wrote primary_conninfo (with whatever libpq knew, possibly the password): replace it by one
        # that names the passfile instead.
        auto = standby.data_dir / "postgresql.auto.conf"
        kept = [line for line in auto.read_text().splitlines() if not line.startswith("primary_conninfo")]
        conninfo = f"host=127.0.0.1 port={primary.port} user=postgres passfile={standby.passfile}"
        kept.append(f"primary_conninfo = '{conninfo}'")
        _write_owned(auto, "\n".join(kept) + "\n")
        pair.start(standby)
        pair.wait_streaming(standby)
    except BaseException as exc:
        if pair is not None:
            detail = "\n".join(f"--- {n.name} log ---\n{n.log_tail()}" for n in pair.nodes)
            pair.close()
        else:
            detail = ""
            shutil.rmtree(base, ignore_errors=True)
        stderr = getattr(exc, "stderr", None)
        if isinstance(exc, subprocess.CalledProcessError) and stderr:
            raise RuntimeError(f"{exc.cmd[0]} failed: {stderr.decode().strip()}\n{detail}") from None
        raise
    return pair


@contextlib.contextmanager
def pair_fixture() -> Iterator[Pair]:
    """``start_pair`` as a context manager, for module-scoped pytest fixtures."""
    with start_pair() as pair:
        yield pair


if __name__ == "__main__":
    # python -m tests.dr_cluster: how long a pair takes to start here.
    started = time.monotonic()
    with start_pair() as _pair:
        print(f"start_pair took {time.monotonic() - started:.2f}s")
